"""Transformer building blocks: norms, the MLP and the block (pre-norm or post-norm).

Pre-norm (``cfg.norm_position="pre"``, GPT-2 and Llama): ``x + attn(norm1(x))`` then
``x + mlp(norm2(x))``; the residual stream is never normalised, which keeps deep stacks trainable
without warm-up tricks, and the model ends with a final norm.
Post-norm (``"post"``, BERT, RoBERTa, DistilBERT): ``norm1(x + attn(x))`` then
``norm2(x + mlp(x))``; every block's output is normalised, so there is no final norm.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from selfattn.config import ModelConfig
from selfattn.nn.attention import MultiHeadAttention
from selfattn.nn.kv_cache import KVCache
from selfattn.nn.norms import RMSNorm

__all__ = ["RMSNorm", "make_norm", "MLP", "TransformerBlock"]


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The normalisation layer ``cfg.norm`` names, over ``cfg.d_model`` features."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=1e-6 if cfg.norm_eps is None else cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=1e-5 if cfg.norm_eps is None else cfg.norm_eps, bias=cfg.bias)


class MLP(nn.Module):
    """Position-wise feed-forward network, ``d_model -> ff_dim -> d_model``.

    ``cfg.mlp == "gelu"``: ``down(gelu(up(x)))`` (GPT-2).
    ``cfg.mlp == "swiglu"``: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020; Llama). It has three
    matrices instead of two; set ``d_ff`` to about ``8/3 * d_model`` to match the GELU MLP's size.
    ``down_proj`` writes into the residual stream (scaled init in the models).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = cfg.mlp
        self.approximate = cfg.gelu_approximate
        self.up_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias)
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ff_dim, bias=cfg.bias) if cfg.mlp == "swiglu" else None
        self.down_proj = nn.Linear(cfg.ff_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, T, D]
        if self.gate_proj is not None:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)  # [B, T, ff]
        else:
            hidden = F.gelu(self.up_proj(x), approximate=self.approximate)  # [B, T, ff]
        return self.dropout(self.down_proj(hidden))


class TransformerBlock(nn.Module):
    """Pre-norm block ``x + attn(norm1(x))``, ``x + mlp(norm2(x))``; or post-norm (``cfg.norm_position="post"``)
    ``norm1(x + attn(x))``, ``norm2(x + mlp(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.post_norm = cfg.norm_position == "post"
        self.norm1 = make_norm(cfg)
        self.attn = MultiHeadAttention.from_config(cfg)
        if cfg.qkv_bias is not None and cfg.qkv_bias != cfg.bias:
            # Qwen2-style: q/k/v carry a bias while out_proj and the MLP do not (or the reverse)
            for name in ("q_proj", "k_proj", "v_proj"):
                old = getattr(self.attn, name)
                setattr(self.attn, name, nn.Linear(old.in_features, old.out_features, bias=cfg.qkv_bias))
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: Tensor,  # [B, T, D]
        *,
        attention_mask: Tensor | None = None,  # [B, T] or [B, S] bool, True = real token
        is_causal: bool = True,
        kv_cache: KVCache | None = None,
        layer_idx: int = 0,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        attn_out = self.attn(
            x if self.post_norm else self.norm1(x),
            attention_mask=attention_mask,
            is_causal=is_causal,
            kv_cache=kv_cache,
            layer_idx=layer_idx,
            return_weights=return_weights,
        )
        weights = None
        if return_weights:
            attn_out, weights = attn_out  # weights [B, H, T, S]
        if self.post_norm:
            x = self.norm1(x + attn_out)
            x = self.norm2(x + self.mlp(x))
        else:
            x = x + attn_out
            x = x + self.mlp(self.norm2(x))
        return (x, weights) if return_weights else x
