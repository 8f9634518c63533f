"""Pipeline config: presets, overrides, refusals before any work, where the stores live."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import (
    PipelineConfig,
    load_pipeline_config,
    mlflow_tracking_uri,
    optuna_storage_url,
    resolve_local_path,
    selfattn_home as home_dir,
)
from selfattn.errors import UserError


@pytest.mark.parametrize("preset", ["smoke", "demo"])
def test_presets_load_and_validate_against_the_engine(preset):
    from selfattn.train import FinetuneConfig, PretrainConfig

    cfg = load_pipeline_config(preset)
    assert cfg.name == preset and cfg.search.space and cfg.search.n_trials >= 2
    PretrainConfig.model_validate({**cfg.pretrain, "data": {**cfg.pretrain["data"], "path": "x.txt"}})
    FinetuneConfig.model_validate({**cfg.finetune, "data": {**cfg.finetune["data"], "train_path": "t.tsv"}, "init_from": "."})


def test_overrides_apply_with_yaml_types():
    cfg = load_pipeline_config("smoke", ["search.n_trials=5", "promotion.margin=0.02", "pretrain.train.max_steps=7"])
    assert cfg.search.n_trials == 5 and cfg.promotion.margin == 0.02 and cfg.pretrain["train"]["max_steps"] == 7


@pytest.mark.parametrize(
    "override, named",
    [
        ("train.lr=1", "'train'"),
        ("search.n_trialz=3", "search.n_trialz"),
        ("pretrain.train.max_stepz=3", "pretrain.train.max_stepz"),
        ("finetune.optim.lrr=0.1", "finetune.optim.lrr"),
    ],
)
def test_unknown_keys_are_refused_naming_them(override, named):
    with pytest.raises(UserError, match="unknown") as err:
        load_pipeline_config("smoke", [override])
    assert named in str(err.value)


@pytest.mark.parametrize(
    "override, named",
    [
        ("pretrain.optim.lr=-1", "pretrain.optim.lr"),
        ("pretrain.model.n_heads=3", "n_heads (3) must divide d_model (32)"),
        ("search.n_trials=many", "search.n_trials"),
        ("promotion.margin=-0.1", "promotion.margin"),
    ],
)
def test_bad_values_are_refused_naming_key_and_value(override, named):
    with pytest.raises(UserError) as err:
        load_pipeline_config("smoke", [override])
    assert named in str(err.value)


def test_search_space_keys_are_checked_against_the_finetune_config(tmp_path):
    text = (Path(__file__).resolve().parents[3] / "flows/presets/smoke.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace("optim.weight_decay: {type", "optim.weight_decayy: {type"))
    with pytest.raises(UserError, match="weight_decayy"):
        load_pipeline_config(bad)
    with pytest.raises(UserError, match="neither a preset"):
        load_pipeline_config(tmp_path / "missing.yaml")


def test_stores_default_under_home_and_the_standard_variable_wins(selfattn_home, monkeypatch):
    cfg = PipelineConfig()
    assert home_dir() == selfattn_home.resolve()
    assert mlflow_tracking_uri() == f"sqlite:///{selfattn_home / 'mlflow.db'}"
    assert optuna_storage_url(cfg) == f"sqlite:///{selfattn_home / 'optuna.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_tracking_uri() == "http://mlflow.example:5000"
    cfg2 = PipelineConfig.model_validate({"search": {"storage": "postgresql://u@h/db"}})
    assert optuna_storage_url(cfg2) == "postgresql://u@h/db"
    monkeypatch.delenv("SELFATTN_HOME")
    assert home_dir() == (Path.cwd() / ".selfattn").resolve()


def test_paths_outside_the_allowed_roots_are_refused(selfattn_home, monkeypatch, tmp_path):
    data = tmp_path / "data"
    (data / "sst2").mkdir(parents=True)
    (data / "sst2" / "train.tsv").write_text("sentence\tlabel\nok\t1\n")
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data))
    assert resolve_local_path("sst2/train.tsv") == (data / "sst2" / "train.tsv").resolve()
    with pytest.raises(UserError, match="outside the allowed roots"):
        resolve_local_path("../../../../etc/passwd")
    with pytest.raises(UserError, match="not found"):
        resolve_local_path("sst2/nope.tsv")
