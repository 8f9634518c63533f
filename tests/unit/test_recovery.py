"""flows.recovery: the stage lock across real processes, re-entry in one process, retry condition."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from flows.recovery import StageLock, retry_on_io
from selfattn.errors import UserError

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows.recovery import StageLock
    lock = StageLock(Path(sys.argv[1]))
    Path(sys.argv[2]).write_text("held")
    time.sleep(float(sys.argv[3]))
    {release}
    """
)


def _holder(tmp_path, seconds: float, release: str = "lock.release()") -> tuple[subprocess.Popen, object]:
    flag = tmp_path / f"held-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(release=release), str(tmp_path / "s.lock"), str(flag), str(seconds)])
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "holder did not start"
        time.sleep(0.02)
    return proc, flag


def test_a_second_process_waits_for_the_stage(tmp_path):
    proc, _ = _holder(tmp_path, 1.5)
    with pytest.raises(TimeoutError, match="another pipeline runs this stage"):
        StageLock(tmp_path / "s.lock", timeout_s=0.3, poll_s=0.05)
    lock = StageLock(tmp_path / "s.lock", timeout_s=60, poll_s=0.05)  # granted once the holder releases
    assert proc.poll() is not None or proc.wait(timeout=30) == 0
    lock.release()


def test_a_killed_holder_releases_the_lock(tmp_path):
    proc, _ = _holder(tmp_path, 600, release="")
    proc.kill()  # SIGKILL: the kernel drops the flock
    proc.wait(timeout=30)
    StageLock(tmp_path / "s.lock", timeout_s=5, poll_s=0.05).release()


def test_reentry_in_the_same_process_does_not_deadlock(tmp_path):
    first = StageLock(tmp_path / "s.lock", timeout_s=1)
    second = StageLock(tmp_path / "s.lock", timeout_s=1)  # e.g. a Prefect retry while the failed attempt is alive
    second.release()
    first.release()
    StageLock(tmp_path / "s.lock", timeout_s=1).release()


class _State:
    def __init__(self, exc):
        self.data = exc


def test_user_errors_are_not_retried():
    assert retry_on_io(None, None, _State(OSError("connection reset"))) is True
    assert retry_on_io(None, None, _State(UserError("data file not found"))) is False
