"""Failure handling shared by the stages: an exclusive file lock that a dead process releases,
and the rule deciding which failed Prefect task is worth a retry.

What survives what (SIGKILL, concurrent runs, hostile input) is documented in
``docs/reliability.md`` with the test that proves each row. The pieces that live elsewhere:
stage done-markers and claims (``flows.stages.base``), training resume from the last checkpoint
(``selfattn.train``), stale MLflow runs marked KILLED on the next start
(``flows.tracking.runs.mark_stale_runs``), Optuna heartbeat + retry (``flows.tuning``), idempotent
registration and the locked champion gate (``flows.tracking.registry``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any, Iterator

from selfattn.errors import UserError

__all__ = ["file_lock", "pid_alive", "retry_on_io", "server_unreachable"]


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


def server_unreachable(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is the tracking server not answering after the
    client's retries: a refused or reset connection or a timeout, not an error the server sent."""
    import requests

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
        if "Max retries exceeded" in str(e) and "API request to" in str(e):  # MlflowException drops the cause
            return True
        e = e.__cause__ or e.__context__
    return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
