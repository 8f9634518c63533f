"""flows.reliability: the file lock across real processes (a SIGKILLed holder releases it) and the
retry condition; flows.predict: the argv text cleaning used by ``selfattn predict``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.predict import clean_texts
from flows.reliability import file_lock, retry_on_io
from selfattn.errors import UserError

# holds the lock (argv[1]) from writing argv[2] until argv[3] exists; writes argv[4] just before
# letting go: a handshake, not a time window
HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows.reliability import file_lock
    lock, held, release, releasing = map(Path, sys.argv[1:5])
    with file_lock(lock):
        held.write_text("held")
        while not release.exists():
            time.sleep(0.01)
        releasing.write_text("releasing")
    """
)


def _holder(tmp_path) -> tuple[subprocess.Popen, Path, Path]:
    """A process that holds ``x.lock`` until the returned ``release`` file exists; also returns the
    file it writes as it lets go."""
    held, release, releasing = (tmp_path / f"{name}-{time.monotonic_ns()}" for name in ("held", "release", "releasing"))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "x.lock"), str(held), str(release), str(releasing)])
    deadline = time.monotonic() + 60
    while not held.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "holder did not start"
        time.sleep(0.02)
    return proc, release, releasing


def test_a_second_process_waits_for_the_lock(tmp_path):
    import threading

    proc, release, releasing = _holder(tmp_path)
    with pytest.raises(TimeoutError, match="another pipeline holds it"):  # held until we say so
        with file_lock(tmp_path / "x.lock", timeout_s=0.3, poll_s=0.05):
            pass
    granted_after: list[bool] = []

    def waiter() -> None:
        with file_lock(tmp_path / "x.lock", timeout_s=60, poll_s=0.05):
            granted_after.append(releasing.exists())  # the holder had let go

    thread = threading.Thread(target=waiter)
    thread.start()
    release.touch()
    thread.join(timeout=90)
    assert proc.wait(timeout=30) == 0 and granted_after == [True]


def test_a_killed_holder_releases_the_lock(tmp_path):
    proc, _, _ = _holder(tmp_path)
    proc.kill()  # SIGKILL: no finally block runs, the kernel drops the flock
    proc.wait(timeout=30)
    with file_lock(tmp_path / "x.lock", timeout_s=5, poll_s=0.05):
        pass


class _State:
    def __init__(self, exc):
        self.data = exc


def test_user_errors_are_not_retried():
    assert retry_on_io(None, None, _State(OSError("connection reset"))) is True
    assert retry_on_io(None, None, _State(UserError("data file not found"))) is False


def test_argv_texts_with_invalid_utf8_are_cleaned_with_a_note():
    raw = b"caf\xe9 \xff"
    texts, notes = clean_texts(["fine", raw.decode("utf-8", "surrogateescape"), ""])
    assert texts[0] == "fine" and notes[0] == ""
    assert texts[1] == "caf\ufffd \ufffd" and "UTF-8" in notes[1]
    texts[1].encode("utf-8")  # printable and schema-safe now
