"""flows/mlflow_app.py: MLflow's index page with the script that makes "Model training" the default
workflow of a browser with no choice yet; the ``mlflow.app`` entry points that name the factories.

The browser itself is checked by tests/integration/test_mlflow_ui.py (from the home page, in Chromium).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("mlflow.server")

KEY = "mlflow.workflowType_v1"


@pytest.fixture()
def flask_app(monkeypatch):
    """MLflow's Flask app as ``create_app`` leaves it (gunicorn/waitress: the Flask app itself); the
    original index view is put back afterwards."""
    from mlflow.server import app

    from flows.mlflow_app import create_app

    before = dict(app.view_functions)
    monkeypatch.setenv("_MLFLOW_SGI_NAME", "gunicorn")
    assert create_app() is app
    yield app
    app.view_functions.clear()
    app.view_functions.update(before)


def _index_html(app) -> str:
    return (Path(app.static_folder) / "index.html").read_text(encoding="utf-8")


def _script(page: str) -> str:
    """The body of the one inline script that mentions the workflow key."""
    [body] = [b for b in re.findall(r"<script>(.*?)</script>", page, flags=re.S) if KEY in b]
    return body


def test_index_page_is_mlflows_with_the_script_before_its_bundle(flask_app):
    from flows.mlflow_app import DEFAULT_WORKFLOW_SCRIPT

    resp = flask_app.test_client().get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    page = resp.get_data(as_text=True)
    original = _index_html(flask_app)
    assert page.replace(DEFAULT_WORKFLOW_SCRIPT, "", 1) == original  # MLflow's page, one insertion
    bundle = re.search(r'<script[^>]*src="[^"]*static/js/main\.[^"]*\.js"', page)
    assert bundle, "MLflow's main bundle is not in its index.html"
    at = page.index(DEFAULT_WORKFLOW_SCRIPT)
    assert at < bundle.start() and at > page.index("<head>") and at < page.index("</head>")
    assert "no-store" in resp.headers["Cache-Control"] and "no-cache" in resp.headers["Cache-Control"]
    # the rest of the UI is MLflow's, untouched
    assert flask_app.test_client().get("/health").status_code == 200


def test_script_sets_training_only_when_the_browser_has_no_choice(flask_app):
    page = flask_app.test_client().get("/").get_data(as_text=True)
    body = _script(page)
    # one write, guarded by a read of the same key (a choice made in the sidebar is kept)
    assert body.count("setItem(") == 1 and body.startswith("try{") and "catch(" in body
    guard = re.search(r'if\(!s\.getItem\("' + re.escape(KEY) + r'"\)\)s\.setItem\("' + re.escape(KEY) + r'",JSON\.stringify\("machine_learning"\)\)', body)
    assert guard, body


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (the guard is checked textually above)")
def test_script_run_on_a_fake_local_storage(flask_app):
    """Run in node against a stand-in ``window.localStorage``: absent or empty -> the JSON string
    ``"machine_learning"`` (what MLflow's own ``useLocalStorage`` writes and ``JSON.parse``s); a
    choice (GenAI or training) -> unchanged; a storage that throws -> no error."""
    body = _script(flask_app.test_client().get("/").get_data(as_text=True))
    harness = """
    const cases = JSON.parse(process.argv[1]); const out = [];
    for (const start of cases) {
      const store = new Map(Object.entries(start === "throws" ? {} : start));
      const storage = {getItem: k => (store.has(k) ? store.get(k) : null), setItem: (k, v) => store.set(k, String(v))};
      globalThis.window = start === "throws" ? {get localStorage() { throw new Error("SecurityError"); }} : {localStorage: storage};
      BODY
      out.push(Object.fromEntries(store));
    }
    console.log(JSON.stringify(out));
    """.replace("BODY", body)
    cases = [{}, {KEY: ""}, {KEY: '"genai"'}, {KEY: '"machine_learning"'}, {"other": "1"}, "throws"]
    proc = subprocess.run(["node", "-e", harness, json.dumps(cases)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    training = json.dumps("machine_learning")
    assert json.loads(proc.stdout) == [
        {KEY: training},
        {KEY: training},
        {KEY: '"genai"'},
        {KEY: training},
        {"other": "1", KEY: training},
        {},
    ]


def test_without_index_html_mlflows_view_answers(flask_app, tmp_path, monkeypatch):
    monkeypatch.setattr(flask_app, "static_folder", str(tmp_path))
    resp = flask_app.test_client().get("/")
    assert resp.status_code == 200 and "index.html) not found" in resp.get_data(as_text=True)
    assert "no-store" not in resp.headers.get("Cache-Control", "")


def test_a_page_without_head_or_script_is_served_unchanged():
    from flows.mlflow_app import DEFAULT_WORKFLOW_SCRIPT, with_default_workflow

    assert with_default_workflow("<html><body>hi</body></html>") is None
    page = "<html><head><title>t</title></head><body><script src=x></script></body></html>"
    assert with_default_workflow(page) == page.replace("</head>", DEFAULT_WORKFLOW_SCRIPT + "</head>")


def test_under_uvicorn_create_app_returns_mlflows_fastapi_app_serving_the_page(monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from mlflow.server import app

    from flows.mlflow_app import DEFAULT_WORKFLOW_SCRIPT, create_app

    before = dict(app.view_functions)
    monkeypatch.setenv("_MLFLOW_SGI_NAME", "uvicorn")
    try:
        served = create_app()
        assert isinstance(served, FastAPI)
        with TestClient(served, base_url="http://localhost") as client:
            resp = client.get("/")
        assert resp.status_code == 200 and DEFAULT_WORKFLOW_SCRIPT in resp.text
    finally:
        app.view_functions.clear()
        app.view_functions.update(before)


def test_entry_points_name_the_factories():
    from importlib.metadata import entry_points

    from flows.mlflow_app import create_app, create_auth_app

    apps = {ep.name: ep for ep in entry_points(group="mlflow.app")}
    assert apps["selfattn"].value == "flows.mlflow_app:create_app" and apps["selfattn"].load() is create_app
    assert apps["selfattn-auth"].value == "flows.mlflow_app:create_auth_app" and apps["selfattn-auth"].load() is create_auth_app


def test_ui_command_runs_the_selfattn_app(tmp_path):
    from flows.cli import mlflow_ui_command

    cmd = mlflow_ui_command(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlartifacts", "127.0.0.1", 5000)
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert cmd[cmd.index("--app-name") + 1] == "selfattn"
    assert cmd[cmd.index("--default-artifact-root") + 1] == (tmp_path / "mlartifacts").as_uri()
    assert "--default-artifact-root" not in mlflow_ui_command("http://tracking:5000", tmp_path, "127.0.0.1", 5000)
