"""The evaluate stage: calibration (on its own copy of the model), behaviour results declared and
logged, and the model that registration logs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from flows.config import PipelineConfig
from flows.stages import evaluate
from flows.stages.base import StageOutput
from selfattn.eval.calibration import temperature_of

NAME = "slice-model"


def _tsv(path, n, offset=0):
    words = ["a gripping , beautifully acted film .", "a dull , lifeless mess .", "not much fun", "boring and long"]
    lines = ["sentence\tlabel"] + [f"{words[i % 4]} {i + offset}\t{int(i % 4 == 0)}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _upstream(tiny_classifier_dir: Path, tmp_path: Path) -> tuple[StageOutput, StageOutput]:
    """A data stage (train 40 rows, dev 16) and a finished fine-tune stage whose ``best_dir`` is
    a copy of the tiny classifier, laid out as the real stage is (``<dir>/train/best``)."""
    ft_dir = tmp_path / "finetune"
    model_dir = ft_dir / "train" / "best"
    shutil.copytree(tiny_classifier_dir, model_dir)
    (ft_dir / "history.json").write_text("[]")
    train, dev = _tsv(tmp_path / "train.tsv", 40), _tsv(tmp_path / "dev.tsv", 16, offset=100)
    data = StageOutput(stage="data", key="d", dir=str(tmp_path), result={"files": {"dev.tsv": str(dev)}, "digests": {"dev.tsv": "0" * 64}})
    train_data = {"train_path": str(train), "val_path": None, "val_fraction": 0.5, "labels": [0, 1], "max_length": 48}
    result = {"best_dir": str(model_dir), "config": {"data": train_data}, "history": str(ft_dir / "history.json")}
    return data, StageOutput(stage="finetune", key="f", dir=str(ft_dir), result=result)


def _file_digests(root: str | Path) -> dict[str, str]:
    """SHA-256 of every file under ``root``, by relative path (a new or removed file shows too)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _temperature(model_dir: str | Path) -> float:
    return temperature_of(json.loads((Path(model_dir) / "config.json").read_text())["extra"])


def test_evaluate_stage_calibrates_on_holdout_and_logs_the_behaviour_table(tiny_classifier_dir, mlflow_home, experiment_id, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    data, ft = _upstream(tiny_classifier_dir, tmp_path)
    dev, train_data = data.result["files"]["dev.tsv"], ft.result["config"]["data"]
    before = _file_digests(ft.dir)
    cfg = PipelineConfig.model_validate({"evaluation": {"behaviour_cases": 10, "length_bins": [4]}})

    out = evaluate.evaluate_stage(cfg, data, ft, mlflow_home)
    m = out.result["metrics"]
    # the temperature is in the stage's own copy; the fine-tune's directory is byte for byte as it was
    assert Path(out.result["model_dir"]) == Path(out.dir) / "model"
    t = _temperature(out.result["model_dir"])
    assert m["calibration.temperature"] == pytest.approx(t) and t != 1.0
    assert _file_digests(ft.dir) == before and _temperature(ft.result["best_dir"]) == 1.0
    assert m["calibration.heldout_n"] == 20  # half of train, not dev's 16 rows
    assert m["calibration.heldout_nll_after"] <= m["calibration.heldout_nll_before"] + 1e-9
    assert "ece_uncalibrated" in m and 0.0 <= m["ece"] <= 1.0  # dev scored with the temperature
    for test in ("negation", "intensifier", "contrast", "names", "typos"):
        assert 0.0 <= m[f"behaviour.{test}.failure_rate"] <= 1.0 and m[f"behaviour.{test}.n"] > 0
    assert m["slice.negation.n"] + m["slice.no_negation.n"] == 16 == m["slice.len_le4.n"] + m["slice.len_gt4.n"]

    from flows.tracking.runs import log

    # what the stage declared, as log_stage records it: the table beside the files, headline metrics apart
    assert "behaviour.negation.n" in out.log.metrics and "behaviour.negation.n" not in out.log.pipeline.metrics
    assert out.log.pipeline.metrics["accuracy"] == m["accuracy"]
    with mlflow.start_run(experiment_id=experiment_id) as run:
        log(run.info.run_id, out.log)
    client = MlflowClient()
    assert client.get_run(run.info.run_id).data.metrics["calibration.temperature"] == pytest.approx(t)
    files = {f.path for f in client.list_artifacts(run.info.run_id, "behaviour")}
    assert {"behaviour/cases.json", "behaviour/cases.tsv", "behaviour/summary.json"} <= files
    # the table artifact as mlflow.log_table wrote it (mlflow.load_table searches only the active experiment)
    import pandas as pd

    logged = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/behaviour/cases.json")
    table = pd.DataFrame(logged["data"], columns=logged["columns"])
    assert len(table) == sum(int(m[f"behaviour.{t}.n"]) for t in ("negation", "intensifier", "contrast", "names", "typos"))
    assert table["failed"].sum() == round(sum(m[f"behaviour.{t}.failure_rate"] * m[f"behaviour.{t}.n"] for t in ("negation", "intensifier", "contrast", "names", "typos")))

    # turned off: no temperature is left in the model, no behaviour files
    calibrated = shutil.copytree(out.result["model_dir"], tmp_path / "calibrated")
    off = PipelineConfig.model_validate({"evaluation": {"calibrate": False, "behaviour": False}})
    assert evaluate.calibrate(off, calibrated, train_data, dev) == {}
    assert _temperature(calibrated) == 1.0
    assert evaluate.behaviour(off, calibrated, dev, tmp_path / "off") == {} and not (tmp_path / "off").exists()


def test_a_cached_evaluate_stage_still_registers_the_model_it_scored(tiny_classifier_dir, mlflow_home, tmp_path, monkeypatch):
    """calibrate on -> off -> on: the third run reuses the first evaluate stage (a cache hit), and
    the model registered with its metrics holds the temperature those metrics were computed with,
    although the run in between evaluated the same fine-tune without one."""
    import mlflow

    from flows import pipeline
    from flows.tracking import runs

    data, ft = _upstream(tiny_classifier_dir, tmp_path)
    before = _file_digests(ft.dir)
    on = PipelineConfig.model_validate({"evaluation": {"calibrate": True, "behaviour": False}, "registry": {"model_name": NAME}})
    off = on.model_copy(update={"evaluation": on.evaluation.model_copy(update={"calibrate": False})})

    first = evaluate.evaluate_stage(on, data, ft, mlflow_home)
    plain = evaluate.evaluate_stage(off, data, ft, mlflow_home)
    again = evaluate.evaluate_stage(on, data, ft, mlflow_home)
    assert not first.cached and not plain.cached and again.cached and again.key == first.key != plain.key
    reported = again.result["metrics"]["calibration.temperature"]
    assert reported != 1.0 and "calibration.temperature" not in plain.result["metrics"]
    assert _file_digests(ft.dir) == before  # neither run wrote into the fine-tune stage

    # register_flow as the pipeline runs it, its Prefect tasks called as plain functions
    for name in ("log_model_task", "register_task", "gate_task"):
        monkeypatch.setattr(pipeline, name, getattr(pipeline, name).fn)
    experiment_id = runs.ensure_experiment("evaluate-copy", mlflow_home)  # artifacts under the home
    with mlflow.start_run(experiment_id=experiment_id) as parent:
        ctx = runs.RunContext(home=str(mlflow_home), experiment_id=experiment_id, parent_run_id=parent.info.run_id, pipeline_run_id="p1")
        reg = pipeline.register_flow.fn(on, ft, again, ctx)
    registered = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}/{reg['version']}"))
    configs = [p for p in registered.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
    assert len(configs) == 1 and _temperature(configs[0].parent) == pytest.approx(reported)
    assert _temperature(again.result["model_dir"]) == pytest.approx(reported)
    assert _temperature(plain.result["model_dir"]) == 1.0


def test_calibration_refuses_the_dev_file(tiny_classifier_dir, tmp_path, selfattn_home):
    from selfattn.errors import UserError

    dev = _tsv(tmp_path / "dev.tsv", 8)
    with pytest.raises(UserError, match="dev file"):
        evaluate.calibrate(PipelineConfig(), tiny_classifier_dir, {"train_path": str(dev), "val_path": str(dev)}, dev)


def test_promotion_slices_are_off_by_default_and_validated():
    from selfattn.config import load_config
    from selfattn.errors import UserError

    assert PipelineConfig().promotion.slices == {}
    cfg = load_config(PipelineConfig, None, ["promotion.slices={negation: 0.02}"])
    assert cfg.promotion.slices == {"negation": 0.02}
    with pytest.raises(UserError, match="evaluation"):
        load_config(PipelineConfig, None, ["evaluation.behaviour_cases=0"])
