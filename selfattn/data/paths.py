"""Where data lives: ``$SELFATTN_DATA_DIR`` (read-only inputs), ``$SELFATTN_HOME`` (caches and runs,
default ``./.selfattn``), path resolution and file digests.

Paths: ``${SELFATTN_DATA_DIR}/sst2/train.tsv`` is expanded from the environment; a relative path that
does not exist under the working directory is tried under :func:`data_dir`. Anything that is neither
an existing file nor has a file suffix is treated as a HF hub id.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from selfattn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover

    pass


FILE_SUFFIXES = {".txt": "text", ".text": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def data_dir() -> Path | None:
    """The real-data folder from ``$SELFATTN_DATA_DIR``, or None when unset."""
    value = os.environ.get("SELFATTN_DATA_DIR")
    return Path(value) if value else None


def selfattn_home() -> Path:
    """``$SELFATTN_HOME`` (default ``./.selfattn``); holds caches and runs."""
    return Path(os.environ.get("SELFATTN_HOME") or ".selfattn")


def cache_dir() -> Path:
    """Where tokenized data and HF dataset caches go (never the read-only data dir)."""
    return selfattn_home() / "cache"


def resolve_path(path: str) -> Path | None:
    """A local file for ``path``, or None when ``path`` looks like a hub id.

    ``$VAR`` / ``${VAR}`` and ``~`` are expanded; a relative path missing from the working
    directory is tried under ``data_dir()``. A path with a file suffix that exists nowhere is a
    UserError naming the places tried.
    """
    if "$" in path:
        expanded = os.path.expandvars(path)
        if "$" in expanded:
            raise UserError(f"data path {path!r} uses an environment variable that is not set (e.g. export SELFATTN_DATA_DIR=/path/to/data)")
        path = expanded
    p = Path(path).expanduser()
    tried = [p]
    if p.is_file():
        return p
    base = data_dir()
    if not p.is_absolute() and base is not None:
        q = base / p
        tried.append(q)
        if q.is_file():
            return q
    if p.suffix.lower() in FILE_SUFFIXES or p.is_absolute() or path.startswith("."):
        hint = "" if base is not None else " (SELFATTN_DATA_DIR is not set)"
        raise UserError(f"data file not found: {path!r}; tried {', '.join(str(t) for t in tried)}{hint}")
    return None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_digest(path: str, split: str) -> str:
    """Digest naming a data source: file content for local files, id + split for the hub."""
    local = resolve_path(path)
    return file_digest(local) if local is not None else f"hub:{path}:{split}"
