"""The pretraining stage: a causal LM on the run's corpus (resumes from the stage's checkpoint after a crash)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from flows.config import PipelineConfig
from flows.stages.base import (
    Stage,
    StageOutput,
    engine_inputs,
    train_result,
    training_log,
)
from selfattn.config import override_model
from selfattn.train import PretrainConfig, pretrain


def pretrain_config(cfg: PipelineConfig, data: StageOutput) -> PretrainConfig:
    """The engine's PretrainConfig of this run: the pipeline's section with the run's corpus."""
    return override_model(cfg.pretrain, {"data.path": data.result["files"]["corpus.txt"]}, where="pretrain")


def pretrain_plan(cfg: PipelineConfig, data: StageOutput, home: Path) -> tuple[Stage, PretrainConfig]:
    """The pretrain stage (keyed by the validated config and the corpus digest) and its config."""
    engine_cfg = pretrain_config(cfg, data)
    return Stage(home, "pretrain", {"config": engine_inputs(engine_cfg), "corpus": data.result["digests"]["corpus.txt"]}), engine_cfg


def pretrain_stage(cfg: PipelineConfig, data: StageOutput, home: Path, callbacks: Sequence[Any] = ()) -> StageOutput:
    """Causal-LM pretraining on the corpus; ``callbacks`` are the engine's (metrics, progress)."""
    stage, engine_cfg = pretrain_plan(cfg, data, home)
    with stage.claim() as (out, out_dir):
        if out is None:
            result = pretrain(engine_cfg, out_dir / "train", list(callbacks))
            out = stage.finish(train_result(result, out_dir, engine_cfg))
    return out.declare(training_log(out))
