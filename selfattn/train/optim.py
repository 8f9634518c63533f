"""AdamW over ``param_groups`` (no decay on norms/biases/embeddings) and the warmup + cosine schedule."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from selfattn.train.config import OptimConfig


def warmup_steps(cfg: "OptimConfig", max_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps is not None else min(100, max_steps // 10)


def lr_at(step: int, cfg: "OptimConfig", max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based), as in nanoGPT's ``get_lr``.

    Linear warmup ``lr * (step + 1) / (warmup + 1)``, then cosine from ``lr`` to ``min_lr`` over
    ``decay_steps`` (default ``max_steps``), then ``min_lr``.
    """
    warm = warmup_steps(cfg, max_steps)
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    decay = cfg.decay_steps or max_steps
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    if step >= decay:
        return min_lr
    ratio = (step - warm) / max(decay - warm, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


def build_optimizer(model: "torch.nn.Module", cfg: "OptimConfig", *, fused: bool = False) -> "torch.optim.AdamW":
    """AdamW over the trainable parameters, decayed and non-decayed groups from ``models.param_groups``.

    ``fused``: torch's fused kernel (CUDA and CPU): one kernel per tensor and no host read of the
    step count, where ``foreach`` still runs ~20 small ops and 2 ``.item()`` per tensor on CPU. At
    the benchmark's 0.8M-parameter size that took a training step from 2,469 to 1,674 aten ops.
    """
    import torch

    from selfattn.nn.models import param_groups

    groups = []
    for g in param_groups(model, cfg.weight_decay):
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            groups.append({**g, "params": params})
    if not groups:
        raise ValueError("model has no trainable parameters")
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kwargs)


def build_scheduler(optimizer: "torch.optim.Optimizer", cfg: "OptimConfig", max_steps: int) -> "torch.optim.lr_scheduler.LambdaLR":
    """A LambdaLR whose factor is ``lr_at(step) / lr`` (its state is just the step count)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, max_steps) / cfg.lr)
