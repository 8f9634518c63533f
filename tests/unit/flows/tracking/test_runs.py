"""MLflow runs: batched step metrics, stale RUNNING runs marked KILLED, nested stage runs, log_stage."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_callback_batches_steps_and_logs_every_step(mlflow_home):
    import mlflow
    from mlflow import MlflowClient

    from flows.tracking.callbacks import MlflowCallback
    from flows.tracking.runs import ensure_experiment

    exp = ensure_experiment("unit", mlflow_home)
    client = MlflowClient()
    run = client.create_run(exp)
    cb = MlflowCallback(run_id=run.info.run_id, log_every=3)
    calls = []
    real = cb._client.log_batch
    cb._client.log_batch = lambda *a, **k: (calls.append(len(k.get("metrics", ()))), real(*a, **k))[1]
    cb.on_train_start({"n_params": 123, "task": "lm", "config": {"x": 1}})
    for step in range(1, 8):
        cb.on_step(step, {"train_loss": 1.0 / step, "lr": 0.1})
    cb.on_eval(7, {"val_loss": 0.5, "val_accuracy": 0.75})
    cb.on_train_end(None)
    assert calls == [6, 6, 4]  # 2 metrics x 3 steps, twice; then the rest + the eval
    hist = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in hist] == list(range(1, 8))
    data = client.get_run(run.info.run_id).data
    assert data.metrics["val_accuracy"] == 0.75 and data.params["info.n_params"] == "123"
    assert "sqlite" in mlflow.get_tracking_uri()


def test_stale_running_runs_of_dead_processes_are_killed(mlflow_home):
    from mlflow import MlflowClient

    from flows.tracking import runs as tracking

    exp = tracking.ensure_experiment("unit-stale", mlflow_home)
    client = MlflowClient()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = client.create_run(exp, tags={**tracking.process_tags(), tracking.TAG_PID: dead})
    alive = client.create_run(exp, tags=tracking.process_tags())  # this process: a live concurrent run
    other_host = client.create_run(exp, tags={tracking.TAG_HOST: "elsewhere", tracking.TAG_PID: dead})
    assert tracking.mark_stale_runs(exp) == [stale.info.run_id]
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"


def test_stage_run_nests_fails_on_error_and_log_stage_records_the_declarations(mlflow_home, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from flows.stages.base import Artifact, Logged, StageOutput
    from flows.tracking import runs

    exp = runs.ensure_experiment("unit-nest", mlflow_home)
    (tmp_path / "plot.png").write_bytes(b"png")
    (tmp_path / "cases.tsv").write_text("text\tfailed\nnot good\t1\nfine\t0\n")
    logged = Logged(
        params={"x": {"y": 1}}, metrics={"acc": 0.5}, tags={"t": "v"}, dicts={"d.json": {"k": 1}}, texts={"note.txt": "hi"},
        artifacts=[Artifact(path=str(tmp_path / "plot.png"), to="plots")], tables=[{"path": str(tmp_path / "cases.tsv"), "artifact_file": "cases.json"}],
        pipeline=Logged(metrics={"headline": 1.0}),
    )
    out = StageOutput(stage="a", key="k1", dir=str(tmp_path), cached=True, log=logged)
    with mlflow.start_run(experiment_id=exp) as parent:
        ctx = runs.RunContext(home=str(mlflow_home), experiment_id=exp, parent_run_id=parent.info.run_id, pipeline_run_id="p1")
        with runs.stage_run("a", ctx) as a:
            runs.log_stage(a, out, ctx)
        with pytest.raises(RuntimeError):
            with runs.stage_run("b", ctx) as b:
                raise RuntimeError("boom")
    client = MlflowClient()
    ra, rb = client.get_run(a), client.get_run(b)
    assert ra.data.tags["mlflow.parentRunId"] == parent.info.run_id and ra.data.params == {"x.y": "1"}
    assert ra.info.status == "FINISHED" and rb.info.status == "FAILED" and "boom" in rb.data.tags["selfattn.error"]
    assert ra.info.experiment_id == rb.info.experiment_id == exp
    # everything declared, on the stage's run; the pipeline's part on the parent
    assert ra.data.metrics == {"acc": 0.5} and client.get_run(parent.info.run_id).data.metrics == {"headline": 1.0}
    assert {k: ra.data.tags[k] for k in ("t", "selfattn.stage_key", "selfattn.cached", "selfattn.pipeline_run_id")} == {
        "t": "v", "selfattn.stage_key": "k1", "selfattn.cached": "true", "selfattn.pipeline_run_id": "p1"}
    files = {f.path for f in client.list_artifacts(a)} | {f.path for f in client.list_artifacts(a, "plots")}
    assert {"d.json", "note.txt", "cases.json", "plots/plot.png"} <= files
    assert mlflow.artifacts.load_dict(f"runs:/{a}/cases.json")["data"] == [["not good", 1], ["fine", 0]]
    # without an active run (another thread), the parent is set explicitly
    with runs.stage_run("c", ctx) as c:
        pass
    assert client.get_run(c).data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_training_links_open_each_training_experiment_on_its_runs(mlflow_home):
    from mlflow import MlflowClient

    from flows.tracking.runs import ensure_experiment, training_links, ui_url

    exp_id = ensure_experiment("first-hour", mlflow_home)
    MlflowClient().create_experiment("a-genai-app", artifact_location=(mlflow_home / "other").as_uri())
    links = training_links("http://127.0.0.1:5000")
    assert links == [("first-hour", ui_url("http://127.0.0.1:5000", f"experiments/{exp_id}/runs"))]
    assert links[0][1].endswith("?workflowType=machine_learning")
