"""Reliability helpers for the pipeline: path roots, retry conditions, locks, safe model loading.

What survives what (SIGKILL, concurrent runs, hostile input) is documented in
``docs/reliability.md`` with the test that proves each row. The pieces that live elsewhere:
stage done-markers and atomic writes (``flows.stages``), training resume from the last
checkpoint (``selfattn.train``), stale MLflow runs marked KILLED on the next start
(``flows.tracking.mark_stale_runs``), Optuna heartbeat + retry (``flows.tuning``), idempotent
registration and the locked champion gate (``flows.registry``).

Allowed roots (a path written *in a config* must resolve inside one of them, symlinks
followed): ``SELFATTN_DATA_DIR``, ``SELFATTN_HOME`` and the current working directory. A path
given explicitly on the command line (the ``--config`` file itself, ``selfattn evaluate
--model DIR``) is the user's own choice and is not restricted.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from typing import Any, Iterator

from selfattn.errors import UserError

__all__ = ["check_config_paths", "check_within_roots", "clean_texts", "file_lock", "load_classifier", "merge_notes", "retry_on_io"]


def check_within_roots(spec: str, *, what: str, home: Path | None = None) -> Path:
    """``spec`` (relative to the data dir, else the cwd) -> its resolved path inside an allowed root.

    Raises a :class:`UserError` naming the key (``what``), the value and the roots otherwise.
    """
    from flows.config import allowed_roots, data_root

    p = Path(spec).expanduser()
    if not p.is_absolute():
        p = (data_root() or Path.cwd()) / p
    p = p.resolve()
    roots = [r.resolve() for r in allowed_roots(home)]
    if not any(p == r or r in p.parents for r in roots):
        raise UserError(
            f"{what} ({spec!r}) resolves to {p}, outside the allowed roots ({', '.join(map(str, roots))}); "
            "put the file under SELFATTN_DATA_DIR, SELFATTN_HOME or the working directory"
        )
    return p


def check_config_paths(cfg: Any, *, home: Path | None = None) -> dict[str, Path]:
    """Check every local path of a ``PipelineConfig`` before any work starts.

    With ``SELFATTN_DATA_DIR`` set, ``data.corpus`` / ``data.train`` / ``data.dev`` must resolve
    inside the allowed roots and exist; a ``sqlite:///`` Optuna storage must live inside them too.
    Returns ``{key: resolved path}``.
    """
    from flows.config import data_root

    checked: dict[str, Path] = {}
    if data_root() is not None:
        for key in ("corpus", "train", "dev"):
            spec = getattr(cfg.data, key)
            p = check_within_roots(spec, what=f"data.{key}", home=home)
            if not p.is_file():
                raise UserError(f"data.{key} ({spec!r}) not found (looked at {p})")
            checked[f"data.{key}"] = p
    storage = cfg.search.storage
    if storage and storage.startswith("sqlite:///"):
        db = storage.removeprefix("sqlite:///")
        checked["search.storage"] = check_within_roots(db, what="search.storage", home=home)
    return checked


def retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry I/O failures, never a :class:`UserError` (bad input)."""
    exc = getattr(state, "data", None)
    if not isinstance(exc, BaseException):
        try:
            exc = state.result(raise_on_failure=False)
        except Exception:  # noqa: BLE001 - unknown failure: let Prefect retry it
            return True
    return not isinstance(exc, UserError)


@contextlib.contextmanager
def file_lock(path: Path, *, timeout_s: float = 3600.0, poll_s: float = 0.2) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if missing); released when the process dies.

    The kernel drops the lock of a SIGKILLed process, so a crash never leaves it stuck.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock {path} not acquired in {timeout_s} s (another pipeline holds it)") from None
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def clean_texts(texts: list[Any]) -> tuple[list[str], list[str]]:
    """Command-line texts -> valid UTF-8 strings and a note per text ("" when unchanged).

    Bytes that are not UTF-8 reach Python's argv as lone surrogates (``surrogateescape``); MLflow's
    schema check and ``print`` both fail on them, so they become U+FFFD here, with a note.
    """
    from flows.serving import _to_text

    pairs = [_clean_str(t) if isinstance(t, str) else _to_text(t) for t in texts]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _clean_str(text: str) -> tuple[str, str]:
    """Undo ``surrogateescape`` to the original bytes, then decode them with U+FFFD for bad ones."""
    try:
        text.encode("utf-8")
        return text, ""
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # argv bytes that were not UTF-8
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # other lone surrogates
    return raw.decode("utf-8", "replace"), "invalid UTF-8 replaced with U+FFFD"


def merge_notes(frame: Any, notes: list[str]) -> Any:
    """Prepend ``notes`` to the ``warning`` column of a prediction frame."""
    if "warning" in frame.columns and any(notes):
        frame["warning"] = ["; ".join(x for x in (n, w) if x) for n, w in zip(notes, frame["warning"])]
    return frame



def load_classifier(model_uri: str) -> Any:
    """A ``SelfattnClassifier`` for ``model_uri`` without unpickling anything.

    ``models:/NAME@alias``, ``models:/NAME/VERSION`` and ``runs:/ID/model`` are downloaded from
    the configured MLflow store; a local path may be a ``save_pretrained`` directory or a logged
    pyfunc directory (``MLmodel``). Either way only the weights directory is read, with
    :func:`selfattn.checkpoint.load_pretrained` (safetensors + JSON); MLflow's
    ``python_model.pkl`` (cloudpickle) is never loaded, so a planted pickle is never run.
    """
    from flows.serving import SelfattnClassifier

    if "://" in model_uri or model_uri.startswith(("models:/", "runs:/")):
        import mlflow

        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    else:
        root = Path(model_uri).expanduser()
        if not root.exists():
            raise UserError(f"model {model_uri!r} not found (a models:/ or runs:/ URI, or a model directory)")
    if (root / "config.json").is_file():
        return SelfattnClassifier().load(str(root))
    found = sorted(p.parent for p in (root / "artifacts").rglob("config.json") if (p.parent / "model.safetensors").is_file()) if (root / "MLmodel").is_file() else []
    if len(found) != 1:
        raise UserError(
            f"model {model_uri!r} is neither a save_pretrained directory nor a selfattn pyfunc "
            f"(expected artifacts/<dir> with model.safetensors and config.json; found {len(found)})"
        )
    return SelfattnClassifier().load(str(found[0]))
