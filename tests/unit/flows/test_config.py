"""Pipeline config: presets, overrides, refusals before any work, where the stores live."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import PipelineConfig, load_pipeline_config, study_storage_url
from flows.paths import mlflow_tracking_uri, resolve_local_path
from flows.paths import selfattn_home as home_dir
from flows.stages.base import StageOutput
from flows.stages.finetune import finetune_config, finetune_plan
from flows.stages.pretrain import pretrain_config, pretrain_plan
from flows.stages.search import search_plan
from selfattn.errors import UserError
from selfattn.train import FinetuneConfig, PretrainConfig


@pytest.fixture(autouse=True)
def _preset_data_files(tmp_path, monkeypatch):
    """The files the presets name, empty, in a data dir of their own: loading a config checks that
    they exist, not what they hold, so these tests need no real data (a clone away from shared/)."""
    data = tmp_path / "preset_data"
    for name in ("tinyshakespeare/input.txt", "sst2/train.tsv", "sst2/dev.tsv"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).touch()
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data))


@pytest.mark.parametrize("preset", ["smoke", "demo", "scratch"])
def test_presets_load_as_the_engine_configs(preset):
    cfg = load_pipeline_config(preset)
    assert cfg.name == preset and cfg.search.space and cfg.search.n_trials >= 2
    assert isinstance(cfg.pretrain, PretrainConfig) and isinstance(cfg.finetune, FinetuneConfig)
    # the run fills the pipeline-owned keys; the rest comes from the preset
    pre = pretrain_config(cfg, _data())
    ft = finetune_config(cfg, _data(), _pretrained())
    assert pre.data.path == "/d/corpus.txt" and pre.model == cfg.pretrain.model
    assert ft.data.train_path == "/d/train.tsv" and ft.data.val_path is None and ft.init_from == "/p/best"
    assert ft.optim == cfg.finetune.optim and ft.data.text_column == cfg.data.text_column


def test_overrides_apply_with_yaml_types():
    cfg = load_pipeline_config("smoke", ["search.n_trials=5", "promotion.margin=0.02", "pretrain.train.max_steps=7"])
    assert cfg.search.n_trials == 5 and cfg.promotion.margin == 0.02 and cfg.pretrain.train.max_steps == 7


def test_a_set_value_keeps_its_own_equals_signs():
    # only the first '=' separates key and value: a database URL's query string stays intact
    url = "postgresql+psycopg://optuna@db.internal:5432/optuna?sslmode=require&application_name=selfattn"
    cfg = load_pipeline_config("smoke", [f"search.storage={url}", "search.study_name=sst2=v2"])
    assert cfg.search.storage == url and cfg.search.study_name == "sst2=v2"


def _data() -> StageOutput:
    files = {n: f"/d/{n}" for n in ("corpus.txt", "train.tsv", "dev.tsv")}
    return StageOutput(stage="data", key="d", dir="/d", result={"files": files, "digests": {n: n for n in files}})


def _pretrained() -> StageOutput:
    return StageOutput(stage="pretrain", key="p", dir="/p", result={"best_dir": "/p/best"})


def _keys(cfg: PipelineConfig, home: Path) -> dict[str, str]:
    search = StageOutput(stage="search", key="s", dir="/s", result={"best_params": {"head.dropout": 0.1}})
    return {
        "pretrain": pretrain_plan(cfg, _data(), home)[0].key,
        "search": search_plan(cfg, _data(), _pretrained(), home).key,
        "finetune": finetune_plan(cfg, _data(), _pretrained(), search, home)[0].key,
    }


def test_numbers_are_numbers_and_stage_keys_hash_the_validated_values(tmp_path):
    # YAML 1.1 reads 1e-4 as the text '1e-4'; validation makes it the float 0.0001
    text = ["pretrain.optim.lr=1e-4", "finetune.optim.lr=1e-4", "search.trial_overrides.optim.weight_decay=1e-2",
            "search.space[head.dropout]={type: categorical, choices: [0.0, 1e-1]}", "search.space[optim.lr].low=1e-5"]
    plain = ["pretrain.optim.lr=0.0001", "finetune.optim.lr=0.0001", "search.trial_overrides.optim.weight_decay=0.01",
             "search.space[head.dropout]={type: categorical, choices: [0.0, 0.1]}", "search.space[optim.lr].low=0.00001"]
    a, b = load_pipeline_config("smoke", text), load_pipeline_config("smoke", plain)
    assert a.pretrain.optim.lr == 0.0001 and isinstance(a.finetune.optim.lr, float)
    assert a.search.trial_overrides["optim"]["weight_decay"] == 0.01 and a.search.space["head.dropout"].choices == [0.0, 0.1]
    assert a.model_dump() == b.model_dump()
    assert _keys(a, tmp_path) == _keys(b, tmp_path)
    assert _keys(a, tmp_path) != _keys(load_pipeline_config("smoke", ["finetune.optim.lr=0.0002"]), tmp_path)


def test_a_set_of_a_searched_key_fixes_it_for_trials_and_the_final_finetune():
    cfg = load_pipeline_config("smoke", ["finetune.optim.lr=0.00421", "finetune.head={dropout: 0.25}"])
    assert cfg.search.fixed == {"optim.lr": 0.00421, "head.dropout": 0.25}
    assert "optim.lr" not in cfg.search.space and "head.dropout" not in cfg.search.space
    assert "optim.weight_decay" in cfg.search.space  # the other keys are still searched
    trial = finetune_config(cfg, _data(), _pretrained(), {"optim.weight_decay": 0.05}, trial=True)
    assert trial.optim.lr == 0.00421 and trial.head.dropout == 0.25 and trial.optim.weight_decay == 0.05
    assert trial.train.max_steps == cfg.search.trial_overrides["train"]["max_steps"]
    # a continued study's best trial may predate the fix: the fixed value still wins
    final = finetune_config(cfg, _data(), _pretrained(), {"optim.weight_decay": 0.05, "optim.lr": 0.1})
    assert final.optim.lr == 0.00421 and final.head.dropout == 0.25 and final.train.max_steps == cfg.finetune.train.max_steps
    # logged with the config: the parent run's params hold search.fixed.<key>
    from selfattn.utils import flatten

    assert flatten(cfg.model_dump(mode="json"))["search.fixed.optim.lr"] == 0.00421
    same = load_pipeline_config("smoke", ["search.fixed[optim.lr]=0.00421"])
    assert same.search.fixed == {"optim.lr": 0.00421} and same.finetune.optim.lr == 0.00421 and "optim.lr" not in same.search.space
    with pytest.raises(UserError, match="goes in brackets"):
        load_pipeline_config("smoke", ["search.fixed.optim.lr=0.1"])
    # a key the preset sets but does not search is an ordinary override
    plain = load_pipeline_config("smoke", ["finetune.train.max_steps=9"])
    assert plain.search.fixed == {} and plain.finetune.train.max_steps == 9


def test_search_ranges_are_set_with_the_key_in_brackets():
    cfg = load_pipeline_config("smoke", ["search.space[optim.lr].high=0.05", "search.space[head.dropout]={type: float, low: 0.1, high: 0.2}"])
    assert cfg.search.space["optim.lr"].high == 0.05 and cfg.search.space["optim.lr"].log  # the rest kept
    assert cfg.search.space["head.dropout"].low == 0.1
    with pytest.raises(UserError, match=r"'optim\.lrr' is not a key of search\.space \(head\.dropout, optim\.lr"):
        load_pipeline_config("smoke", ["search.space[optim.lrr].high=0.01"])
    with pytest.raises(UserError, match="keys with dots go in brackets"):
        load_pipeline_config("smoke", ["search.space.optim.lr.high=0.01"])
    with pytest.raises(UserError, match=r"search\.space\.optim\.lr.*low \(0\.0001\) must be <= high \(1e-05\)"):
        load_pipeline_config("smoke", ["search.space[optim.lr].high=1e-5"])
    with pytest.raises(UserError, match=r"(?s)search\.space\[head\.dropout\] \(value 2\.0\).*head\.dropout: Input should be less than 1"):
        load_pipeline_config("smoke", ["search.space[head.dropout].high=2"])
    with pytest.raises(UserError, match="unclosed"):
        load_pipeline_config("smoke", ["search.space[optim.lr.high=0.01"])


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
    assert study_storage_url(cfg) == f"journal:///{selfattn_home.resolve() / 'optuna.journal'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert mlflow_tracking_uri() == "http://mlflow.example:5000"
    cfg2 = PipelineConfig.model_validate({"search": {"storage": "postgresql://u@h/db"}})
    assert study_storage_url(cfg2) == "postgresql://u@h/db"
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
