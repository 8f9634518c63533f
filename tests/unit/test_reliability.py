"""flows.reliability: the file lock across real processes (a SIGKILLed holder releases it) and the
retry condition; flows.predict: the argv text cleaning used by ``selfattn predict``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from flows.predict import clean_texts
from flows.reliability import file_lock, retry_on_io
from selfattn.errors import UserError

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from flows.reliability import file_lock
    with file_lock(Path(sys.argv[1])):
        Path(sys.argv[2]).write_text("held")
        time.sleep(float(sys.argv[3]))
    """
)


def _holder(tmp_path, seconds: float) -> subprocess.Popen:
    flag = tmp_path / f"held-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "x.lock"), str(flag), str(seconds)])
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "holder did not start"
        time.sleep(0.02)
    return proc


def test_a_second_process_waits_for_the_lock(tmp_path):
    proc = _holder(tmp_path, 1.5)
    with pytest.raises(TimeoutError, match="another pipeline holds it"):
        with file_lock(tmp_path / "x.lock", timeout_s=0.3, poll_s=0.05):
            pass
    with file_lock(tmp_path / "x.lock", timeout_s=60, poll_s=0.05):  # granted once the holder is done
        assert proc.wait(timeout=30) == 0


def test_a_killed_holder_releases_the_lock(tmp_path):
    proc = _holder(tmp_path, 600)
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
