"""LoRA adapters (Hu et al., 2021) on chosen ``nn.Linear`` projections.

``W x`` becomes ``W x + (alpha / rank) * B A dropout(x)`` with ``A [rank, in]`` (Kaiming-uniform)
and ``B [out, rank]`` (zeros), so a freshly adapted model computes exactly what the base model
did. Typical use::

    model = apply_lora(model, LoRAConfig(rank=8, alpha=16), trainable_extra=("head",))
    ...train...
    merge_lora(model)      # fold B A into W: no extra cost at inference
    unmerge_lora(model)    # and back, to keep training

``apply_lora`` freezes every parameter except the adapters and the modules named in
``trainable_extra`` (e.g. a classifier's new ``head``). ``merged_state_dict(model)`` gives the
weights of the equivalent plain model (what ``save_pretrained`` writes).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn

from selfattn.config import LoRAConfig  # noqa: F401 - re-exported: the config lives with the other configs (no torch)


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update; ``merge()`` folds it into the weight."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear wraps nn.Linear, got {type(base).__name__}")
        if rank <= 0 or alpha <= 0:
            raise ValueError(f"rank ({rank}) and alpha ({alpha}) must be > 0")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear uses
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> Tensor:
        """The update ``scaling * B @ A``, shaped like the base weight ``[out, in]``."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:  # x [..., in] -> [..., out]
        out = self.base(x)
        if self.merged:
            return out
        return out + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


# Hugging Face module names (GPT-2, Llama) -> the trunk's, so targets written for an imported model work
HF_TARGET_ALIASES: dict[str, tuple[str, ...]] = {
    "c_attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
    "attn.c_proj": ("attn.out_proj",),
    "mlp.c_fc": ("mlp.up_proj",),
    "c_fc": ("mlp.up_proj",),
    "mlp.c_proj": ("mlp.down_proj",),
    "o_proj": ("attn.out_proj",),
    "self_attn.o_proj": ("attn.out_proj",),
}


def _expand_targets(targets: Iterable[str]) -> list[str]:
    out: list[str] = []
    for t in targets:
        out.extend(HF_TARGET_ALIASES.get(t, (t,)))
    return out


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, trainable_extra: Iterable[str] = ()) -> nn.Module:
    """Wrap every ``nn.Linear`` matching ``cfg.targets`` in a :class:`LoRALinear`, in place.

    Afterwards only the adapters and the modules matching ``trainable_extra`` (same matching rule
    as targets, e.g. ``("head",)``) have ``requires_grad=True``. Raises ``ValueError`` naming any
    target or extra that matched nothing, and the Linear layers that exist.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("model already has LoRA adapters; apply_lora once (merge_lora/unmerge_lora toggle them)")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name}
    targets = _expand_targets(cfg.targets)
    chosen = {name for name in linears if any(_matches(name, t) for t in targets)}
    unmatched = [t for t in targets if not any(_matches(n, t) for n in linears)]
    if unmatched:
        short = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(f"LoRA targets {unmatched} match no nn.Linear in the model; Linear names: {short}")
    extras = tuple(trainable_extra)
    all_names = [n for n, _ in model.named_modules() if n]
    missing = [e for e in extras if not any(_matches(n, e) for n in all_names)]
    if missing:
        raise ValueError(f"trainable_extra {missing} match no module in the model")

    for p in model.parameters():
        p.requires_grad_(False)
    for name in sorted(chosen):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(linears[name], rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout))
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
        elif extras and any(_matches(name, e) for e in extras):
            for p in module.parameters():
                p.requires_grad_(True)
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (idempotent); forward then costs what the base did."""
    for m in lora_modules(model):
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_lora` (idempotent), e.g. to continue training the adapters."""
    for m in lora_modules(model):
        m.unmerge()
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict of the equivalent plain model: adapters folded in, ``.base.`` names removed.

    Does not modify ``model``. For a model without adapters this is ``model.state_dict()``.
    """
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix + "lora_")]:
            del state[key]
        weight = state.pop(prefix + "base.weight")
        state[prefix + "weight"] = weight if module.merged else weight + module.delta_weight()
        if prefix + "base.bias" in state:
            state[prefix + "bias"] = state.pop(prefix + "base.bias")
    return state


def trainable_parameters(model: nn.Module) -> dict[str, int | float]:
    """``{"trainable": n, "total": n, "ratio": trainable / total}`` counting shared tensors once."""
    params = list(model.parameters())  # nn.Module.parameters() already yields tied weights once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"trainable": trainable, "total": total, "ratio": trainable / total if total else 0.0}
