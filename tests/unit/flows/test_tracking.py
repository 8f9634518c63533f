"""MLflow helpers: batched step metrics, stale RUNNING runs marked KILLED, nested stage runs."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_callback_batches_steps_and_logs_every_step(mlflow_home):
    import mlflow
    from mlflow import MlflowClient

    from flows import tracking

    exp = tracking.ensure_experiment("unit", mlflow_home)
    client = MlflowClient()
    run = client.create_run(exp)
    cb = tracking.MlflowCallback(run_id=run.info.run_id, log_every=3)
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

    from flows import tracking

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


def test_stage_run_nests_and_fails_on_error(mlflow_home):
    import mlflow
    from mlflow import MlflowClient

    from flows import tracking

    exp = tracking.ensure_experiment("unit-nest", mlflow_home)
    with mlflow.start_run(experiment_id=exp) as parent:
        with tracking.stage_run("a", parent_run_id=parent.info.run_id, experiment_id=exp, params={"x": {"y": 1}}) as a:
            pass
        with pytest.raises(RuntimeError):
            with tracking.stage_run("b", parent_run_id=parent.info.run_id, experiment_id=exp) as b:
                raise RuntimeError("boom")
    client = MlflowClient()
    ra, rb = client.get_run(a.info.run_id), client.get_run(b.info.run_id)
    assert ra.data.tags["mlflow.parentRunId"] == parent.info.run_id and ra.data.params == {"x.y": "1"}
    assert ra.info.status == "FINISHED" and rb.info.status == "FAILED" and "boom" in rb.data.tags["selfattn.error"]
    assert ra.info.experiment_id == rb.info.experiment_id == exp
    # without an active run (another thread), the parent is set explicitly
    with tracking.stage_run("c", parent_run_id=parent.info.run_id, experiment_id=exp) as c:
        pass
    assert client.get_run(c.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
