"""Scaled dot-product attention with a correct 1/sqrt(d_k) scale, masks that never give NaN, and a
float64-friendly reference.

:func:`scaled_dot_product_attention` runs PyTorch's fused kernel (or, where it is faster - CPU
training in bf16 on short sequences - the same computation composed of matmuls and a
float32 softmax); :func:`naive_attention` is the readable reference the tests compare against.
Mask helpers: :func:`causal_mask`, :func:`sliding_window_mask`. The sliding-window and FlexAttention kernels live in
:mod:`selfattn.nn.window`.
"""

from __future__ import annotations

import logging
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "scaled_dot_product_attention",
    "naive_attention",
    "causal_mask",
    "sliding_window_mask",
]


def causal_mask(lq: int, lk: int, device: torch.device | str | None = None) -> Tensor:
    """Bottom-right aligned causal mask ``[lq, lk]`` (bool, True = may attend).

    Query ``i`` (the ``i``-th of the last ``lq`` positions) may attend key ``j`` iff
    ``j <= i + (lk - lq)``. With ``lq > lk`` the first ``lq - lk`` rows attend nothing.
    """
    if lq < 0 or lk < 0:
        raise ValueError(f"causal_mask needs non-negative lengths, got lq={lq}, lk={lk}")
    i = torch.arange(lq, device=device).unsqueeze(-1)  # [lq, 1]
    j = torch.arange(lk, device=device).unsqueeze(0)  # [1, lk]
    return j <= i + (lk - lq)


def sliding_window_mask(
    lq: int, lk: int, window: int, device: torch.device | str | None = None, *, causal: bool = True
) -> Tensor:
    """Banded mask ``[lq, lk]`` (bool): each query sees at most ``window`` keys, itself included.

    Causal (default): query at absolute position ``p = i + (lk - lq)`` sees keys ``p - window < j <= p``
    (bottom-right aligned like :func:`causal_mask`). Non-causal: keys with ``|p - j| < window``
    (a symmetric band of ``2 * window - 1`` keys).
    """
    if window < 1:
        raise ValueError(f"window ({window}) must be >= 1")
    if lq < 0 or lk < 0:
        raise ValueError(f"sliding_window_mask needs non-negative lengths, got lq={lq}, lk={lk}")
    p = torch.arange(lq, device=device).unsqueeze(-1) + (lk - lq)  # [lq, 1] absolute query positions
    j = torch.arange(lk, device=device).unsqueeze(0)  # [1, lk]
    dist = p - j  # [lq, lk]; > 0 means the key is in the past
    if causal:
        return (dist >= 0) & (dist < window)
    return dist.abs() < window


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _broadcast(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    """NumPy broadcasting of two shapes; None when they do not broadcast.

    (Plain Python: ``torch.broadcast_shapes`` costs tens of microseconds per call.)
    """
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for x, y in zip(a, b):
        if x != y and x != 1 and y != 1:
            return None
        out.append(y if x == 1 else x)
    return tuple(out)


def _validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    scale: float | None,
) -> tuple[int, ...]:
    """Check every argument before any compute; return the broadcast batch shape ``[...]``.

    Raises ``ValueError`` naming the offending shapes/values.
    """
    _check_qkv(q, k, v)
    batch = _batch_shape(q, k)
    if attn_mask is not None:
        _check_mask(attn_mask, (*batch, q.shape[-2], k.shape[-2]), q, k)
    if not isinstance(dropout_p, (int, float)) or not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p ({dropout_p}) must be in [0, 1)")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale ({scale}) must be a finite number or None")
    return batch


def _check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Tensors of one rank and floating dtype, q/k sharing E, k/v sharing Lk and leading dims."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dims [..., L, E], got shape {_shape(t)}")
    if not (q.dim() == k.dim() == v.dim()):
        raise ValueError(
            f"q, k, v must have the same rank, got q {_shape(q)} ({q.dim()}-D), "
            f"k {_shape(k)} ({k.dim()}-D), v {_shape(v)} ({v.dim()}-D)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v must be floating point, got {q.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same head dim E: q {_shape(q)} has E={q.shape[-1]}, "
            f"k {_shape(k)} has E={k.shape[-1]}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"k and v must have the same length Lk: k {_shape(k)} has Lk={k.shape[-2]}, "
            f"v {_shape(v)} has Lk={v.shape[-2]}"
        )
    if _shape(k)[:-2] != _shape(v)[:-2]:
        raise ValueError(f"k and v must have the same leading dims, got k {_shape(k)} and v {_shape(v)}")


def _batch_shape(q: Tensor, k: Tensor) -> tuple[int, ...]:
    """The leading dims ``[...]`` q and k/v broadcast to (k/v heads expanded to q's for grouped-query)."""
    q_lead, kv_lead = list(q.shape[:-2]), list(k.shape[:-2])
    if q.dim() >= 4:
        hq, hkv = q.shape[-3], k.shape[-3]
        if hkv != hq and hkv != 1:
            if hkv == 0 or hq % hkv:
                raise ValueError(
                    f"k/v heads ({hkv}) must equal or divide q heads ({hq}) for grouped-query attention; "
                    f"q {_shape(q)}, k {_shape(k)}"
                )
            kv_lead[-1] = hq  # grouped-query: expanded to q's heads
    batch = _broadcast(tuple(q_lead), tuple(kv_lead))
    if batch is None:
        raise ValueError(
            f"leading dims of q {_shape(q)} and k/v {_shape(k)} do not broadcast "
            f"({tuple(q.shape[:-2])} vs {tuple(k.shape[:-2])})"
        )
    return batch


def _check_mask(attn_mask: Tensor, target: tuple[int, ...], q: Tensor, k: Tensor) -> None:
    """A bool or floating mask that broadcasts to the scores' shape ``target`` = ``[..., Lq, Lk]``."""
    if not isinstance(attn_mask, Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise ValueError(f"attn_mask must be bool (True = may attend) or floating (added), got {attn_mask.dtype}")
    if _broadcast(_shape(attn_mask), target) != target:
        raise ValueError(
            f"attn_mask of shape {_shape(attn_mask)} does not broadcast to the scores' shape "
            f"{target} = [..., Lq, Lk] (q {_shape(q)}, k {_shape(k)})"
        )


# A floating mask entry at or below this removes the key: float16's minimum, the largest of the float
# dtypes' minimums, so a mask filled with ANY dtype's finfo.min (the Hugging Face convention) is seen
# as masked whatever dtype the mask or the inputs have. exp(-65504 + score) is 0 in every dtype anyway.
_MASKED_AT = torch.finfo(torch.float16).min


def _masked_entries(mask: Tensor) -> Tensor:
    """Bool tensor, True where a floating mask entry removes the key (-inf or <= float16's min)."""
    return mask <= _MASKED_AT


def _prepare_mask(
    attn_mask: Tensor | None, is_causal: bool, lq: int, lk: int, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor | None, Tensor | None, bool]:
    """Merge ``attn_mask`` and ``is_causal`` into one mask for the kernel.

    Returns ``(mask, alive, torch_causal)``:

    * ``mask``: None, a bool mask or a float mask in ``dtype``; rows that attend nothing are
      rewritten to attend everything (so no kernel ever sees a row of -inf and makes NaN),
    * ``alive``: None when every row attends something by construction, else a bool tensor
      ``[..., Lq, 1]`` that is False on those fully masked rows (their output is zeroed),
    * ``torch_causal``: True when PyTorch's own ``is_causal`` can be used (square, no mask).
    """
    if is_causal and attn_mask is None and lq == lk:
        return None, None, True  # fast path: top-left == bottom-right when square
    mask = attn_mask
    removed = None  # [..., Lq, Lk] bool, True = key removed; from the mask as given, before any cast
    if mask is not None and mask.dtype != torch.bool:
        removed = _masked_entries(mask)
        if mask.dtype != dtype:
            mask = mask.to(dtype)
    if is_causal:
        causal = causal_mask(lq, lk, device)  # [Lq, Lk]
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.masked_fill(~causal, float("-inf"))
    if mask is None:
        return None, None, False
    if mask.dtype == torch.bool:
        alive = mask.any(dim=-1, keepdim=True)  # [..., Lq, 1]
    else:
        if removed is None:
            removed = _masked_entries(mask)
        elif is_causal:
            removed = removed | ~causal_mask(lq, lk, device)
        alive = (~removed).any(dim=-1, keepdim=True)
    if mask.device.type == "cpu" and bool(alive.all()):
        return mask, None, False  # common case; the check is free on CPU (no device sync to avoid)
    # dead rows attend everything (no kernel sees a row of -inf); their output is zeroed afterwards
    mask = mask | ~alive if mask.dtype == torch.bool else mask.masked_fill(~alive, 0.0)
    return mask, alive, False


def _expand_kv_heads(k: Tensor, v: Tensor, n_q_heads: int) -> tuple[Tensor, Tensor]:
    """Repeat k/v heads (dim -3) so grouped-query inputs match q's heads."""
    n_kv = k.shape[-3]
    if n_kv == n_q_heads or n_kv == 1:
        return k, v  # equal, or broadcasts
    rep = n_q_heads // n_kv
    return k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """``softmax(q @ k^T * scale + mask) @ v`` for ``q [..., Lq, E]``, ``k [..., Lk, E]``, ``v [..., Lk, Ev]``.

    Args:
        attn_mask: bool (True = may attend) or floating (added to the scores), broadcastable to
            ``[..., Lq, Lk]``.
        is_causal: causal masking, bottom-right aligned when ``Lq != Lk`` (see the module docstring);
            may be combined with ``attn_mask``.
        dropout_p: dropout on the attention weights (applied whenever > 0, like PyTorch's functional;
            pass 0.0 at eval time).
        scale: multiplier of the scores; default ``1 / sqrt(E)``.
        return_weights: False runs PyTorch's fused kernel (the composed path where
            :func:`composed_is_faster`) and returns ``out [..., Lq, Ev]``; True runs the
            readable reference path and returns ``(out, weights [..., Lq, Lk])`` (weights before dropout).

    Grouped-query attention: with 4-D+ inputs, ``k``/``v`` may have ``H_kv`` heads (dim -3) where
    ``H_kv`` divides q's ``H``; query head ``h`` uses kv head ``h // (H / H_kv)`` (the
    ``repeat_interleave`` / ``enable_gqa`` convention).

    Raises ``ValueError`` (before any compute) for wrong ranks, mismatched head dims or lengths,
    masks that do not broadcast, kv heads that do not divide q heads, ``dropout_p`` outside [0, 1).
    """
    _validate(q, k, v, attn_mask, dropout_p, scale)
    if return_weights:
        return _reference(q, k, v, attn_mask, is_causal, float(dropout_p), scale)
    if composed_is_faster(q, k, v, attn_mask, is_causal, scale):
        return _reference(q, k, v, attn_mask, is_causal, float(dropout_p), scale)[0]
    return _fused(q, k, v, attn_mask, is_causal, float(dropout_p), scale)


def _fused(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float, scale: float | None
) -> Tensor:
    """PyTorch's fused kernel with selfattn's mask semantics (bottom-right causal, zeros on dead rows)."""
    lq, lk = q.shape[-2], k.shape[-2]
    mask, alive, torch_causal = _prepare_mask(attn_mask, is_causal, lq, lk, q.dtype, q.device)
    gqa = q.dim() >= 4 and k.shape[-3] != q.shape[-3]  # grouped or multi-query heads
    if gqa and q.shape[:-3] != k.shape[:-3]:
        k, v = _expand_kv_heads(k, v, q.shape[-3])  # torch's enable_gqa wants equal batch dims
        gqa = False
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=float(dropout_p), is_causal=torch_causal, scale=scale, enable_gqa=gqa
    )
    if alive is not None:
        out = out.masked_fill(~alive, 0.0)
    return out


# PyTorch's fused CPU kernel can be slow to differentiate in reduced precision at short lengths: on
# an AMD EPYC with avx512_bf16, B=56, H=12, T=36, hd=32, bf16 forward + backward took 181 ms fused
# against 19 ms composed of two matmuls and a float32 softmax (the two meet near T=256), while in
# fp16 the fused kernel was as fast (150 against 162 ms). Another CPU (AMX, another PyTorch) can
# rank them differently, so the choice is measured, not assumed: the first time autograd records
# a CPU attention in bf16 or fp16 for a (dtype, head dim, key-length bucket), both paths run
# forward + backward on that very call's shapes (one warm-up, then the best of two), and the
# faster one is kept for the process (the composed path must win by 10%). The composed path holds
# the [..., Lq, Lk] scores, so it is never tried above COMPOSED_MAX_KEYS keys. Inference and
# float32 stay fused. SELFATTN_CPU_ATTENTION=fused|composed fixes the choice (reproducible
# numerics across machines); unset or "measure" measures.
COMPOSED_MAX_KEYS = 256
CPU_ATTENTION_ENV = "SELFATTN_CPU_ATTENTION"
_COMPOSED_MARGIN = 0.9  # composed is kept only when it takes < 90% of the fused time
_measured: dict[tuple, bool] = {}  # (dtype, head dim, key bucket) -> composed is faster


def _key_bucket(lk: int) -> int:
    """Key lengths measured together: powers of two (1-16, 17-32, 33-64, ...)."""
    return max(16, 1 << (max(lk, 1) - 1).bit_length())


def _time_both(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: float | None) -> tuple[float, float]:
    """Seconds of forward + backward for (fused, composed) on detached copies of this call's tensors."""
    def step(path) -> float:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        t0 = time.perf_counter()
        out = path(*leaves)
        out.backward(torch.ones_like(out))
        return time.perf_counter() - t0

    fused = lambda a, b, c: _fused(a, b, c, attn_mask, is_causal, 0.0, scale)  # noqa: E731
    composed = lambda a, b, c: _reference(a, b, c, attn_mask, is_causal, 0.0, scale)[0]  # noqa: E731
    with torch.enable_grad():
        step(fused), step(composed)  # warm-up: first-call allocations and kernel selection
        return min(step(fused) for _ in range(2)), min(step(composed) for _ in range(2))


def composed_is_faster(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False, scale: float | None = None
) -> bool:
    """True where the composed path (:func:`_reference`) is measured faster than PyTorch's fused kernel
    on this machine: on CPU, in bf16 or fp16, with at most :data:`COMPOSED_MAX_KEYS` keys, while
    autograd records (inference stays fused). See the comment above :data:`COMPOSED_MAX_KEYS`."""
    if not (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and k.shape[-2] <= COMPOSED_MAX_KEYS
        and torch.is_grad_enabled()
        and (q.requires_grad or k.requires_grad or v.requires_grad)
    ):
        return False
    forced = os.environ.get(CPU_ATTENTION_ENV, "measure").strip().lower()
    if forced in ("fused", "composed"):
        return forced == "composed"
    if forced not in ("", "measure"):
        raise ValueError(f"{CPU_ATTENTION_ENV}={forced!r}: expected fused, composed or measure")
    key = (q.dtype, q.shape[-1], _key_bucket(k.shape[-2]))
    if key not in _measured:
        fused_s, composed_s = _time_both(q, k, v, attn_mask, is_causal, scale)
        _measured[key] = composed_s < _COMPOSED_MARGIN * fused_s
        logger.info(
            "CPU attention, %s, head dim %d, up to %d keys: fused %.1f ms, composed %.1f ms per forward + backward -> %s",
            str(q.dtype).removeprefix("torch."), key[1], key[2], fused_s * 1e3, composed_s * 1e3,
            "composed" if _measured[key] else "fused",
        )  # fmt: skip
    return _measured[key]


def _reference(
    q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, dropout_p: float, scale: float | None
) -> tuple[Tensor, Tensor]:
    """Readable path that also returns the weights; same masking semantics as the fast path."""
    if q.dim() >= 4:
        k, v = _expand_kv_heads(k, v, q.shape[-3])
    lq, lk = q.shape[-2], k.shape[-2]
    mask, alive, torch_causal = _prepare_mask(attn_mask, is_causal, lq, lk, q.dtype, q.device)
    if torch_causal:
        mask = causal_mask(lq, lk, q.device)  # the reference path always builds the mask itself
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale

    scores = (q @ k.transpose(-2, -1)) * scale  # [..., Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # softmax in at least float32 (fp16/bf16 inputs), float64 stays float64
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    if alive is not None:
        weights = weights.masked_fill(~alive, 0.0)  # fully masked rows: zero weights, zero output
    dropped = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return dropped @ v, weights


def naive_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """The textbook version: ``softmax(q k^T / sqrt(E) + mask) v`` with plain matmuls, no safety nets.

    Used as the float64 reference in tests and as the "naive" peer in the benchmark. Bool masks
    are True = may attend; ``is_causal`` is bottom-right aligned. Fully masked rows give NaN here
    (that is the textbook behaviour the library fixes). Grouped-query k/v heads are repeated.
    """
    if q.dim() >= 4 and k.shape[-3] not in (q.shape[-3], 1):
        k, v = _expand_kv_heads(k, v, q.shape[-3])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-2, -1) * scale  # [..., Lq, Lk]
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v
