"""Where things live: ``SELFATTN_HOME``, the data dir, the MLflow and Optuna stores, allowed roots.

Allowed roots (a path written *in a config* must resolve inside one of them, symlinks
followed): ``SELFATTN_DATA_DIR``, ``SELFATTN_HOME`` and the current working directory. A path
given explicitly on the command line (the ``--config`` file itself, ``selfattn evaluate
--model DIR``) is the user's own choice and is not restricted.
"""

from __future__ import annotations

import os
from pathlib import Path

from selfattn.data.paths import data_dir
from selfattn.data.paths import selfattn_home as library_home
from selfattn.errors import UserError

__all__ = [
    "JOURNAL_SCHEME",
    "allowed_roots",
    "check_within_roots",
    "data_root",
    "mlflow_artifact_root",
    "mlflow_tracking_uri",
    "optuna_storage_url",
    "resolve_local_path",
    "selfattn_home",
]


def selfattn_home() -> Path:
    """``SELFATTN_HOME`` (default ``./.selfattn``), absolute. Not created here."""
    return library_home().expanduser().resolve()


def data_root() -> Path | None:
    """``SELFATTN_DATA_DIR`` or None (then the public sources are used)."""
    d = data_dir()
    return d.expanduser().resolve() if d else None


def mlflow_tracking_uri(home: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set (the standard variable wins), else SQLite under home."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(home or selfattn_home()) / 'mlflow.db'}"


def mlflow_artifact_root(home: Path | None = None) -> str:
    return str((home or selfattn_home()) / "mlartifacts")


JOURNAL_SCHEME = "journal:///"


def optuna_storage_url(storage: str | None = None, home: Path | None = None) -> str:
    """``storage`` (``search.storage``), else ``SELFATTN_OPTUNA_STORAGE``, else a journal file under home.

    The embedded default is ``journal:///<home>/optuna.journal`` (Optuna's ``JournalFileBackend``:
    an append-only log safe for several local worker processes, where SQLite locks). A home made
    before the journal existed keeps its ``optuna.db`` (its studies continue there) until the
    user removes it.
    """
    # SELFATTN_OPTUNA_STORAGE: the team stack's database (infra/), set in the worker's environment
    explicit = storage or os.environ.get("SELFATTN_OPTUNA_STORAGE")
    if explicit:
        return explicit
    root = home or selfattn_home()
    legacy = root / "optuna.db"
    if legacy.is_file() and not (root / "optuna.journal").exists():
        return f"sqlite:///{legacy}"
    return f"{JOURNAL_SCHEME}{root / 'optuna.journal'}"


def allowed_roots(home: Path | None = None) -> list[Path]:
    roots = [(home or selfattn_home()).resolve(), Path.cwd().resolve()]
    d = data_root()
    if d is not None:
        roots.insert(0, d)
    return roots


def check_within_roots(spec: str, *, what: str = "path", home: Path | None = None) -> Path:
    """``spec`` (relative to the data dir, else the cwd) -> its resolved path inside an allowed root.

    Raises a :class:`UserError` naming the key (``what``), the value and the roots otherwise.
    """
    p = Path(spec).expanduser()
    if not p.is_absolute():
        p = (data_root() or Path.cwd()) / p
    p = p.resolve()
    roots = allowed_roots(home)
    if not any(p == r or r in p.parents for r in roots):
        raise UserError(
            f"{what} ({spec!r}) resolves to {p}, outside the allowed roots ({', '.join(map(str, roots))}); "
            "put the file under SELFATTN_DATA_DIR, SELFATTN_HOME or the working directory"
        )
    return p


def resolve_local_path(spec: str, *, what: str = "data file", home: Path | None = None) -> Path:
    """A config path -> an existing file inside the allowed roots, else a UserError."""
    p = check_within_roots(spec, what=what, home=home)
    if not p.is_file():
        raise UserError(f"{what} ({spec!r}) not found (looked at {p})")
    return p
