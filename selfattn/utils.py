"""Small helpers shared by every layer, written once.

Each is used by ``selfattn/`` itself and by the layers above it (``data_checks/``, ``flows/``);
none imports anything heavier than the standard library at module level.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Mapping, Sequence

from selfattn.errors import DiskFull, UserError, is_disk_full

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "atomic_write_bytes", "atomic_write_text", "atomic_path", "atomic_dir", "disk_full_guard", "HashingWriter", "sha256_file", "deep_merge", "flatten", "autocast_context",
    "seeded_generator", "lazy_exports", "read_json_object",
]


@contextlib.contextmanager
def atomic_path(path: str | Path, *, need_bytes: int | None = None, what: str = "a file") -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` atomically (fsynced).

    Readers see the old file or the whole new one, never a torn write; on error the temporary
    file is removed and ``path`` is untouched. A full disk becomes a
    :class:`~selfattn.errors.DiskFull` naming ``path`` (``need_bytes``, ``what``: for its message).
    """
    path = Path(path)
    with disk_full_guard(path, need_bytes=need_bytes, what=what):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, need_bytes: int | None = None, what: str = "a directory") -> Iterator[Path]:
    """Yield an empty hidden sibling of directory ``path`` to fill; on success its files are fsynced
    and it replaces ``path`` (an old ``path`` is moved aside first and deleted only after); on an
    error it is removed and ``path`` is untouched. A full disk becomes a DiskFull naming ``path``."""
    path = Path(path)
    with disk_full_guard(path, need_bytes=need_bytes, what=what):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            for p in tmp.rglob("*"):
                if p.is_file():
                    with open(p, "rb") as fh:
                        os.fsync(fh.fileno())
            _swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(path.parent)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """``out`` becomes ``tmp``; an old ``out`` is moved aside first and deleted only after."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def disk_full_guard(path: str | Path, *, need_bytes: int | None = None, what: str = "a file") -> Iterator[None]:
    """Turn a full device (``OSError(ENOSPC)``, or an error wrapping it) inside the block into a
    :class:`~selfattn.errors.DiskFull` naming ``path``, the free space there and ``need_bytes``."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFull(path, need_bytes=need_bytes, what=what) from exc
        raise


class HashingWriter:
    """A write-only file object that also feeds a SHA-256 (for ``torch.save(obj, HashingWriter(fh))``):
    the digest of exactly the bytes written, without reading the file back."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.sha256, self.n_bytes = fh, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.fh.write(data)
        self.sha256.update(data)
        self.n_bytes += len(data)
        return len(data)

    def flush(self) -> None:
        self.fh.flush()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in ``chunk``-sized pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, need_bytes=len(data)) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dfd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dfd)


def deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of two mappings; ``b`` wins, nested mappings are merged key by key."""
    out = dict(a)
    for k, v in b.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def flatten(d: Mapping[str, Any], prefix: str = "", *, lists_as_json: bool = False) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; with ``lists_as_json`` lists/tuples become JSON text."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + ".", lists_as_json=lists_as_json))
        elif lists_as_json and isinstance(v, (list, tuple)):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def autocast_context(device: "torch.device", dtype: "torch.dtype | None"):
    """``torch.autocast`` for ``device`` in ``dtype``, or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type=device.type, dtype=dtype)


def seeded_generator(*seeds: int) -> "torch.Generator":
    """A CPU generator seeded by a digest of ``seeds`` (any reprs): the same seeds, the same stream."""
    import torch

    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(repr(seeds).encode()).hexdigest()[:15], 16))
    return g



def read_json_object(path: str | Path, *, missing: str | None = None) -> dict[str, Any]:
    """The JSON object (a mapping) in ``path``; a UserError naming the file when it is missing
    (``missing``: the message to give instead), not valid UTF-8 JSON, or not an object."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing or f"file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def lazy_exports(package: str, exports: Mapping[str, str], extra: Sequence[str] = ()) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for a package whose public names (``exports``: name -> defining
    module) are imported on first access (PEP 562), so importing the package stays cheap."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # resolved once
        return value

    def __dir__() -> list[str]:
        return sorted(exports) + list(extra)

    return __getattr__, __dir__
