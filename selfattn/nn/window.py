"""Sliding-window attention kernels: block-local causal attention (:func:`sliding_window_attention`,
with its cost model and autograd Functions) and FlexAttention (:func:`flex_masked_attention`).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from selfattn.nn.functional import (
    _expand_kv_heads,
    _shape,
    _validate,
    scaled_dot_product_attention,
    sliding_window_mask,
)


def _window_block_size(lq: int, window: int) -> int:
    """Query block size ``b`` for :func:`sliding_window_attention`, by a cost model.

    A block of ``b`` queries attends ``c = (n + 1) * b`` keys, ``n = ceil((window - 1) / b)`` whole
    previous blocks. The work is ``ceil(lq / b) * b * c`` scores plus a gather of ``n + 1`` key pieces
    per block (weighted like 64 scores per key row, measured on CPU): small blocks waste less of the
    band, large blocks gather fewer pieces. Ties go to the larger block (fewer, bigger kernel calls).
    """
    best, best_cost = _BLOCK_SIZES[0], float("inf")
    for b in _BLOCK_SIZES:
        n = -(-(window - 1) // b)
        cost = -(-lq // b) * b * ((n + 1) * b + 64 * (n + 1))
        if cost <= best_cost:
            best, best_cost = b, cost
    return best


_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024)


# the masked kernel visits every score of its [b, c] tiles; dense causal skips the upper triangle
# but a band mask costs it the whole [Lq, Lk] rectangle. Local wins when its scores plus gather
# cost less than the banded dense rectangle (the factor covers the gather and the per-block mask).
# The bf16 matmul kernel does a score in about half the flash kernel's time on the blocks' short
# tiles (measured on CPU: 1.35x against 1.02x at T=384, w=256, where flash blocks would not pay)
_LOCAL_OVERHEAD = {"flash": 1.25, "matmul": 0.5}


# from Lq >= 16 windows on, all queries run block-local: the separate causal head then costs more
# (its key slices' gradients, the join) than it saves (measured on CPU: fp32 157 against 169 ms at
# T=4096, w=256; below that the head wins, e.g. 35 against 41 ms at T=1024)
_ALL_BLOCKS_FROM = 16


def window_uses_blocks(lq: int, lk: int, window: int, block_size: int | None = None, kernel: str = "flash") -> bool:
    """True when :func:`sliding_window_attention` runs block-local, False when it falls back to dense.

    Dense (the fused kernel with a band mask, or plain causal when the window covers every key) is
    chosen when the window does not pay: ``window >= Lk`` or the blocks' work (times an overhead
    factor, lower for ``kernel="matmul"``) is not below the dense ``Lq * Lk`` scores.
    """
    if window >= lk:
        return False
    b = _window_block_size(lq, window) if block_size is None else block_size
    n = -(-(window - 1) // b)
    local = -(-lq // b) * b * (n + 1) * b * _LOCAL_OVERHEAD[kernel]
    return local < lq * lk


def _key_blocks(x: Tensor, n_prev: int, n_blocks: int, block: int) -> Tensor:
    """``x [N, (n_blocks + n_prev) * block, ...]`` (contiguous) -> ``[N, n_blocks, (n_prev + 1) * block, ...]``.

    Block ``j`` of the result is rows ``j * block .. (j + n_prev + 1) * block`` of ``x``: a strided
    view, so the overlapping blocks are never copied (the SDPA kernels read by strides). Not
    differentiable on its own: :class:`_ShiftedKeyBlocks` gives keys and values their backward.
    """
    st = x.stride()
    return x.as_strided((x.shape[0], n_blocks, (n_prev + 1) * block, *x.shape[2:]), (st[0], block * st[1], *st[1:]))


class _ShiftedKeyBlocks(torch.autograd.Function):
    """``x [N, L, E]`` -> ``[N, nb, (n + 1) * b, E]``: block ``j`` is rows ``j * b .. (j + n + 1) * b``
    of the sequence ``r -> x[r + shift]`` (zeros where ``r + shift`` is outside ``0 .. L - 1``).

    :func:`_key_blocks` (a strided view) of one padded, trimmed copy of ``x``. Autograd through pad,
    slices and cat would fill a zero tensor the size of ``x`` per slice; this backward adds the
    overlapping blocks' gradients into one buffer and zero-fills only the rows no block covers.
    """

    @staticmethod
    def forward(ctx, x: Tensor, shift: int, n: int, nb: int, b: int) -> Tensor:  # type: ignore[override]
        ctx.dims = (x.shape[1], shift, n, nb, b)
        padded = F.pad(x, (0, 0, -shift, (nb + n) * b + shift - x.shape[1]))  # a negative pad crops
        return _key_blocks(padded.contiguous(), n, nb, b)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # type: ignore[override]
        length, shift, n, nb, b = ctx.dims
        g = grad.reshape(grad.shape[0], nb, n + 1, b, grad.shape[-1])
        acc = grad.new_empty(grad.shape[0], nb + n, b, grad.shape[-1])
        acc[:, :nb].copy_(g[:, :, 0])
        acc[:, nb:].zero_()
        for i in range(1, n + 1):
            acc[:, i : i + nb] += g[:, :, i]
        acc = acc.view(grad.shape[0], (nb + n) * b, grad.shape[-1])  # row r is x row r + shift
        lo, hi = max(0, shift), min(length, (nb + n) * b + shift)
        if lo == 0 and hi == length:
            return acc[:, -shift : length - shift], None, None, None, None
        gx = grad.new_empty(grad.shape[0], length, grad.shape[-1])
        gx[:, lo:hi] = acc[:, lo - shift : hi - shift]
        gx[:, :lo].zero_()
        gx[:, hi:].zero_()
        return gx, None, None, None, None


class _BandMatmulAttention(torch.autograd.Function):
    """Block-local attention by batched matmuls: ``softmax(q k^T * scale, band) v`` per block.

    ``q [N, nb, b, E]``, ``k``/``v [N, nb, c, E]`` (the :class:`_ShiftedKeyBlocks` views), ``mask``
    bool ``[1 or N, nb, b, c]`` (True = may attend). The forward keeps the weights ``p``
    (``N * nb * b * c`` entries, O(Lq * window)); the backward is five matmuls and the softmax
    backward. Both run in chunks of about ``_CHUNK_BYTES`` of scores, so a chunk's scores, weights
    and their gradients stay in cache between the matmul and the softmax (measured on CPU, bf16,
    T=8192: 110-127 ms against 196-231 ms for one pass over all blocks). On a CPU with native bf16
    dot products the bf16 matmuls run these short ``[b, c]`` tiles about twice as fast per score as
    the fused flash kernel, whose bf16 speed-up needs long query tiles (see docs/attention.md). Rows
    with no key (padded queries that see only padding, when ``zero_dead``) come out as zeros with
    zero gradients, like :func:`scaled_dot_product_attention`. Scores are rounded to q's dtype
    before the softmax (the flash kernel keeps them in float32).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, zero_dead: bool) -> Tensor:  # type: ignore[override]
        n_, nb, b, e = q.shape
        c, ev = k.shape[2], v.shape[-1]
        q = q * (1.0 / math.sqrt(e))  # [N, nb, b, E], carries the scale
        k, v = k.contiguous(), v.contiguous()  # the overlapping views are copied (cheap: O(T * w * E))
        # adding a -inf/0 mask is 5x faster than masked_fill_ with a broadcast bool mask
        add = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
        dead = ~mask.any(dim=-1, keepdim=True) if zero_dead else None  # a row of -inf makes NaN
        p = q.new_empty(n_, nb, b, c)
        out = q.new_empty(n_, nb, b, ev)
        for part, mpart in _block_chunks(n_, nb, b * c * q.element_size(), mask.shape[0]):
            scores = torch.matmul(q[part], k[part].transpose(-1, -2)).add_(add[mpart])
            torch.ops.aten._softmax.out(scores, -1, False, out=p[part])
            if dead is not None:
                p[part].masked_fill_(dead[mpart], 0.0)
            torch.matmul(p[part], v[part], out=out[part])
        ctx.save_for_backward(q, k, v, p)
        ctx.chunk_args = (n_, nb, b * c * q.element_size())
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None]:  # type: ignore[override]
        q, k, v, p = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        for part, _ in _block_chunks(*ctx.chunk_args, 1):
            g, w = grad[part], p[part]
            dp = torch.matmul(g, v[part].transpose(-1, -2))
            ds = torch.ops.aten._softmax_backward_data(dp, w, -1, w.dtype)  # w * (dp - sum(w * dp))
            torch.matmul(ds, k[part], out=dq[part]).mul_(scale)
            torch.matmul(ds.transpose(-1, -2), q[part], out=dk[part])  # q carries the scale
            torch.matmul(w.transpose(-1, -2), g, out=dv[part])
        return dq, dk, dv, None, None


# scores per chunk of the matmul kernel: a chunk's scores, weights and gradients stay in cache.
# Measured (bf16 fwd+bwd, w=256, one thread, 1 MiB L2 / 32 MiB L3), ms at T = 2k / 8k: one pass
# 45-53 / 222, 1 MiB 32 / 145, 2 MiB 31-33 / 110-127, 4 MiB 31 / 137, 8 MiB 55 / 119
_CHUNK_BYTES = 2 << 20


def _block_chunks(n: int, nb: int, block_bytes: int, mask_n: int):
    """``(part, mask_part)`` index pairs that cover ``[n, nb]`` blocks in contiguous chunks of about
    ``_CHUNK_BYTES`` (``block_bytes`` per block): whole rows of ``nb`` blocks, or pieces of one row.
    ``mask_part`` indexes a mask of ``mask_n`` rows (1 = broadcast over ``n``)."""
    per = max(1, _CHUNK_BYTES // block_bytes)  # blocks per chunk
    if per >= nb:
        step = per // nb
        for i in range(0, n, step):
            rows = slice(i, min(n, i + step))
            yield (rows,), ((slice(None) if mask_n == 1 else rows),)
        return
    for i in range(n):
        for j in range(0, nb, per):
            blocks = slice(j, min(nb, j + per))
            yield (slice(i, i + 1), blocks), (slice(None) if mask_n == 1 else slice(i, i + 1), blocks)


@functools.lru_cache(maxsize=1)
def _cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX), so bf16 matmuls are fast."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _window_kernel(q: Tensor, dropout_p: float) -> str:
    """The automatic block kernel: ``"matmul"`` for bf16 on a CPU with native bf16 (no dropout), else ``"flash"``."""
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and not dropout_p and _cpu_has_fast_bf16():
        return "matmul"
    return "flash"


def _trim_to_window(
    lq: int, k: Tensor, v: Tensor, key_mask: Tensor | None, window: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Drop the cached keys no query can see: only the last ``window - 1`` before the first query."""
    start = max(0, k.shape[-2] - lq - (window - 1))
    if start:
        k, v = k[..., start:, :], v[..., start:, :]
        key_mask = key_mask if key_mask is None or key_mask.shape[-1] == 1 else key_mask[..., start:]
    return k, v, key_mask


def sliding_window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    key_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    block_size: int | None = None,
    kernel: str | None = None,
) -> Tensor:
    """Causal sliding-window attention, block-local: O(Lq * window) time and memory.

    Same result as ``scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(Lq, Lk,
    window) & key_mask)`` (bottom-right aligned, so ``Lk > Lq`` means a cached prefix). The queries
    are cut into blocks of ``b`` (chosen by a cost model unless ``block_size`` is given); block ``j``
    attends its own ``b`` keys and the ``n = ceil((window - 1) / b)`` blocks before it, all blocks in
    ONE fused SDPA call on gathered keys ``[blocks, (n + 1) * b, E]`` with a small ``[b, (n + 1) * b]``
    band mask, so the heavy work stays in the fused kernel and no ``[Lq, Lk]`` tensor is built.
    With ``block_size=None`` the first ``window - prefix`` queries, whose band is plain causal, run
    the causal kernel (which skips the upper triangle), so short inputs run at about dense causal's speed;
    the remaining queries run block-local where that pays (see :func:`window_uses_blocks`), else the
    dense kernel with the band mask. From ``Lq >= 16 * window`` on, all queries run block-local.

    ``key_mask``: bool, True = real key, broadcastable to ``[..., 1, Lk]`` (a key-padding mask).
    ``block_size``: None = automatic (block size and dense fallback by the cost model); an int
    forces the block-local path with that block size. Grouped-query k/v heads are expanded to q's heads.
    ``kernel``: how the blocks are computed. ``"flash"``: one fused SDPA call; ``"matmul"``: batched
    matmuls that keep the ``[b, c]`` weights (:class:`_BandMatmulAttention`, no dropout); None =
    ``"matmul"`` for bf16 on a CPU with native bf16 dot products, where it is 2-3x faster, else
    ``"flash"``. Both give the masked dense result (the matmul kernel rounds the scores to bf16).
    """
    if window < 1:
        raise ValueError(f"window ({window}) must be >= 1")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.dim() < 2 or key_mask.shape[-2] != 1):
        raise ValueError(
            f"key_mask must be a bool key-padding mask broadcastable to [..., 1, Lk], got {key_mask.dtype} "
            f"of shape {_shape(key_mask)}"
        )
    batch = _validate(q, k, v, key_mask, dropout_p, None)
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size ({block_size}) must be a positive int or None (automatic)")
    if kernel not in (None, "flash", "matmul"):
        raise ValueError(f"kernel ({kernel!r}) must be 'flash', 'matmul' or None (automatic)")
    if kernel == "matmul" and dropout_p:
        raise ValueError(f"kernel='matmul' has no dropout, got dropout_p={dropout_p}; use kernel='flash'")
    kernel = kernel or _window_kernel(q, dropout_p)
    lq, lk = q.shape[-2], k.shape[-2]
    if lk < lq:
        raise ValueError(f"sliding_window_attention needs Lk >= Lq (keys include the queries), got Lq={lq}, Lk={lk}")
    # each path drops the keys before the window itself: the block kernel skips them in its view
    # (a slice's backward would fill a zero tensor the size of k)
    path = "blocks" if block_size is not None else window_path(lq, lk, window, kernel)
    if path == "causal":
        k, v, key_mask = _trim_to_window(lq, k, v, key_mask, window)
        return scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=True, dropout_p=dropout_p)
    if path.startswith("head+"):
        # the first h queries see every key before them (the band is causal there): the causal kernel,
        # which skips the upper triangle, does them with the window's first `window` keys; the rest
        # run block-local (or dense) below
        start = max(0, lk - lq - (window - 1))  # keys before the window
        h = window - (lk - start - lq)  # 1 <= h < lq: the kept prefix is <= window - 1
        head_mask = key_mask if key_mask is None or key_mask.shape[-1] == 1 else key_mask[..., start : start + window]
        q_head, q_rest = q.split([h, lq - h], dim=-2)  # split: its backward is one cat, no zero fill
        head = scaled_dot_product_attention(
            q_head, k[..., start : start + window, :], v[..., start : start + window, :],
            attn_mask=head_mask, is_causal=True, dropout_p=dropout_p,
        )  # fmt: skip
        if path == "head+dense":  # too few queries left for blocks to pay
            tail = _window_dense(q_rest, k, v, window, key_mask, dropout_p)
        else:
            tail = _window_blocks(q_rest, k, v, window, key_mask, dropout_p, None, batch, kernel)
        return torch.cat([head, tail], dim=-2)
    return _window_blocks(q, k, v, window, key_mask, dropout_p, block_size, batch, kernel)


def window_path(lq: int, lk: int, window: int, kernel: str = "flash") -> str:
    """What :func:`sliding_window_attention` runs (``block_size=None``) for ``Lq`` queries, ``Lk`` keys.

    ``"causal"``: the window covers every key, the causal kernel. ``"blocks"``: all queries
    block-local (``Lq >= 16 * window``). ``"head+blocks"`` / ``"head+dense"``: the first
    ``window - prefix`` queries on the causal kernel, the rest block-local or on the dense kernel with
    the band mask, as :func:`window_uses_blocks` says for them (``kernel``: the block kernel,
    ``"flash"`` or ``"matmul"``; blocks pay earlier with the matmul kernel).
    """
    lk = min(lk, lq + window - 1)  # the keys it keeps
    if window >= lk:
        return "causal"
    if lq >= _ALL_BLOCKS_FROM * window:
        return "blocks"
    h = window - (lk - lq)  # the head's queries
    blocks = window_uses_blocks(lq - h, min(lk, lq - h + window - 1), window, kernel=kernel)
    return "head+blocks" if blocks else "head+dense"


def _window_dense(q: Tensor, k: Tensor, v: Tensor, window: int, key_mask: Tensor | None, dropout_p: float) -> Tensor:
    """The dense kernel with the band mask (keys trimmed to the window first)."""
    k, v, key_mask = _trim_to_window(q.shape[-2], k, v, key_mask, window)
    band = sliding_window_mask(q.shape[-2], k.shape[-2], window, q.device)  # [Lq, Lk]
    mask = band if key_mask is None else key_mask & band
    return scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def _window_blocks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    window: int,
    key_mask: Tensor | None,
    dropout_p: float,
    block_size: int | None,
    batch: tuple[int, ...],
    kernel: str = "flash",
) -> Tensor:
    """The block-local kernel of :func:`sliding_window_attention`; keys before the window are skipped
    here (not sliced off by the caller, whose slice's backward would fill a zero tensor)."""
    lq, lk = q.shape[-2], k.shape[-2]
    if q.dim() >= 4:
        k, v = _expand_kv_heads(k, v, q.shape[-3])
    start = max(0, lk - lq - (window - 1))  # keys before it no query sees
    prefix = lk - start - lq  # cached keys kept, <= window - 1
    b = _window_block_size(lq, window) if block_size is None else block_size
    n = -(-(window - 1) // b)  # whole previous blocks each block needs
    nb = -(-lq // b)  # query blocks
    lpad, rpad = n * b - prefix, nb * b - lq  # keys: [lpad zeros][prefix][Lq new][rpad zeros]

    e, ev = q.shape[-1], v.shape[-1]
    qf = q.expand(*batch, lq, e).reshape(-1, lq, e)  # [N, Lq, E], N = prod(batch)
    kf = k.expand(*batch, lk, e).reshape(-1, lk, e)
    vf = v.expand(*batch, lk, ev).reshape(-1, lk, ev)
    qb = (F.pad(qf, (0, 0, 0, rpad)) if rpad else qf).view(-1, nb, b, e)  # [N, nb, b, E]
    kb = _ShiftedKeyBlocks.apply(kf, start - lpad, n, nb, b)  # [N, nb, c, E], c = (n + 1) * b
    vb = _ShiftedKeyBlocks.apply(vf, start - lpad, n, nb, b)

    c = (n + 1) * b
    # band: local query i sits at padded position (j + n) * b + i, local key m at j * b + m
    dist = torch.arange(b, device=q.device)[:, None] + n * b - torch.arange(c, device=q.device)[None, :]
    band = (dist >= 0) & (dist < window)  # [b, c], the same for every block
    pos = torch.arange(nb, device=q.device)[:, None] * b + torch.arange(c, device=q.device)[None, :]
    if key_mask is None:
        # left padding is the only invalid key; right padding is only seen by padded queries
        mask = (band & (pos >= lpad)[:, None, :]).unsqueeze(0)  # [1, nb, b, c]: the kernel wants 4-D
        if kernel == "matmul":
            out = _BandMatmulAttention.apply(qb, kb, vb, mask, False)  # every query sees itself
        else:
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=float(dropout_p))
    else:
        real = key_mask.expand(*batch, 1, key_mask.shape[-1])[..., 0, :].reshape(-1, key_mask.shape[-1])
        real = real[:, start:] if real.shape[-1] > 1 else real.expand(-1, lk - start)  # [N, Lk kept]
        real = F.pad(real, (lpad, 0), value=False)
        real = F.pad(real, (0, rpad), value=True)  # [N, (nb + n) * b]
        valid = _key_blocks(real, n, nb, b)  # [N, nb, c]
        mask = band & valid[:, :, None, :]  # [N, nb, b, c]
        # a padded query may see only padding: both kernels zero such rows
        if kernel == "matmul":
            out = _BandMatmulAttention.apply(qb, kb, vb, mask, True)
        else:
            out = scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, dropout_p=dropout_p)
    return out.reshape(-1, nb * b, ev)[:, :lq].reshape(*batch, lq, ev)  # [..., Lq, Ev]


def _flex_mask_mod(offset: int, window: int | None, causal: bool, key_mask: Tensor | None):
    """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = may attend), bottom-right aligned."""

    def mask_mod(b, h, q_idx, kv_idx):  # type: ignore[no-untyped-def]
        dist = q_idx + offset - kv_idx  # > 0: the key is in the past
        keep = dist >= 0 if causal else dist == dist
        if window is not None:
            keep = keep & (dist < window) if causal else keep & (dist.abs() < window)
        if key_mask is not None:
            keep = keep & key_mask[b, kv_idx]
        return keep

    return mask_mod


def flex_masked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    window: int | None = None,
    key_mask: Tensor | None = None,
    compile: bool | None = None,
) -> Tensor:
    """Attention through ``torch.nn.attention.flex_attention`` with a block mask: skips empty tiles.

    ``q [B, H, Lq, E]``, ``k, v [B, H_kv, Lk, E]`` (grouped-query allowed); ``causal`` and ``window``
    are bottom-right aligned like :func:`sliding_window_mask`; ``key_mask [B, Lk]`` bool, True =
    real key. Rows that see nothing give zeros. The mask is turned into a ``BlockMask`` once per
    call, so fully masked tiles (above the diagonal, outside the window) cost nothing.

    ``compile``: run a ``torch.compile``-d kernel (default on CUDA, where FlexAttention is fast).
    On CPU torch 2.13 has no FlexAttention backward and, uncompiled, runs an unfused reference:
    forward only (inference, tests); training on CPU uses :func:`sliding_window_attention`.
    """
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flex_masked_attention needs 4-D [B, H, L, E] inputs, got q {_shape(q)}, k {_shape(k)}")
    if window is not None and window < 1:
        raise ValueError(f"window ({window}) must be >= 1 or None")
    batch = _validate(q, k, v, None, 0.0, None)
    b, h, lq, lk = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    if key_mask is not None and (key_mask.dtype != torch.bool or tuple(key_mask.shape) != (b, lk)):
        raise ValueError(f"key_mask must be bool [B={b}, Lk={lk}] (True = real key), got {key_mask.dtype} {_shape(key_mask)}")
    del batch
    compile = q.is_cuda if compile is None else compile
    mask_mod = _flex_mask_mod(lk - lq, window, causal, key_mask)
    block_mask = create_block_mask(mask_mod, b if key_mask is not None else None, None, lq, lk, device=q.device)
    # inside a compiled model the outer compile traces flex_attention itself
    fn = _compiled_flex() if compile and not torch.compiler.is_compiling() else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != h)


@functools.lru_cache(maxsize=1)
def flex_attention_available() -> bool:
    """True when this torch has ``torch.nn.attention.flex_attention`` (torch >= 2.5)."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():  # type: ignore[no-untyped-def]
    """``torch.compile(flex_attention)``, built on first use and kept (compiling costs seconds)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


WINDOW_KERNELS = ("auto", "blocks", "flex")

def choose_window_kernel(
    setting: str, *, cuda: bool, training: bool, cached: bool, padded: bool, dropout_p: float, flex_available: bool,
    head_dim: int = 64,
) -> str:
    """The kernel of a causal sliding-window layer: ``"blocks"`` (:func:`sliding_window_attention`)
    or ``"flex"`` (:func:`flex_masked_attention`, compiled on CUDA).

    ``"auto"`` takes FlexAttention on CUDA for training-shaped calls only (training mode, no KV
    cache, no padding mask, no dropout, a power-of-two head_dim >= 16, the shapes its kernels are
    built for): their shapes repeat, so its compiled kernel is reused;
    decoding (a new key length every step) and padded batches (a new length every batch) would
    recompile, and FlexAttention has no dropout. Everywhere else, and on CPU (no FlexAttention
    backward; compiled forward measured 7x slower than the blocks), the blocks. ``"flex"`` forces
    FlexAttention wherever it can run (not with dropout); ``"blocks"`` forces the blocks.
    """
    if setting not in WINDOW_KERNELS:
        raise ValueError(f"window_kernel ({setting!r}) must be one of {WINDOW_KERNELS}")
    if setting == "flex":
        if not flex_available:
            raise ValueError("window_kernel='flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
        if dropout_p:
            raise ValueError(f"window_kernel='flex' has no attention dropout, got dropout_p={dropout_p}; use 'blocks' or 'auto'")
        return "flex"
    pow2_head = head_dim >= 16 and not head_dim & (head_dim - 1)
    if setting == "auto" and cuda and training and not cached and not padded and not dropout_p and flex_available and pow2_head:
        return "flex"
    return "blocks"
