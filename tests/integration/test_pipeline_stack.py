"""The smoke pipeline against the team stack, end to end, read back through the servers' REST APIs.

In order (one module, one stack): ``selfattn run --config smoke`` as a user runs it -> its runs,
metrics, artifacts, registered version and aliases in the MLflow server -> its flow runs in the
Prefect server -> a deployment from ``infra/prefect.yaml`` run by the worker -> ``mlflow models
serve`` of the champion answering raw sentences over HTTP -> the MLflow UI in headless Chromium.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, chromium, http_json, mlflow_get, mlflow_post, selfattn_cmd, serve_load, wait_for

pytestmark = pytest.mark.integration

PRESET = REPO / "flows" / "presets" / "smoke.yaml"
FLOW_NAME = "selfattn-pipeline"
DEPLOY_OVERRIDES = ["finetune.train.max_steps=12"]
STAGES = {"validate", "pretrain", "search", "finetune", "evaluate", "register"}


@pytest.fixture(scope="module")
def smoke_cfg() -> dict:
    cfg = yaml.safe_load(PRESET.read_text())
    return {"experiment": cfg["tracking"]["experiment"], "model": cfg["registry"]["model_name"]}


@pytest.fixture(scope="module")
def smoke_run(stack, stack_env, smoke_cfg, data_dir, output_dir) -> dict:
    """``selfattn run --config smoke`` in a subprocess, with the stack's URLs in its environment."""
    proc = subprocess.run([*selfattn_cmd(), "run", "--config", "smoke"], env=stack_env, capture_output=True, text=True, timeout=900)
    (output_dir / "smoke_run.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    experiment = mlflow_get(stack, "experiments/get-by-name", experiment_name=smoke_cfg["experiment"])["experiment"]
    parents = _parent_runs(stack, experiment["experiment_id"])
    assert len(parents) == 1, [r["info"]["run_name"] for r in parents]
    return {"experiment_id": experiment["experiment_id"], "parent": parents[0], **smoke_cfg}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _search_runs(stack: dict, experiment_id: str, filter_string: str = "") -> list[dict]:
    runs, token = [], None
    while True:
        body = {"experiment_ids": [experiment_id], "filter": filter_string, "max_results": 500}
        if token:
            body["page_token"] = token
        page = mlflow_post(stack, "runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def _parent_runs(stack: dict, experiment_id: str) -> list[dict]:
    """The pipeline's top-level runs (not stage/trial runs, not a `selfattn tune` parent)."""
    return [
        r for r in _search_runs(stack, experiment_id)
        if "mlflow.parentRunId" not in _tags(r) and "selfattn.stage" not in _tags(r)
    ]  # fmt: skip


def _alias_version(stack: dict, model: str, alias: str) -> str:
    return mlflow_get(stack, "registered-models/alias", name=model, alias=alias)["model_version"]["version"]


# --------------------------------------------------------------------------- MLflow


def test_runs_metrics_and_artifacts_in_mlflow_server(stack, smoke_run):
    parent, exp_id = smoke_run["parent"], smoke_run["experiment_id"]
    assert parent["info"]["status"] == "FINISHED"
    tags = _tags(parent)
    assert tags.get("selfattn.pipeline_run_id"), tags
    params = {p["key"] for p in parent["data"]["params"]}
    assert params, "the parent run has no params"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}

    # one nested run per stage, in the same experiment, children of the parent
    children = _search_runs(stack, exp_id, f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'")
    stages = {_tags(r).get("selfattn.stage") for r in children}
    assert STAGES <= stages, f"stages logged as nested runs: {sorted(s for s in stages if s)}"
    assert all(r["info"]["status"] == "FINISHED" for r in children)
    # the headline accuracy is the evaluate stage's, a share of the smoke preset's 100 dev rows
    evaluate = next(r for r in children if _tags(r).get("selfattn.stage") == "evaluate")
    assert {m["key"]: m["value"] for m in evaluate["data"]["metrics"]}["accuracy"] == pytest.approx(metrics["accuracy"])
    assert round(metrics["accuracy"] * 100, 6).is_integer(), metrics["accuracy"]

    # step metrics of fine-tuning: a real history, not one value
    finetune = next(r for r in children if _tags(r).get("selfattn.stage") == "finetune")
    keys = {m["key"] for m in finetune["data"]["metrics"]}
    step_key = "train_loss" if "train_loss" in keys else sorted(keys)[0]
    history = mlflow_get(stack, "metrics/get-history", run_id=finetune["info"]["run_id"], metric_key=step_key)["metrics"]
    assert len({m["step"] for m in history}) > 1, history

    # Optuna trials are nested runs too (under the search stage)
    search = next(r for r in children if _tags(r).get("selfattn.stage") == "search")
    trials = _search_runs(stack, exp_id, f"tags.mlflow.parentRunId = '{search['info']['run_id']}'")
    assert trials, "no trial runs under the search stage"

    # artifacts: the resolved config, downloaded through the server's artifact proxy
    listed = mlflow_get(stack, "artifacts/list", run_id=parent["info"]["run_id"], path="config")["files"]
    paths = [f["path"] for f in listed]
    assert "config/resolved.yaml" in paths, paths
    url = (
        f"{stack['mlflow_url']}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{parent['info']['run_id']}"
        "/artifacts/config/resolved.yaml"
    )
    with urllib.request.urlopen(url, timeout=30) as resp:
        resolved = yaml.safe_load(resp.read())
    assert resolved["name"] == "smoke" and resolved["registry"]["model_name"] == smoke_run["model"]


def test_registered_version_and_aliases(stack, smoke_run):
    model = smoke_run["model"]
    versions = mlflow_get(stack, "model-versions/search", filter=f"name = '{model}'", max_results=100)["model_versions"]
    assert [v["version"] for v in versions] == ["1"]
    v1 = versions[0]
    assert v1["status"] == "READY"
    # the first version is both the challenger and (no champion before it) the champion
    assert _alias_version(stack, model, "challenger") == "1"
    assert _alias_version(stack, model, "champion") == "1"
    # the version knows which pipeline run produced it
    v1 = mlflow_get(stack, "model-versions/get", name=model, version="1")["model_version"]
    vtags = {t["key"]: t["value"] for t in v1.get("tags", [])}
    assert vtags.get("selfattn.pipeline_run_id") == _tags(smoke_run["parent"])["selfattn.pipeline_run_id"]


# --------------------------------------------------------------------------- Prefect


def _flow_runs(stack: dict, flow_name: str) -> list[dict]:
    body = {"flows": {"name": {"any_": [flow_name]}}, "limit": 100}
    return http_json("POST", f"{stack['prefect_api_url']}/flow_runs/filter", body)  # type: ignore[return-value]


def test_flow_run_recorded_in_prefect_server(stack, smoke_run):
    runs = _flow_runs(stack, FLOW_NAME)
    completed = [r for r in runs if r["state_type"] == "COMPLETED"]
    assert len(completed) == 1, [(r["name"], r["state_type"]) for r in runs]
    # the MLflow parent run is tagged with this very Prefect flow run
    assert completed[0]["id"] == _tags(smoke_run["parent"])["selfattn.pipeline_run_id"]
    # the stage sub-flows ran as child flow runs of it
    for stage in ("validate", "pretrain", "finetune"):
        children = [r for r in _flow_runs(stack, stage) if r["state_type"] == "COMPLETED"]
        assert children, f"no completed '{stage}' sub-flow run in the Prefect server"


def _prefect(args: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def deployment_run(stack, stack_env, smoke_run) -> dict:
    """The ``smoke`` deployment of infra/prefect.yaml, triggered with ``prefect deployment run``."""
    deploy = _prefect(["deploy", "--prefect-file", "infra/prefect.yaml", "--name", "smoke"], stack_env)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    # a changed fine-tuning budget, so the run trains (and registers) a different model than smoke_run
    run = _prefect(["deployment", "run", f"{FLOW_NAME}/smoke", "--param", f"overrides={json.dumps(DEPLOY_OVERRIDES)}"], stack_env)
    assert run.returncode == 0, run.stdout + run.stderr
    flow_run_id = next(line.split("UUID:")[1].strip() for line in run.stdout.splitlines() if "UUID:" in line)

    def finished():
        fr = http_json("GET", f"{stack['prefect_api_url']}/flow_runs/{flow_run_id}")
        return fr if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    fr = wait_for(finished, timeout=900, what=f"flow run {flow_run_id} of the smoke deployment", interval=3)
    if fr["state_type"] != "COMPLETED":
        log = Path(stack["logs"]["worker"]).read_text(errors="replace")[-6000:]
        pytest.fail(f"deployment run ended {fr['state_type']}: {fr['state'].get('message')}\nworker log:\n{log}")
    return fr


def test_deployment_run_by_worker(stack, smoke_run, deployment_run):
    deployments = http_json("POST", f"{stack['prefect_api_url']}/deployments/filter", {"deployments": {"name": {"any_": ["smoke"]}}})
    assert len(deployments) == 1
    dep = deployments[0]
    assert dep["work_pool_name"] == stack["pool"] and dep["parameters"]["config"] == "smoke"
    assert deployment_run["deployment_id"] == dep["id"]
    assert deployment_run["parameters"] == {"config": "smoke", "overrides": DEPLOY_OVERRIDES}
    assert deployment_run["state_type"] == "COMPLETED"
    # picked up by the stack's process worker (not run in this process)
    assert deployment_run["work_pool_name"] == stack["pool"]

    # its MLflow parent run is in the same experiment, tagged with the flow run id
    parents = _parent_runs(stack, smoke_run["experiment_id"])
    ids = {_tags(r).get("selfattn.pipeline_run_id") for r in parents}
    assert deployment_run["id"] in ids and len(parents) == 2
    # a second registered version that is now the challenger; the champion decision is recorded
    model = smoke_run["model"]
    assert _alias_version(stack, model, "challenger") == "2"
    assert _alias_version(stack, model, "champion") in ("1", "2")


# --------------------------------------------------------------------------- serving


def _post_json(port: int, body: dict) -> dict:
    status, raw = serve_load().post(port, json.dumps(body).encode(), timeout=60)
    assert status == 200, raw[-2000:]
    return json.loads(raw)


def test_mlflow_models_serve_champion_answers_raw_sentences(stack, stack_env, smoke_run, deployment_run, tmp_path):
    model_uri = f"models:/{smoke_run['model']}@champion"
    sl = serve_load()
    server, port = sl.start_server(model_uri, stack_env, tmp_path / "serve.log")
    try:
        sentences = ["a great movie", "awful"]
        served = _post_json(port, {"inputs": sentences})["predictions"]
        split = _post_json(port, {"dataframe_split": {"columns": ["text"], "data": [[s] for s in sentences]}})["predictions"]
    finally:
        sl.stop_server(server)

    assert len(served) == 2
    for row in served:
        probs = {k: v for k, v in row.items() if k.startswith("prob_")}
        assert len(probs) == 2 and sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert row["score"] == pytest.approx(max(probs.values()))
        assert f"prob_{row['label']}" in probs and probs[f"prob_{row['label']}"] == pytest.approx(row["score"])
    assert split == served  # both request formats give the same answer

    # the same model loaded in this process (pyfunc from the registry) predicts the same
    code = (
        "import json, sys, mlflow, pandas as pd\n"
        f"df = mlflow.pyfunc.load_model({model_uri!r}).predict(pd.DataFrame({{'text': {sentences!r}}}))\n"
        "print('PRED=' + json.dumps(df.to_dict(orient='records')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=stack_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = json.loads(next(line[5:] for line in proc.stdout.splitlines() if line.startswith("PRED=")))
    for a, b in zip(served, local):
        assert a["label"] == b["label"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-6)


# --------------------------------------------------------------------------- the MLflow UI


def _headless(url: str, *extra: str, window: str = "1600,1100") -> subprocess.CompletedProcess:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={window}",
           "--virtual-time-budget=25000", *extra, url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, timeout=180)


def test_mlflow_ui_shows_and_compares_the_pipeline_runs(stack, smoke_run, deployment_run, output_dir):
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    exp_id = smoke_run["experiment_id"]
    parents = _parent_runs(stack, exp_id)
    names = [r["info"]["run_name"] for r in parents]
    run_ids = [r["info"]["run_id"] for r in parents]
    assert len(names) == 2

    pages = {
        "mlflow_ui_runs.png": f"{stack['mlflow_url']}/#/experiments/{exp_id}/runs",
        "mlflow_ui_compare.png": (
            f"{stack['mlflow_url']}/#/compare-runs?runs={urllib.parse.quote(json.dumps(run_ids))}"
            f"&experiments={urllib.parse.quote(json.dumps([exp_id]))}"
        ),
    }
    for png, url in pages.items():
        shot = _headless(url, f"--screenshot={output_dir / png}")
        assert (output_dir / png).is_file() and (output_dir / png).stat().st_size > 10_000, shot.stderr[-2000:]
        dom = _headless(url, "--dump-dom").stdout.decode(errors="replace")
        for name in names:
            assert name in dom, f"{name} not on {url}"
    compare_dom = _headless(pages["mlflow_ui_compare.png"], "--dump-dom").stdout.decode(errors="replace")
    assert "Comparing 2 Runs" in compare_dom and "accuracy" in compare_dom
