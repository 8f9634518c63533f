"""Optuna plumbing: seeded TPE on RDB storage, n_trials as a target, resume, pruning via the callback."""

from __future__ import annotations

import optuna
import pytest

from flows import tuning
from flows.config import PipelineConfig


def _cfg(home, **search):
    space = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, "train.batch_size": {"type": "categorical", "choices": [8, 16]}}
    return PipelineConfig.model_validate({"search": {"study_name": "unit", "space": space, **search}})


def _objective(cfg):
    def f(trial):
        p = tuning.suggest(trial, cfg)
        return -((p["optim.lr"] - 0.01) ** 2) + (0.001 if p["train.batch_size"] == 16 else 0.0)

    return f


def test_study_resumes_and_counts_finished_trials(selfattn_home):
    cfg = _cfg(selfattn_home, n_trials=3)
    study = tuning.optimize(cfg, _objective(cfg), home=selfattn_home)
    assert tuning.n_finished(study) == 3
    again = tuning.optimize(cfg, _objective(cfg), home=selfattn_home)  # target reached: no new trials
    assert len(again.trials) == 3
    more = _cfg(selfattn_home, n_trials=5)
    study = tuning.optimize(more, _objective(more), home=selfattn_home)
    assert len(study.trials) == 5 and study.study_name == "unit"
    summary = tuning.summarize(study, more, selfattn_home)
    assert summary.n_complete == 5 and set(summary.best_params) == {"optim.lr", "train.batch_size"}


def test_tpe_is_seeded(tmp_path):
    firsts = []
    for i in range(2):
        cfg = _cfg(tmp_path, n_trials=2, seed=7, storage=f"sqlite:///{tmp_path / f's{i}.db'}")
        study = tuning.optimize(cfg, _objective(cfg), home=tmp_path)
        firsts.append([t.params for t in study.trials])
    assert firsts[0] == firsts[1]


def test_pruning_callback_reports_and_prunes(selfattn_home):
    cfg = _cfg(selfattn_home, n_trials=1, study_name="prune")
    study = tuning.make_study(cfg, selfattn_home)
    # a finished trial with good intermediate values: the median pruner compares against it
    t0 = study.ask()
    for step, v in enumerate([0.6, 0.7, 0.8]):
        t0.report(v, step)
    study.tell(t0, 0.8)
    trial = study.ask()
    cb = tuning.PruningCallback(trial=trial, metric="accuracy")
    cb.on_eval(0, {"val_loss": 0.7, "val_accuracy": 0.65})  # above the step-0 median (0.6): goes on
    cb.on_eval(1, {"val_loss": 0.7})  # no metric in this eval: nothing reported
    assert tuning.frozen(trial).intermediate_values == {0: 0.65}
    with pytest.raises(optuna.TrialPruned):
        cb.on_eval(2, {"val_accuracy": 0.1})  # best so far (0.65) below the step-2 median (0.8)
    assert tuning.frozen(trial).intermediate_values == {0: 0.65, 2: 0.1}


def test_search_params_set_dotted_keys_through_the_one_override_mechanism():
    from selfattn.config import override_model
    from selfattn.errors import UserError
    from selfattn.train import FinetuneConfig

    ft = FinetuneConfig.model_validate({"data": {"train_path": "t.tsv"}, "optim": {"lr": 1.0}, "train": {"max_steps": 5}})
    out = override_model(ft, {"optim.lr": 0.5, "lora.rank": 4, "train.batch_size": "8"})
    assert out.optim.lr == 0.5 and out.lora.rank == 4 and out.train.batch_size == 8 and out.train.max_steps == 5
    assert ft.optim.lr == 1.0 and ft.lora is None  # the original is untouched
    with pytest.raises(UserError, match="optim.lrr"):
        override_model(ft, {"optim.lrr": 0.5})


def test_pick_metric_reads_exactly_the_key_asked_for():
    assert tuning.pick_metric({"val_accuracy": 0.7}, "val_accuracy") == 0.7
    assert tuning.pick_metric({"accuracy": 0.6, "val_accuracy": 0.7}, "accuracy") == 0.6
    assert tuning.pick_metric({"val_accuracy": 0.7}, "accuracy") is None
    assert tuning.pick_metric({"accuracy": True}, "accuracy") is None
