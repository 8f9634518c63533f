"""A tracking server that does not answer is told apart from an error the server sent, and a
registry lease abandoned by a dead or failed holder is taken over at once."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from flows import reliability
from flows.tracking import registry, runs


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def test_a_refused_connection_is_an_outage_and_becomes_one_paragraph(monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(Exception) as info:
        MlflowClient(url).get_experiment_by_name("x")
    assert reliability.server_unreachable(info.value)
    err = runs.outage_error(info.value)
    assert err is not None and mlflow.get_tracking_uri() in str(err) and "\n" not in str(err) and "Run the same command again" in str(err)


def test_an_error_the_server_sent_is_not_an_outage():
    from mlflow.exceptions import MlflowException

    # what a server that answers says about a missing model (the registry's "not found")
    answered = MlflowException("Registered Model with name=missing not found", error_code="RESOURCE_DOES_NOT_EXIST")
    assert not reliability.server_unreachable(answered) and runs.outage_error(answered) is None
    assert reliability.server_unreachable(ValueError("x")) is False


def test_no_retries_restores_the_users_budget(monkeypatch):
    import os

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    with runs.no_retries():
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def test_a_lease_of_a_dead_process_on_this_host_is_gone_a_live_or_remote_one_is_not():
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    assert registry._owner_gone(f"{host}:{dead.stdout.strip()}:abc")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not registry._owner_gone(f"{host}:{live.pid}:abc")
        assert not registry._owner_gone(f"other-host-{host}:{dead.stdout.strip()}:abc"), "another host's pid means nothing here"
    finally:
        live.kill()
        live.wait()
    token = f"{host}:{__import__('os').getpid()}:mine"
    assert not registry._owner_gone(token), "this live process holds it"
    registry._ABANDONED.add(token)
    try:
        assert registry._owner_gone(token), "a lease this process failed to release is free to take"
    finally:
        registry._ABANDONED.discard(token)


def test_prefect_failure_lines_drop_explained_errors_and_keep_bugs_tracebacks():
    import logging

    from flows.console import _NoKnownTraceback
    from selfattn.errors import UserError

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception", None, sys.exc_info())

    import requests

    explained, down, bug = (
        record(UserError("bad data.text_column")),
        record(requests.exceptions.ConnectionError("connection refused")),
        record(KeyError("bug")),
    )
    assert not _NoKnownTraceback().filter(explained), "the closing paragraph says a UserError once"
    assert _NoKnownTraceback().filter(down) and down.exc_info is None, "an outage keeps its line, not the retry chain"
    assert _NoKnownTraceback().filter(bug) and bug.exc_info is not None, "a real bug keeps its traceback"
