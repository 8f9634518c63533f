"""The evaluate stage's calibration and behaviour results in MLflow, and the gate's slice rule."""

from __future__ import annotations

import json
import shutil

import pytest

from flows import behaviour_stage, registry, stages
from flows.config import PipelineConfig
from flows.stages import StageOutput
from selfattn.calibration import temperature_of

NAME = "slice-model"


def _tsv(path, n, offset=0):
    words = ["a gripping , beautifully acted film .", "a dull , lifeless mess .", "not much fun", "boring and long"]
    lines = ["sentence\tlabel"] + [f"{words[i % 4]} {i + offset}\t{int(i % 4 == 0)}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_stage_calibrates_on_holdout_and_logs_the_behaviour_table(tiny_classifier_dir, mlflow_home, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    model_dir = tmp_path / "best"
    shutil.copytree(tiny_classifier_dir, model_dir)
    train, dev = _tsv(tmp_path / "train.tsv", 40), _tsv(tmp_path / "dev.tsv", 16, offset=100)
    (tmp_path / "history.json").write_text("[]")
    cfg = PipelineConfig.model_validate({"evaluation": {"behaviour_cases": 10, "length_bins": [4]}})
    data = StageOutput(stage="data", key="d", dir=str(tmp_path), result={"files": {"dev.tsv": str(dev)}, "digests": {"dev.tsv": "0" * 64}})
    train_data = {"train_path": str(train), "val_path": None, "val_fraction": 0.5, "labels": [0, 1], "max_length": 48}
    ft = StageOutput(stage="finetune", key="f", dir=str(tmp_path), result={"best_dir": str(model_dir), "config": {"data": train_data}, "history": str(tmp_path / "history.json")})

    out = stages.evaluate_stage(cfg, data, ft, mlflow_home)
    m = out.result["metrics"]
    t = temperature_of(json.loads((model_dir / "config.json").read_text())["extra"])
    assert m["calibration.temperature"] == pytest.approx(t) and t != 1.0
    assert m["calibration.heldout_n"] == 20  # half of train, not dev's 16 rows
    assert m["calibration.heldout_nll_after"] <= m["calibration.heldout_nll_before"] + 1e-9
    assert "ece_uncalibrated" in m and 0.0 <= m["ece"] <= 1.0  # dev scored with the temperature
    for test in ("negation", "intensifier", "contrast", "names", "typos"):
        assert 0.0 <= m[f"behaviour.{test}.failure_rate"] <= 1.0 and m[f"behaviour.{test}.n"] > 0
    assert m["slice.negation.n"] + m["slice.no_negation.n"] == 16 == m["slice.len_le4.n"] + m["slice.len_gt4.n"]

    with mlflow.start_run() as run:
        behaviour_stage.log_results(out.result)
    client = MlflowClient()
    files = {f.path for f in client.list_artifacts(run.info.run_id, "behaviour")}
    assert {"behaviour/cases.json", "behaviour/cases.tsv", "behaviour/summary.json"} <= files
    table = mlflow.load_table("behaviour/cases.json", run_ids=[run.info.run_id])
    assert len(table) == sum(int(m[f"behaviour.{t}.n"]) for t in ("negation", "intensifier", "contrast", "names", "typos"))
    assert table["failed"].sum() == round(sum(m[f"behaviour.{t}.failure_rate"] * m[f"behaviour.{t}.n"] for t in ("negation", "intensifier", "contrast", "names", "typos")))

    # turned off: no temperature is left in the model, no behaviour files
    off = PipelineConfig.model_validate({"evaluation": {"calibrate": False, "behaviour": False}})
    assert behaviour_stage.calibrate(off, model_dir, train_data, dev) == {}
    assert temperature_of(json.loads((model_dir / "config.json").read_text())["extra"]) == 1.0
    assert behaviour_stage.behaviour(off, model_dir, dev, tmp_path / "off") == {} and not (tmp_path / "off").exists()


def test_calibration_refuses_the_dev_file(tiny_classifier_dir, tmp_path, selfattn_home):
    from selfattn.errors import UserError

    dev = _tsv(tmp_path / "dev.tsv", 8)
    with pytest.raises(UserError, match="dev file"):
        behaviour_stage.calibrate(PipelineConfig(), tiny_classifier_dir, {"train_path": str(dev), "val_path": str(dev)}, dev)


@pytest.fixture()
def model_uri(tiny_classifier_dir, mlflow_home):
    import mlflow

    from flows.serving import log_model

    with mlflow.start_run():
        return log_model(str(tiny_classifier_dir)).model_uri


def _register(uri, key, score, negation, home):
    tags = {registry.TAG_METRIC: "accuracy", registry.TAG_SCORE: f"{score}", registry.TAG_EVAL_DIGEST: "d1"}
    if negation is not None:
        tags["eval.slice.negation.accuracy"] = f"{negation}"
    return str(registry.register(model_uri=uri, model_name=NAME, run_key=key, tags=tags, home=home).version)


def test_gate_refuses_a_slice_regression_only_when_asked(model_uri, mlflow_home):
    v1 = _register(model_uri, "k1", 0.70, 0.80, mlflow_home)
    assert registry.gate(model_name=NAME, version=v1, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negation": 0.02}).promoted

    # better overall, but 0.10 worse on negation: refused with the slice named
    v2 = _register(model_uri, "k2", 0.75, 0.70, mlflow_home)
    d2 = registry.gate(model_name=NAME, version=v2, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negation": 0.02})
    assert not d2.promoted and "slice 'negation'" in d2.reason and "0.7000" in d2.reason
    assert registry.describe(NAME)["aliases"]["champion"] == v1
    # within the allowed loss: promoted
    v3 = _register(model_uri, "k3", 0.76, 0.79, mlflow_home)
    d3 = registry.gate(model_name=NAME, version=v3, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negation": 0.02})
    assert d3.promoted and "no guarded slice regressed" in d3.reason
    # a misspelt slice refuses, naming it; off (the default), the same regression is promoted
    v4 = _register(model_uri, "k4", 0.80, 0.50, mlflow_home)
    d4 = registry.gate(model_name=NAME, version=v4, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negatoin": 0.02})
    assert not d4.promoted and "'negatoin'" in d4.reason
    assert registry.gate(model_name=NAME, version=v4, metric="accuracy", margin=0.0, home=mlflow_home).promoted


def test_promotion_slices_are_off_by_default_and_validated():
    from selfattn.errors import UserError
    from selfattn.config import load_config

    assert PipelineConfig().promotion.slices == {}
    cfg = load_config(PipelineConfig, None, ["promotion.slices={negation: 0.02}"])
    assert cfg.promotion.slices == {"negation": 0.02}
    with pytest.raises(UserError, match="evaluation"):
        load_config(PipelineConfig, None, ["evaluation.behaviour_cases=0"])
