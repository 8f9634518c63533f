"""Multi-head self-attention (full / sliding window / low rank) with positions and a KV cache.

``MultiHeadAttention`` projects ``x [B, T, D]`` to queries ``[B, H, T, hd]`` and keys/values
``[B, H_kv, T, hd]`` (``H_kv`` < ``H`` = grouped-query, 1 = multi-query), applies positions
(RoPE rotates q/k; ALiBi adds a score bias; learned positions are added by the model), optionally
appends k/v to a :class:`KVCache`, and runs :func:`selfattn.nn.functional.scaled_dot_product_attention`.

Variants (``attention=``):

* ``"full"``: every query sees every (earlier, if causal) key.
* ``"sliding_window"``: each query sees the last ``window`` keys, itself included (causal); with
  ``is_causal=False`` a symmetric band ``|i - j| < window`` (a banded mask on the fused kernel).
  Causal inputs run :func:`selfattn.nn.window.sliding_window_attention`: block-local attention,
  O(T * window) time and memory, which falls back to the dense kernel by a cost model where the
  window does not pay. ``attn.window_block = n`` forces blocks of ``n`` queries (None = automatic).
* ``"low_rank"``: Linformer. Learned projections ``E, F [low_rank_k, max_len]`` mix keys and values
  along the sequence axis (``K' = E[:, :T] K``), so the scores are ``[T, low_rank_k]``: O(T * k).
  Bidirectional only (a projected key mixes past and future tokens), meant for the classifier;
  ``is_causal=True`` or a KV cache raise ``ValueError``. Padding keys are zeroed before projecting.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn.nn.functional import (
    causal_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
)
from selfattn.nn.kv_cache import KVCache, RollingKVCache
from selfattn.nn.norms import RMSNorm
from selfattn.nn.positions import (
    RotaryEmbedding,
    alibi_bias,
    alibi_slopes,
    apply_rotary,
    apply_rotary_rolled,
    signed_sin,
)
from selfattn.nn.window import (
    choose_window_kernel,
    flex_attention_available,
    flex_masked_attention,
    sliding_window_attention,
)

if TYPE_CHECKING:
    from selfattn.config import ModelConfig, RopeScaling

__all__ = ["MultiHeadAttention"]

_ATTENTION_KINDS = ("full", "sliding_window", "low_rank")
_POSITION_KINDS = ("rope", "learned", "alibi", "none")


def _check_heads(d_model: int, n_heads: int, n_kv_heads: int, head_dim: int | None) -> int:
    """The per-head size (``head_dim`` or ``d_model // n_heads``); ValueError naming the sizes that do not fit."""
    if d_model < 1 or n_heads < 1 or n_kv_heads < 1:
        raise ValueError(f"d_model ({d_model}), n_heads ({n_heads}), n_kv_heads ({n_kv_heads}) must be >= 1")
    if head_dim is None and d_model % n_heads:
        raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model}), or give head_dim")
    if head_dim is not None and head_dim < 1:
        raise ValueError(f"head_dim ({head_dim}) must be >= 1")
    if n_heads % n_kv_heads:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
    return head_dim or d_model // n_heads


def _check_variant(attention: str, position: str, dropout: float, window: int | None, low_rank_k: int | None, max_len: int | None) -> None:
    """ValueError naming the value when the attention kind, position kind or their sizes do not fit."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout ({dropout}) must be in [0, 1)")
    if attention not in _ATTENTION_KINDS:
        raise ValueError(f"attention ({attention!r}) must be one of {_ATTENTION_KINDS}")
    if position not in _POSITION_KINDS:
        raise ValueError(f"position ({position!r}) must be one of {_POSITION_KINDS}")
    if attention == "sliding_window" and (window is None or window < 1):
        raise ValueError(f"attention='sliding_window' needs window >= 1 (keys per query), got {window}")
    if attention != "low_rank":
        return
    if low_rank_k is None or low_rank_k < 1:
        raise ValueError(f"attention='low_rank' needs low_rank_k >= 1, got {low_rank_k}")
    if max_len is None or max_len < 1:
        raise ValueError(f"attention='low_rank' needs max_len >= 1 (longest sequence), got {max_len}")
    if position == "alibi":
        raise ValueError("attention='low_rank' cannot use position='alibi' (projected keys have no position)")


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with grouped-query heads, positions, variants and a KV cache.

    ``forward(x [B, T, D], attention_mask=None, is_causal=True, kv_cache=None, layer_idx=0,
    return_weights=False) -> out [B, T, D]`` or ``(out, weights [B, H, T, S])`` where ``S`` is the
    number of keys (``T`` plus cached positions; ``low_rank_k`` for ``low_rank``).

    ``attention_mask`` is a key padding mask, bool, True = real token: ``[B, S]`` (with a KV cache,
    ``S`` covers the cached positions too; ``[B, T]`` when there is no cache).
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        n_kv_heads: int | None = None,
        bias: bool = False,
        dropout: float = 0.0,
        attention: str = "full",
        window: int | None = None,
        low_rank_k: int | None = None,
        max_len: int | None = None,
        position: str = "rope",
        rope_base: float = 10000.0,
        rope_scaling: "RopeScaling | None" = None,
        head_dim: int | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = _check_heads(d_model, n_heads, n_kv_heads, head_dim)
        _check_variant(attention, position, dropout, window, low_rank_k, max_len)
        if position == "rope" and head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim, got {head_dim} (d_model={d_model}, n_heads={n_heads})")

        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.dropout = dropout
        self.attention = attention
        self.window = window
        # sliding_window: query block size of the block-local path; None = chosen by its cost model
        self.window_block: int | None = None
        # sliding_window, causal: "auto", "blocks" or "flex" (see choose_window_kernel)
        self.window_kernel: str = "auto"
        self.low_rank_k = low_rank_k
        self.max_len = max_len
        self.position = position

        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias)

        self.rotary = RotaryEmbedding(head_dim, rope_base, rope_scaling) if position == "rope" else None
        # Qwen3: queries and keys RMS-normalised per head (over head_dim) before the rotation
        self.q_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        if position == "alibi":
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)  # [H]
        if attention == "low_rank":
            assert low_rank_k is not None and max_len is not None
            # Linformer E (keys) and F (values): [k, max_len]; std 1/sqrt(max_len) keeps E K ~ K in scale
            self.e_proj = nn.Parameter(torch.randn(low_rank_k, max_len) / math.sqrt(max_len))
            self.f_proj = nn.Parameter(torch.randn(low_rank_k, max_len) / math.sqrt(max_len))

    @classmethod
    def from_config(cls, cfg: "ModelConfig") -> "MultiHeadAttention":
        """Build from a :class:`selfattn.config.ModelConfig` (``max_len`` = ``context_length``)."""
        return cls(
            d_model=cfg.d_model,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_kv_heads,
            bias=cfg.bias,
            dropout=cfg.dropout,
            attention=cfg.attention,
            window=cfg.window,
            low_rank_k=cfg.low_rank_k,
            max_len=cfg.context_length,
            position=cfg.position,
            rope_base=cfg.rope_base,
            rope_scaling=cfg.rope_scaling,
            head_dim=cfg.head_dim,
            qk_norm=cfg.qk_norm,
            norm_eps=1e-6 if cfg.norm_eps is None else cfg.norm_eps,
        )

    def extra_repr(self) -> str:
        extra = f", window={self.window}" if self.attention == "sliding_window" else ""
        extra += f", low_rank_k={self.low_rank_k}" if self.attention == "low_rank" else ""
        extra += f", head_dim={self.head_dim}" if self.head_dim * self.n_heads != self.d_model else ""
        extra += ", qk_norm=True" if self.q_norm is not None else ""
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
            f"attention={self.attention!r}{extra}, position={self.position!r}"
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        attention_mask: Tensor | None = None,
        is_causal: bool = True,
        kv_cache: KVCache | RollingKVCache | None = None,
        layer_idx: int = 0,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be [B, T, d_model={self.d_model}], got shape {tuple(x.shape)}")
        if self.attention == "low_rank":
            return self._forward_low_rank(x, attention_mask, is_causal, kv_cache, return_weights)
        B, T, _ = x.shape
        offset = kv_cache.layer_length(layer_idx) if kv_cache is not None else 0
        S = offset + T  # keys after this step
        key_mask = self._key_mask(attention_mask, B, T, S)  # [B, 1, 1, S] bool or None

        q, k, v = self._project(x, offset)  # [B, H, T, hd], [B, H_kv, T, hd] x 2
        if kv_cache is not None:
            self._check_cache(kv_cache, is_causal)
            k, v = kv_cache.update(layer_idx, k, v)  # [B, H_kv, S, hd]
            if k.shape[-2] < S:  # a rolling cache keeps only the last keys: align the mask to them
                S = k.shape[-2]
                key_mask = None if key_mask is None else key_mask[..., -S:]

        dropout_p = self.dropout if self.training else 0.0
        if self._use_local_window(is_causal, return_weights):
            out = self._local_window(q, k, v, key_mask, dropout_p, cached=kv_cache is not None)  # [B, H, T, hd]
            return self.out_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        mask, causal = self._dense_mask(key_mask, is_causal, T, S, x.device, q.dtype)
        result = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p, return_weights=return_weights
        )
        out, weights = result if return_weights else (result, None)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # [B, T, D]
        return (out, weights) if return_weights else out

    def _check_cache(self, kv_cache: KVCache | RollingKVCache, is_causal: bool) -> None:
        """A rolling cache drops keys older than its window: only a causal window no wider may use it."""
        if isinstance(kv_cache, RollingKVCache) and (
            self.attention != "sliding_window" or not is_causal or kv_cache.window < (self.window or 0)
        ):
            raise ValueError(
                f"a RollingKVCache (window={kv_cache.window}) needs causal attention='sliding_window' with "
                f"window <= {kv_cache.window}; this layer has attention={self.attention!r}, window={self.window}, "
                f"is_causal={is_causal}"
            )

    def _local_window(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout_p: float, *, cached: bool) -> Tensor:
        """Causal sliding window on the block-local kernel or flex attention: ``[B, H, T, hd]``."""
        assert self.window is not None
        kernel = choose_window_kernel(
            self.window_kernel, cuda=q.is_cuda, training=self.training, cached=cached,
            padded=key_mask is not None, dropout_p=dropout_p, flex_available=flex_attention_available(),
            head_dim=self.head_dim,
        )
        if kernel == "flex":
            flex_mask = None if key_mask is None else key_mask[:, 0, 0, :]  # [B, S]
            return flex_masked_attention(q, k, v, causal=True, window=self.window, key_mask=flex_mask)
        return sliding_window_attention(q, k, v, self.window, key_mask=key_mask, dropout_p=dropout_p, block_size=self.window_block)

    def _dense_mask(
        self, key_mask: Tensor | None, is_causal: bool, T: int, S: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Tensor | None, bool]:
        """``(attn_mask, is_causal)`` for the dense kernel: padding, the window's band, ALiBi's bias."""
        mask, causal = key_mask, is_causal
        if self.attention == "sliding_window":
            assert self.window is not None
            band = sliding_window_mask(T, S, self.window, device, causal=is_causal)  # [T, S]
            mask = band if mask is None else mask & band
            causal = False  # the band is already causal
        if self.position == "alibi":
            bias = alibi_bias(self.alibi_slopes, T, S, device=device, dtype=dtype)  # [H, T, S]
            if causal:
                mask = causal_mask(T, S, device) if mask is None else mask & causal_mask(T, S, device)
                causal = False
            mask = bias if mask is None else torch.where(mask, bias, float("-inf"))  # [B?, H, T, S]
        return mask, causal

    def _project(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, D]`` -> q ``[B, H, T, hd]``, k, v ``[B, H_kv, T, hd]``; RoPE from position ``offset``."""
        B, T, _ = x.shape
        H, H_kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        fused = self._fused_qkv_weights()
        if fused is None:  # adapters (LoRA) or mixed biases: one projection each
            q = self.q_proj(x).view(B, T, H, hd)
            k = self.k_proj(x).view(B, T, H_kv, hd)
            v = self.v_proj(x).view(B, T, H_kv, hd)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if self.rotary is not None:
                cos, sin = self.rotary(T, offset, device=x.device, dtype=q.dtype)  # [T, hd]
                q, k = apply_rotary(q, cos[:, None], sin[:, None]), apply_rotary(k, cos[:, None], sin[:, None])
            return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # One matmul for q, k and v (as GPT-2's c_attn) and one rotation of q and k together: at small
        # widths the step is bound by the number of ops, not by FLOPs, and this halves them here.
        qkv = F.linear(x, *fused).view(B, T, H + 2 * H_kv, hd)  # [B, T, H + 2 H_kv, hd]
        # split, not slicing: a slice's backward fills a zero tensor per slice, split's is one cat
        qk, v = qkv.split([H + H_kv, H_kv], dim=2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([H, H_kv], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        if self.rotary is not None:
            cos, sin = self._rotary_tables(T, offset, x.device, qk.dtype)  # [T, 1, hd] each
            qk = apply_rotary_rolled(qk, cos, sin)  # broadcast over the heads
        q, k = qk.split([H, H_kv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _rotary_tables(self, T: int, offset: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, signed sin) [T, 1, hd]``, kept for the last (T, offset, device, dtype) asked: a
        training run asks for the same ones every step."""
        key = (T, offset, device, dtype, torch.is_inference_mode_enabled())  # inference tensors cannot be saved for backward
        cached = getattr(self, "_rotary_cache", None)
        if cached is None or cached[0] != key:
            assert self.rotary is not None
            cos, sin = self.rotary(T, offset, device=device, dtype=dtype)  # [T, hd]
            cached = (key, cos[:, None], signed_sin(sin)[:, None])
            self._rotary_cache = cached
        return cached[1], cached[2]

    def _fused_qkv_weights(self) -> tuple[Tensor, Tensor | None] | None:
        """``(W [(H + 2 H_kv) hd, D], b or None)``: q/k/v weights stacked, or None when they cannot be."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if any(type(m) is not nn.Linear for m in projs):  # e.g. LoRA-wrapped: keep their own forward
            return None
        biases = [m.bias for m in projs]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            return None
        weight = torch.cat([m.weight for m in projs])
        return weight, (None if biases[0] is None else torch.cat(biases))

    def _use_local_window(self, is_causal: bool, return_weights: bool) -> bool:
        """Block-local sliding window (it picks dense itself where that is cheaper) when applicable."""
        return (
            self.attention == "sliding_window"
            and is_causal
            and not return_weights  # the weights [B, H, T, S] are dense anyway
            and self.position != "alibi"  # ALiBi's bias is built densely
        )

    def _key_mask(self, attention_mask: Tensor | None, B: int, T: int, S: int) -> Tensor | None:
        """``[B, S]`` True = real token -> ``[B, 1, 1, S]`` bool; validates the shape."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] != S:
            raise ValueError(
                f"attention_mask must be [B={B}, S={S}] (True = real token; S = cached {S - T} + new {T}), "
                f"got shape {tuple(attention_mask.shape)}"
            )
        return attention_mask.to(torch.bool)[:, None, None, :]

    def _forward_low_rank(
        self, x: Tensor, attention_mask: Tensor | None, is_causal: bool, kv_cache: KVCache | None, return_weights: bool
    ) -> Tensor | tuple[Tensor, Tensor]:
        if is_causal:
            raise ValueError(
                "attention='low_rank' (Linformer) is bidirectional only: is_causal=True is not supported; "
                "call with is_causal=False (sequence classification)"
            )
        if kv_cache is not None:
            raise ValueError("attention='low_rank' does not support a kv_cache (it is not causal)")
        B, T, _ = x.shape
        assert self.max_len is not None
        if T > self.max_len:
            raise ValueError(f"attention='low_rank': sequence length ({T}) exceeds max_len ({self.max_len})")
        key_mask = self._key_mask(attention_mask, B, T, T)

        q, k, v = self._project(x, 0)  # [B, H, T, hd], [B, H_kv, T, hd] x 2
        if key_mask is not None:
            keep = key_mask.transpose(-1, -2).to(k.dtype)  # [B, 1, S, 1]: padding keys contribute nothing
            k, v = k * keep, v * keep
        k = self.e_proj[:, :T].to(k.dtype) @ k  # [low_rank_k, T] @ [B, H_kv, T, hd] -> [B, H_kv, low_rank_k, hd]
        v = self.f_proj[:, :T].to(v.dtype) @ v  # same for the values
        dropout_p = self.dropout if self.training else 0.0
        result = scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, return_weights=return_weights)
        out, weights = result if return_weights else (result, None)
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        return (out, weights) if return_weights else out
