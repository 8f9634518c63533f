"""The MLflow tracking server of the stack: a run logged with the client, read back over REST;
artifacts proxied into the server's artifact store; the basic-auth app (``selfattn-auth``) guarding
the API and serving the index page that opens experiments on their training runs."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from .conftest import PG_URL, REPO, _pg_available, mlflow_get, run_local

pytestmark = pytest.mark.integration


def test_run_logged_to_server_reads_back_over_rest(stack, stack_env, tmp_path):
    # log from a separate process, exactly as a user's script would (MLFLOW_TRACKING_URI from the env)
    script = tmp_path / "log_run.py"
    script.write_text(
        "import mlflow, pathlib, sys\n"
        "mlflow.set_experiment('it-server')\n"
        "with mlflow.start_run(run_name='it-run') as run:\n"
        "    mlflow.log_params({'lr': 0.001, 'layers': 2})\n"
        "    for step, loss in enumerate([1.0, 0.5, 0.25]):\n"
        "        mlflow.log_metric('loss', loss, step=step)\n"
        "    p = pathlib.Path(sys.argv[1]) / 'notes.txt'\n"
        "    p.write_text('hello artifact store')\n"
        "    mlflow.log_artifact(str(p), artifact_path='docs')\n"
        "print('RUN_ID=' + run.info.run_id)\n"
    )
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], env=stack_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    run_id = next(line[7:] for line in proc.stdout.splitlines() if line.startswith("RUN_ID="))

    run = mlflow_get(stack, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "it-run"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.001", "layers": "2"}
    history = mlflow_get(stack, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert sorted((m["step"], m["value"]) for m in history) == [(0, 1.0), (1, 0.5), (2, 0.25)]

    # the artifact went through the server's proxy into its artifact directory
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")
    listed = mlflow_get(stack, "artifacts/list", run_id=run_id, path="docs")["files"]
    assert [f["path"] for f in listed] == ["docs/notes.txt"]
    exp_id = run["info"]["experiment_id"]
    url = f"{stack['mlflow_url']}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{run_id}/artifacts/docs/notes.txt"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.read() == b"hello artifact store"
    stored = Path(stack["state_dir"]) / "mlartifacts" / exp_id / run_id / "artifacts" / "docs" / "notes.txt"
    assert stored.read_text() == "hello artifact store"

    found = mlflow_get(stack, "experiments/get-by-name", experiment_name="it-server")["experiment"]
    assert found["experiment_id"] == exp_id


def _get(url: str, user: str | None = None, password: str | None = None) -> int:
    return _fetch(url, user, password)[0]


def _fetch(url: str, user: str | None = None, password: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if user:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def test_basic_auth_app_with_admin_password_from_env(tmp_path):
    """The docker-compose setting (``--app-name selfattn-auth``: MLflow's basic-auth app with our
    index page; password from the environment), natively."""
    reason = _pg_available()
    if reason:
        pytest.skip(reason)
    password = uuid.uuid4().hex
    prefix = f"sa_it_{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, MLFLOW_AUTH_ADMIN_PASSWORD=password)
    up = subprocess.run(
        [sys.executable, str(REPO / "infra" / "local.py"), "up", "--state-dir", str(tmp_path), "--pg-url", PG_URL,
         "--db-prefix", prefix, "--mlflow-port", "0", "--prefect-port", "0", "--no-worker", "--no-prefect-ui",
         "--mlflow-auth"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        url = json.loads((tmp_path / "stack.json").read_text())["mlflow_url"]
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert _get(f"{url}/health") == 200  # what the compose health check calls, without a login
        assert _get(api) == 401
        assert _get(api, "admin", "wrong-" + password) == 401
        assert _get(api, "admin", password) == 200
        # the UI's index page is behind the login too, and carries the default-workflow script
        status, index = _fetch(f"{url}/", "admin", password)
        assert status == 200 and "mlflow.workflowType_v1" in index and "static-files/static/js/main." in index
        # the password is nowhere on disk or on a command line
        assert password not in (tmp_path / "mlflow_auth.ini").read_text()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                assert password.encode() not in cmdline.read_bytes()
            except OSError:
                continue
    finally:
        run_local("down", "--state-dir", str(tmp_path), "--pg-url", PG_URL, "--db-prefix", prefix, "--drop-databases")
