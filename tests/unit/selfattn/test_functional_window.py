"""Block-local sliding-window attention and float-mask thresholds, against float64 dense attention."""

from __future__ import annotations

import pytest
import torch

from selfattn.functional import (
    naive_attention,
    scaled_dot_product_attention,
    sliding_window_attention,
    sliding_window_mask,
    window_uses_blocks,
)


def _qkv(b, h, h_kv, lq, lk, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, h_kv, lk, e, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h_kv, lk, e, generator=g, dtype=torch.float64, requires_grad=True)
    return q, k, v


def _dense(q, k, v, window, key_mask):
    """Reference: the masked dense result in float64 (GQA heads repeated, band & padding mask)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = sliding_window_mask(q.shape[-2], k.shape[-2], window)
    if key_mask is not None:
        mask = mask & key_mask
    alive = mask.any(-1, keepdim=True)  # rows that see nothing give zeros
    return naive_attention(q, k, v, attn_mask=mask | ~alive) * alive


@pytest.mark.parametrize("block", [None, 1, 4, 5, 16])
@pytest.mark.parametrize(
    "lq, lk, window", [(23, 23, 6), (9, 23, 6), (1, 23, 6), (23, 23, 1), (17, 17, 40)],
    ids=["square", "cached-prefix", "decode-step", "window-1", "window-covers-all"],
)
@pytest.mark.parametrize("padded", [False, True])
def test_block_local_equals_masked_dense_with_gradients(block, lq, lk, window, padded):
    q, k, v = _qkv(2, 4, 2, lq, lk)  # grouped-query: 4 query heads, 2 kv heads
    key_mask = None
    if padded:
        key_mask = torch.ones(2, 1, 1, lk, dtype=torch.bool)
        key_mask[1, ..., : lk - 3] = False  # left padding: early queries of row 1 see nothing
        key_mask[0, ..., 4] = False  # a hole in row 0
    out = sliding_window_attention(q, k, v, window, key_mask=key_mask, block_size=block)
    ref = _dense(q, k, v, window, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g_got, g_want in zip(got, want):
        assert torch.isfinite(g_got).all()
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


def test_block_local_3d_inputs_and_dropout_shape():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 20, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = sliding_window_attention(q, k, v, 5, block_size=4)
    torch.testing.assert_close(out, naive_attention(q, k, v, attn_mask=sliding_window_mask(20, 20, 5)))
    dropped = sliding_window_attention(q, k, v, 5, block_size=4, dropout_p=0.5)
    assert dropped.shape == out.shape and not torch.allclose(dropped, out)


def test_cost_model_picks_blocks_only_where_they_pay():
    assert not window_uses_blocks(64, 64, 256)  # the window covers every key: plain causal
    assert not window_uses_blocks(300, 300, 256)  # blocks would visit more scores than dense
    assert window_uses_blocks(8192, 8192, 256)
    q, k, v = _qkv(1, 2, 2, 1, 600)
    torch.testing.assert_close(sliding_window_attention(q, k, v, 256), _dense(q, k, v, 256, None))


@pytest.mark.parametrize("mask_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_float_mask_from_a_lower_precision_minimum_is_masked(mask_dtype, dtype, path):
    """A row filled with some dtype's finfo.min is a fully masked row in every input dtype: zeros."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 4, 8, generator=g).to(dtype)  # 4 queries
    k, v = (torch.randn(2, 4, 5, 8, generator=g).to(dtype) for _ in range(2))  # 5 keys
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[2] = False  # query 2 attends nothing
    keep[0, 3:] = False
    mask = torch.zeros(4, 5).masked_fill(~keep, torch.finfo(mask_dtype).min).to(mask_dtype)
    for m in (mask, mask.to(dtype)):  # as built, and already cast to the input dtype
        if path == "fast":
            out = scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:
            out = scaled_dot_product_attention(q, k, v, attn_mask=m, return_weights=True)[0]
        assert torch.all(out[..., 2, :] == 0), "a row of finfo.min must come out as zeros"
        ref = naive_attention(q.double(), k.double(), v.double(), attn_mask=keep)
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        rows = [0, 1, 3]
        torch.testing.assert_close(out[..., rows, :].double(), ref[..., rows, :], rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "lq, lk", [(300, 300), (150, 320), (40, 300), (600, 600), (520, 700)],
    ids=["square", "cached-prefix", "short-tail", "long-all-blocks", "long-cached-prefix"],
)
@pytest.mark.parametrize("padded", [False, True])
def test_automatic_path_causal_head_and_blocks_equal_masked_dense(lq, lk, padded):
    """block_size=None: the causal head plus the block-local (or dense) rest, long enough for blocks."""
    window = 32
    if lq >= 100:  # the rest after the head is long enough for the block-local kernel
        assert window_uses_blocks(lq - window, lq - 1, window)
    q, k, v = _qkv(2, 4, 2, lq, lk)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, 1, 1, lk, dtype=torch.bool)
        key_mask[1, ..., : lk // 2] = False  # left padding past the head
        key_mask[0, ..., 7] = False
    out = sliding_window_attention(q, k, v, window, key_mask=key_mask)
    ref = _dense(q, k, v, window, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    for g_got, g_want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shift", [-7, -3, 0, 2, 5], ids=lambda s: f"shift{s}")
def test_shifted_key_blocks_equals_pad_and_slices_with_gradients(shift):
    """The strided gather and its own backward against an index gather and autograd (float64)."""
    from selfattn.functional import _ShiftedKeyBlocks

    n, nb, b, length = 2, 4, 3, 13  # 18 rows gathered; shift 5 crops the end, -7 pads past it
    x = torch.randn(2, length, 5, dtype=torch.float64, requires_grad=True)
    rows = (nb + n) * b
    idx = torch.arange(rows) + shift
    inside = (idx >= 0) & (idx < length)
    seq = torch.where(inside[None, :, None], x[:, idx.clamp(0, length - 1)], torch.zeros((), dtype=x.dtype))
    rows_of_block = torch.arange(nb)[:, None] * b + torch.arange((n + 1) * b)[None, :]  # [nb, c]
    want = seq[:, rows_of_block]  # block j: padded rows j*b .. (j+n+1)*b, gathered by index
    got = _ShiftedKeyBlocks.apply(x, shift, n, nb, b)
    assert torch.equal(got, want)
    grad = torch.randn_like(want)
    (g_got,), (g_want,) = torch.autograd.grad(got, x, grad), torch.autograd.grad(want, x, grad)
    torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: _ShiftedKeyBlocks.apply(t, shift, n, nb, b), (x,))


@pytest.mark.parametrize("block", [None, 4])
def test_long_cached_prefix_with_a_broadcast_key_mask_keeps_the_mask(block):
    """A key mask of one column (the same for every key) still masks once the prefix is trimmed."""
    q, k, v = _qkv(2, 4, 2, 40, 300)  # 300 keys, 40 queries, window 32: 229 keys are trimmed
    key_mask = torch.ones(2, 1, 1, 1, dtype=torch.bool)
    key_mask[1] = False  # row 1 sees nothing at all: zeros
    out = sliding_window_attention(q, k, v, 32, key_mask=key_mask, block_size=block)
    ref = _dense(q, k, v, 32, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize(
    "lq, lk, window, path",
    [(17, 17, 40, "causal"), (40, 40, 32, "head+dense"), (300, 300, 32, "head+blocks"), (150, 320, 32, "head+blocks"),
     (600, 600, 32, "blocks"), (1, 5000, 32, "causal"), (512, 2000, 32, "blocks")],
)
def test_window_path_names_the_kernels_used(lq, lk, window, path):
    """window_path is what the dispatch runs: each named path gives the masked dense result."""
    from selfattn.functional import window_path

    assert window_path(lq, lk, window) == path
    q, k, v = _qkv(1, 2, 2, lq, lk, e=4)
    out = sliding_window_attention(q, k, v, window)
    torch.testing.assert_close(out, _dense(q, k, v, window, None), rtol=1e-10, atol=1e-10)
