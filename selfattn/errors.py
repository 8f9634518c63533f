"""Error types shared by the library, the data checks and the flows."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix (bad config, bad data, missing file).

    The CLI prints its message as one paragraph and exits non-zero without a traceback.
    ``exit_code`` lets a caller choose the process exit status (2 = unusable input).
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


EXIT_DISK_FULL = 5


class DiskFull(UserError):
    """The device filled up while writing ``path``; what was written before is intact.

    Raised instead of the ``OSError(ENOSPC)`` (or the error wrapping it) by the atomic writers:
    the message names the path, the free space there and what the write needed. Exit code 5.
    """

    def __init__(self, path: str | os.PathLike[str], *, need_bytes: int | None = None, what: str = "a file") -> None:
        self.path = Path(path)
        self.free_bytes = _free_bytes(self.path)
        self.need_bytes = need_bytes
        need = f"; it needs about {human_bytes(need_bytes)}" if need_bytes else ""
        super().__init__(
            f"no space left on the device while writing {what} to {self.path} ({human_bytes(self.free_bytes)} free "
            f"there{need}). Nothing written before is lost: what was half-written was removed. Free space on that "
            "disk (or point SELFATTN_HOME at a larger one) and run the same command again: it resumes where it stopped",
            exit_code=EXIT_DISK_FULL,
        )


def human_bytes(n: int | None) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    if n is None:
        return "? bytes"
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None  # pragma: no cover


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_DISK_FULL_TEXTS = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` or an error it wraps (cause or context) is the device running out of space:
    ``OSError(ENOSPC/EDQUOT)``, or a library's error carrying its text (torch.save's RuntimeError
    keeps the OSError as its context; SQLite says "database or disk is full")."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _DISK_FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False
