"""The final fine-tune: the classifier from the pretrained checkpoint with the search's best parameters.

:func:`finetune_config` is the one place a fine-tune's engine config is built, for trials
(``trial=True``: ``search.trial_overrides`` on top) and the final fine-tune alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from flows.config import PipelineConfig, trial_template
from flows.stages.base import (
    Stage,
    StageOutput,
    engine_inputs,
    train_result,
    training_log,
)
from selfattn.config import override_model
from selfattn.train import FinetuneConfig, finetune


def finetune_config(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    params: dict[str, Any] | None = None,
    *,
    trial: bool = False,
) -> FinetuneConfig:
    """The engine's FinetuneConfig of this run (trials: with ``search.trial_overrides``), then
    ``params`` (dotted keys, e.g. Optuna's).

    Trials and the final fine-tune alike select and stop on a held-out part of train
    (val_path None, ``finetune.data.val_fraction``), so the dev split stays unseen until the
    final evaluation: the reported dev score is not selected on dev."""
    d = cfg.data
    run = {
        "data.train_path": data.result["files"]["train.tsv"],
        "data.val_path": None,
        "data.text_column": d.text_column,
        "data.label_column": d.label_column,
        "data.labels": d.labels,
        "init_from": pretrained.result["best_dir"],
    }
    base = trial_template(cfg) if trial else cfg.finetune
    return override_model(base, {**run, **searched(cfg, params or {})}, where="finetune")


def searched(cfg: PipelineConfig, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the fixed keys: a continued study's best trial may come from before a
    key was fixed, and the fixed value wins."""
    return {k: v for k, v in params.items() if k not in cfg.search.fixed}


def finetune_plan(cfg: PipelineConfig, data: StageOutput, pretrained: StageOutput, search: StageOutput, home: Path) -> tuple[Stage, FinetuneConfig]:
    """The final fine-tune stage (keyed by its validated config) and that config (best parameters applied)."""
    engine_cfg = finetune_config(cfg, data, pretrained, search.result.get("best_params", {}))
    inputs = {"config": engine_inputs(engine_cfg), "pretrain": pretrained.key, "data": data.result["digests"]}
    return Stage(home, "finetune", inputs), engine_cfg


def finetune_stage(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    search: StageOutput,
    home: Path,
    callbacks: Sequence[Any] = (),
) -> StageOutput:
    """The final fine-tune with the best parameters (GPU when the engine finds one)."""
    stage, engine_cfg = finetune_plan(cfg, data, pretrained, search, home)
    with stage.claim() as (out, out_dir):
        if out is None:
            result = finetune(engine_cfg, out_dir / "train", list(callbacks))
            params = searched(cfg, search.result.get("best_params", {}))
            out = stage.finish({**train_result(result, out_dir, engine_cfg), "params": params})
    return out.declare(training_log(out))
