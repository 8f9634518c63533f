"""The native team stack for the integration tests: ``infra/local.py up`` on free ports, throwaway
PostgreSQL databases and a private state directory; torn down (databases dropped) at the end.

Everything here talks to real services: PostgreSQL on 127.0.0.1:5432 (``SELFATTN_PG_URL``),
``mlflow server``, ``prefect server start`` and a ``prefect worker`` started by ``infra/local.py``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "infra" / "local.py"
PG_URL = os.environ.get("SELFATTN_PG_URL", "postgresql://postgres@127.0.0.1:5432")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    # every test in this folder needs the services: mark them even if a module forgot its pytestmark
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def real_data_dir() -> str:
    """The real data sets for a pipeline run in a child process (SELFATTN_DATA_DIR, default
    ../shared/data); skips the test when they are missing, like the top-level ``data_dir`` fixture."""
    d = Path(os.environ.get("SELFATTN_DATA_DIR") or REPO.parent / "shared" / "data")
    if not (d / "sst2" / "train.tsv").is_file():
        pytest.skip(f"real data not found under {d}; set SELFATTN_DATA_DIR")
    return str(d)


def _pg_available() -> str | None:
    try:
        import psycopg2

        psycopg2.connect(PG_URL.rstrip("/") + "/postgres", connect_timeout=5).close()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        return f"PostgreSQL not reachable at {PG_URL}: {exc}"


def run_local(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python infra/local.py ARGS`` (the same code path as ``infra/local.sh``)."""
    return subprocess.run(
        [sys.executable, str(LOCAL), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_clean_env()
    )


def _clean_env() -> dict[str, str]:
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "SELFATTN_OPTUNA_STORAGE", "SELFATTN_HOME"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="session")
def output_dir() -> Path:
    """Where tests leave things for people to look at (screenshots): ``SELFATTN_TEST_OUTPUT`` or
    ``tests/integration/_output`` (gitignored)."""
    d = Path(os.environ.get("SELFATTN_TEST_OUTPUT") or REPO / "tests" / "integration" / "_output")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> dict:
    """The whole stack (MLflow, Prefect server, worker) on free ports; yields ``stack.json`` as a dict."""
    reason = _pg_available()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("stack")
    prefix = f"sa_it_{uuid.uuid4().hex[:8]}"
    proc = run_local(
        "up", "--state-dir", str(state), "--pg-url", PG_URL, "--db-prefix", prefix,
        "--mlflow-port", "0", "--prefect-port", "0", "--no-prefect-ui", "--timeout", "240",
    )  # fmt: skip
    if proc.returncode != 0:
        run_local("down", "--state-dir", str(state), "--pg-url", PG_URL, "--db-prefix", prefix, "--drop-databases")
        pytest.fail(f"infra/local.py up failed:\n{proc.stdout}\n{proc.stderr}")
    info = json.loads((state / "stack.json").read_text())
    info["state_dir"] = str(state)
    info["db_prefix"] = prefix
    try:
        yield info
    finally:
        down = run_local("down", "--state-dir", str(state), "--pg-url", PG_URL, "--db-prefix", prefix, "--drop-databases")
        if down.returncode != 0:
            print(f"infra/local.py down failed:\n{down.stdout}\n{down.stderr}", file=sys.stderr)


@pytest.fixture(scope="session")
def stack_env(stack, tmp_path_factory) -> dict[str, str]:
    """Environment for client processes (``selfattn run``, ``prefect ...``) that use the stack."""
    env = _clean_env()
    env["MLFLOW_TRACKING_URI"] = stack["mlflow_url"]
    env["PREFECT_API_URL"] = stack["prefect_api_url"]
    env["SELFATTN_OPTUNA_STORAGE"] = stack["optuna_storage"]
    env["SELFATTN_WORK_POOL"] = stack["pool"]
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect_client_home"))
    env["SELFATTN_HOME"] = str(tmp_path_factory.mktemp("selfattn_home"))
    env.setdefault("SELFATTN_DATA_DIR", str(REPO.parent / "shared" / "data"))
    env["PYTHONUNBUFFERED"] = "1"
    return env


# --------------------------------------------------------------------------- small HTTP helpers


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 30) -> dict | list:
    """A JSON request; raises AssertionError with the server's answer on a non-2xx status."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"{method} {url} -> {exc.code}: {exc.read()[:2000]!r}") from None
    return json.loads(raw) if raw else {}


def mlflow_get(stack: dict, endpoint: str, **params) -> dict:
    """GET ``<mlflow>/api/2.0/mlflow/<endpoint>?params`` (the REST API, not the Python client)."""
    from urllib.parse import urlencode

    return http_json("GET", f"{stack['mlflow_url']}/api/2.0/mlflow/{endpoint}?{urlencode(params, doseq=True)}")


def mlflow_post(stack: dict, endpoint: str, body: dict) -> dict:
    return http_json("POST", f"{stack['mlflow_url']}/api/2.0/mlflow/{endpoint}", body)


@functools.cache
def serve_load():
    """``benchmarks/serve_load.py`` as a module: its ``start_server`` / ``post`` / ``ping`` /
    ``stop_server`` drive ``mlflow models serve`` for the serving tests as for the benchmark."""
    spec = importlib.util.spec_from_file_location("serve_load", REPO / "benchmarks" / "serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def wait_for(check, timeout: float, what: str, interval: float = 1.0):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def chromium() -> str | None:
    """A headless-capable Chromium on PATH (Debian: chromium; Ubuntu: chromium-browser; Google's build), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def selfattn_cmd() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m selfattn.cli``."""
    script = Path(sys.executable).with_name("selfattn")
    if script.exists():
        return [str(script)]
    found = shutil.which("selfattn")
    return [found] if found else [sys.executable, "-m", "selfattn.cli"]
