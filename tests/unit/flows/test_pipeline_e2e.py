"""The smoke pipeline end to end under ``prefect_test_harness`` with real training, MLflow and Optuna.

One session-scoped fixture runs the pipeline three times on a private SELFATTN_HOME and the
assertions below share the results:

1. ``smoke`` -> version 1, challenger, and champion (there is none yet);
2. ``smoke`` with a longer study (3 trials), a shorter fine-tune, a fixed weight decay and
   ``promotion.margin=1.0`` (no accuracy can beat the champion by 1.0, so the outcome is
   deterministic) -> data and pretraining come from the cache, the study continues, version 2
   is challenger only;
3. a training file with an unknown label -> the data gate stops the run, nothing is trained or
   registered, the failed MLflow run holds the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODEL = "selfattn-sst2-smoke"
# finetune.optim.weight_decay is searched by the preset: this --set fixes it
SECOND = ["search.n_trials=3", "finetune.train.max_steps=8", "promotion.margin=1.0", "finetune.optim.weight_decay=0.05"]


@pytest.fixture(scope="session")
def smoke(tmp_path_factory, data_dir):
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from selfattn.errors import UserError

    home = tmp_path_factory.mktemp("pipeline") / "home"
    home.mkdir()
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFATTN_HOME", str(home))
        mp.setenv("SELFATTN_DATA_DIR", str(data_dir))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        with prefect_test_harness(server_startup_timeout=120):
            first = pipeline("smoke")
            summary = _summary_artifact()
            second = pipeline("smoke", overrides=SECOND)
            bad = home / "bad_train.tsv"
            rows = ["sentence\tlabel"] + [f"a fine sentence number {i} .\t{i % 2}" for i in range(60)] + ["an unknown label\t7"] * 5
            bad.write_text("\n".join(rows) + "\n", encoding="utf-8")
            with pytest.raises(UserError) as failed:
                pipeline("smoke", overrides=[f"data.train={bad}", "data.train_rows=null"])
        yield {"home": home, "first": first, "second": second, "failed": failed.value, "uri": mlflow.get_tracking_uri(), "summary": summary}
        mlflow.set_tracking_uri(before)


def _summary_artifact() -> str:
    """The latest Prefect markdown artifact the pipeline published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["selfattn-pipeline-summary"])))
    return arts[-1].data if arts else ""


@pytest.fixture()
def client(smoke):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(smoke["uri"])
    return MlflowClient(tracking_uri=smoke["uri"], registry_uri=smoke["uri"])


def _runs(client, first):
    exp = first.experiment_id
    runs = client.search_runs([exp], filter_string=f"tags.`selfattn.pipeline_run_id` = '{first.pipeline_run_id}'", max_results=500)
    return {r.info.run_id: r for r in runs}


def test_parent_and_nested_runs(smoke, client):
    first = smoke["first"]
    runs = _runs(client, first)
    parent = runs[first.mlflow_run_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.n_trials"] == "2" and parent.data.params["registry.model_name"] == MODEL
    assert parent.data.tags["selfattn.data_digest"] == first.stages["data"].result["digest"]
    assert parent.data.metrics["accuracy"] == pytest.approx(first.metrics["accuracy"])
    stages = {r.data.tags.get("selfattn.stage"): r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == {"validate", "pretrain", "search", "finetune", "evaluate", "register"}
    assert all(r.info.status == "FINISHED" for r in stages.values())
    trials = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == stages["search"].info.run_id]
    assert len(trials) == 2 and all("optim.lr" in t.data.params for t in trials)
    # step metrics were batched but every step is there
    history = client.get_metric_history(stages["pretrain"].info.run_id, "train_loss")
    assert [m.step for m in history] == [5, 10, 15, 20]
    assert stages["pretrain"].data.params["train.max_steps"] == "20"
    # datasets with digest and source
    inputs = stages["validate"].inputs.dataset_inputs
    names = {d.dataset.name: d.dataset for d in inputs}
    assert set(names) == {"corpus", "sst2-train", "sst2-dev"}
    assert names["sst2-dev"].digest == first.stages["data"].result["digests"]["dev.tsv"][:36]


def test_artifacts(smoke, client):
    first = smoke["first"]
    runs = _runs(client, first)
    parent = runs[first.mlflow_run_id]

    def files(run_id, path=""):
        out = []
        for f in client.list_artifacts(run_id, path):
            out += files(run_id, f.path) if f.is_dir else [f.path]
        return out

    assert {"config/resolved.yaml", "summary.md", "pipeline_result.json"} <= set(files(parent.info.run_id))
    by_stage = {r.data.tags.get("selfattn.stage"): r.info.run_id for r in runs.values()}
    validate = files(by_stage["validate"])
    assert "validation/report.json" in validate and any(f.startswith("validation/data_docs/") and f.endswith("index.html") for f in validate)
    assert any(f.startswith("tokenizer/") for f in files(by_stage["pretrain"]))
    plots = {Path(f).name for f in files(by_stage["evaluate"])}
    assert {"confusion_matrix.png", "reliability.png"} <= plots and any("attention" in p for p in plots)
    assert "examples.html" in plots  # explained dev examples (most confident right and wrong)
    assert "optuna_history.png" in {Path(f).name for f in files(by_stage["search"])}
    resolved = client.download_artifacts(parent.info.run_id, "config/resolved.yaml")
    assert "selfattn-smoke" in Path(resolved).read_text()


def test_registry_champion_and_challenger(smoke, client):
    first, second = smoke["first"], smoke["second"]
    assert first.model_version == "1" and first.decision["promoted"]
    assert second.model_version == "2" and not second.decision["promoted"]
    rm = client.get_registered_model(MODEL)
    aliases = {k: str(v) for k, v in rm.aliases.items()}
    assert aliases["challenger"] == "2"
    v2 = client.get_model_version(MODEL, "2").tags
    assert v2["promotion.decision"] == "rejected" and v2["promotion.champion_version"] == "1"
    assert float(v2["promotion.champion_score"]) == pytest.approx(first.metrics["accuracy"], abs=1e-6)
    assert float(v2["promotion.challenger_score"]) == pytest.approx(second.metrics["accuracy"], abs=1e-6)
    assert v2["selfattn.pipeline_run_id"] == second.pipeline_run_id


def test_the_registered_model_is_the_evaluate_stage_calibrated_copy(smoke, client):
    import mlflow

    from selfattn.eval.calibration import temperature_of
    from selfattn.io.checkpoint import load_pretrained

    first = smoke["first"]
    reported = first.metrics["calibration.temperature"]
    registered = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{MODEL}/1"))
    [config] = [p for p in registered.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
    assert temperature_of(load_pretrained(config.parent).extra) == pytest.approx(reported)
    evaluated = Path(first.stages["evaluate"].result["model_dir"])
    assert evaluated.parent == Path(first.stages["evaluate"].dir)
    assert temperature_of(load_pretrained(evaluated).extra) == pytest.approx(reported)
    assert temperature_of(load_pretrained(first.stages["finetune"].result["best_dir"]).extra) == 1.0  # never written


def test_second_run_reuses_finished_stages_and_continues_the_study(smoke):
    import optuna

    from flows import tuning

    second = smoke["second"]
    assert second.stages["data"].cached and second.stages["pretrain"].cached
    assert second.stages["pretrain"].dir == smoke["first"].stages["pretrain"].dir
    assert not second.stages["search"].cached and not second.stages["finetune"].cached
    study = optuna.load_study(study_name="selfattn-smoke", storage=tuning.open_storage(f"journal:///{smoke['home'] / 'optuna.journal'}"))
    states = [t.state.name for t in study.trials]
    assert len(states) == 3 and all(s in ("COMPLETE", "PRUNED") for s in states)
    assert second.stages["search"].result["n_trials"] == 3


def test_a_set_of_a_searched_key_is_logged_as_fixed_and_used(smoke, client):
    second = smoke["second"]
    parent = client.get_run(second.mlflow_run_id)
    assert parent.data.params["search.fixed.optim.weight_decay"] == "0.05"
    assert "search.space.optim.weight_decay.high" not in parent.data.params
    runs = _runs(client, second).values()
    finetune = [r for r in runs if r.data.tags.get("selfattn.stage") == "finetune"]
    assert len(finetune) == 1 and finetune[0].data.params["optim.weight_decay"] == "0.05"
    trials = [r for r in runs if r.data.tags.get("selfattn.stage") == "trial" and r.data.params]
    assert trials and all("optim.weight_decay" not in r.data.params and "optim.lr" in r.data.params for r in trials)


def test_failed_data_check_stops_before_training(smoke, client):
    err = smoke["failed"]
    assert "data checks failed" in str(err)
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    exp = smoke["first"].experiment_id
    failed = client.search_runs([exp], filter_string="attributes.status = 'FAILED' and tags.`selfattn.stage` = 'validate'")
    assert len(failed) == 1
    parent_id = failed[0].data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "FAILED"
    report = json.loads(Path(client.download_artifacts(parent_id, "validation/report.json")).read_text())
    assert report["train"]["passed"] is False
    runs = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert {r.data.tags["selfattn.stage"] for r in runs} == {"validate"}  # no training stage started


def test_promote_rollback_predict_cli(smoke, client, monkeypatch, capsys):
    from selfattn.cli import main

    monkeypatch.setenv("SELFATTN_HOME", str(smoke["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["promote", MODEL, "2"]) == 0
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "2"
    assert main(["rollback", MODEL]) == 0
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"
    capsys.readouterr()
    assert main(["predict", "--model", f"models:/{MODEL}@champion", "--json", "a gripping , beautifully acted film .", ""]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 2 and all(abs(r["prob_0"] + r["prob_1"] - 1) < 1e-5 for r in lines)
    assert lines[1]["warning"].startswith("empty input")


def test_prefect_summary_artifact(smoke):
    md = smoke["summary"]
    first = smoke["first"]
    assert "| pretrain | no |" in md and "| accuracy |" in md
    assert "promoted to champion" in md and first.mlflow_run_id in md


# --------------------------------------------------------------------------- nothing to do: `selfattn run` on a finished config


def _config(*overrides: str):
    from flows.config import load_pipeline_config

    return load_pipeline_config("smoke", list(overrides))


def test_the_stage_lookup_finds_each_finished_run_and_nothing_else(smoke, data_dir, monkeypatch):
    from flows.stages.lookup import completed

    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    home = smoke["home"]
    for run, overrides in ((smoke["first"], ()), (smoke["second"], SECOND)):
        found = completed(_config(*overrides), home)
        assert found is not None and {k: v.key for k, v in found.items()} == {k: v.key for k, v in run.stages.items()}
        assert all(out.cached for out in found.values())
    assert completed(_config("finetune.train.max_steps=9"), home) is None  # a fine-tune that never ran
    assert completed(_config("evaluation.behaviour=false"), home) is None  # only the evaluation differs
    marker = Path(smoke["first"].stages["evaluate"].dir) / "_SUCCESS"
    hidden = marker.with_name("_SUCCESS.hidden")
    marker.rename(hidden)
    try:
        assert completed(_config(), home) is None  # a stage whose marker is gone would run again
    finally:
        hidden.rename(marker)


def test_up_to_date_reports_the_earlier_run_and_the_registry_now(smoke, data_dir, monkeypatch):
    from flows import uptodate

    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    monkeypatch.setenv("SELFATTN_HOME", str(smoke["home"]))
    home, first, second = smoke["home"], smoke["first"], smoke["second"]
    found = uptodate.find(_config(), home)
    assert found is not None and found.result.pipeline_run_id == first.pipeline_run_id
    assert (found.result.model_version, found.champion) == ("1", "1")
    lines = uptodate.console(found, "selfattn ui")
    assert lines[0].startswith(f"up to date: every stage of this config, code and data finished earlier in pipeline run {first.pipeline_run_id}")
    assert f"model {MODEL} v1: the champion" in lines
    stage_lines = [line.split() for line in lines if line.startswith("  ") and line.split()[0] in first.stages]
    assert [(s[0], s[1]) for s in stage_lines] == [(name, "cached") for name in first.stages]
    assert f'selfattn predict --model models:/{MODEL}@champion "a gripping , beautifully acted film ."' in "\n".join(lines)
    later = uptodate.find(_config(*SECOND), home)
    assert later is not None and later.result.pipeline_run_id == second.pipeline_run_id and later.result.model_version == "2"
    assert f"model {MODEL} v2: registered, not the champion (the champion is v1)" in uptodate.console(later, "selfattn ui")
    # what a run would do differently is never "up to date": another registered name, another experiment
    assert uptodate.find(_config("registry.model_name=another-model"), home) is None
    assert uptodate.find(_config("tracking.experiment=another-experiment"), home) is None
    assert uptodate.find(_config("finetune.train.max_steps=9"), home) is None
    assert uptodate.find(_config("promotion.margin=0.5"), home) is None  # every stage cached, but the gate would decide anew


def test_run_on_a_finished_config_says_so_without_starting_prefect(smoke, data_dir):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(SELFATTN_HOME=str(smoke["home"]), SELFATTN_DATA_DIR=str(data_dir))
    code = "import sys; from selfattn.cli import main; rc = main(['run', '--config', 'smoke']); print('exit', rc, 'prefect' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.rstrip().endswith("exit 0 False"), done.stdout + done.stderr
    assert f"finished earlier in pipeline run {smoke['first'].pipeline_run_id}" in done.stdout
    assert "> validate" not in done.stdout + done.stderr  # no stage started
