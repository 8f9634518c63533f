"""The training engine: ``pretrain`` (causal LM), ``finetune`` (classifier, full or LoRA), evaluation.

::

    from selfattn.config import load_config
    from selfattn.train import PretrainConfig, pretrain

    cfg = load_config(PretrainConfig, "configs/pretrain_shakespeare.yaml", ["train.max_steps=200"])
    result = pretrain(cfg, "out/shakespeare")      # -> TrainResult(best_dir, last_ckpt, metrics, history)

Names resolve lazily, so importing ``selfattn.train.config`` stays light (no torch).
"""

from __future__ import annotations

from selfattn.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "PretrainConfig": "selfattn.train.config",
    "FinetuneConfig": "selfattn.train.config",
    "ArchConfig": "selfattn.train.config",
    "OptimConfig": "selfattn.train.config",
    "TrainLoopConfig": "selfattn.train.config",
    "HeadConfig": "selfattn.train.config",
    "LMDataConfig": "selfattn.data.config",
    "ClassificationDataConfig": "selfattn.data.config",
    "pretrain": "selfattn.train.engine",
    "finetune": "selfattn.train.engine",
    "TrainResult": "selfattn.train.engine",
    "TrainingDiverged": "selfattn.train.engine",
    "resolve_device": "selfattn.devices",
    "TrainState": "selfattn.train.engine",
    "evaluate_checkpoint": "selfattn.eval.evaluate",
    "Callback": "selfattn.train.callbacks",
    "StopTraining": "selfattn.train.callbacks",
    "ProgressBar": "selfattn.train.callbacks",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
