"""A ``--set`` of a searched key fixes it: the value reaches the optimizer of every trial and of
the final fine-tune (real stages, real engine, a tiny model and a few steps)."""

from __future__ import annotations

import pytest

from flows.config import load_pipeline_config
from flows.stages import data as data_stage
from flows.stages import finetune, pretrain, search
from selfattn.train import Callback

LR = 0.00421


class _LearningRates(Callback):
    """The optimizer's learning rate as the engine reports it at each step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_step(self, step: int, metrics: dict) -> None:
        self.lrs.append(metrics["lr"])


@pytest.mark.slow
def test_a_fixed_learning_rate_reaches_the_optimizer_of_trials_and_final_finetune(selfattn_home, data_dir, monkeypatch):
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    tiny = [
        "data.train_rows=60", "data.dev_rows=20", "data.corpus_chars=3000",
        "pretrain.train.max_steps=2", "pretrain.train.eval_every=2", "pretrain.train.checkpoint_every=0",
        "finetune.train.max_steps=2", "finetune.train.log_every=1", "finetune.train.eval_every=2",
        "finetune.train.checkpoint_every=0", "finetune.train.device=cpu",
        "search.n_trials=2", "search.study_name=precedence",
        "search.trial_overrides.train.max_steps=2", "search.trial_overrides.train.log_every=1",
    ]
    # warmup 0: the first step runs at the peak rate, so the reported lr is the configured one
    cfg = load_pipeline_config("smoke", [*tiny, f"finetune.optim.lr={LR}", "finetune.optim.warmup_steps=0"])
    assert cfg.search.fixed == {"optim.lr": LR, "optim.warmup_steps": 0}
    data = data_stage.prepare_data(cfg, selfattn_home)
    pre = pretrain.pretrain_stage(cfg, data, selfattn_home)

    trials: list[tuple[dict, _LearningRates]] = []

    def per_trial(trial, params):
        trials.append((params, _LearningRates()))
        return [trials[-1][1]]

    sr = search.search_stage(cfg, data, pre, selfattn_home, trial_callbacks=per_trial)
    assert len(trials) == 2
    for params, rec in trials:
        assert "optim.lr" not in params and "optim.warmup_steps" not in params and "head.dropout" in params
        assert rec.lrs and rec.lrs[0] == pytest.approx(LR)
    assert "optim.lr" not in sr.result["best_params"]

    final = _LearningRates()
    ft = finetune.finetune_stage(cfg, data, pre, sr, selfattn_home, [final])
    assert final.lrs and final.lrs[0] == pytest.approx(LR)
    assert ft.result["config"]["optim"]["lr"] == LR
