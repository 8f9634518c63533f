"""Block-local sliding-window attention and float-mask thresholds, against float64 dense attention."""

from __future__ import annotations

import pytest
import torch

from selfattn.nn.functional import naive_attention, scaled_dot_product_attention, sliding_window_mask
from selfattn.nn.window import sliding_window_attention, window_uses_blocks


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
@pytest.mark.parametrize("kernel", ["flash", "matmul"])
def test_block_local_equals_masked_dense_with_gradients(block, lq, lk, window, padded, kernel):
    q, k, v = _qkv(2, 4, 2, lq, lk)  # grouped-query: 4 query heads, 2 kv heads
    key_mask = None
    if padded:
        key_mask = torch.ones(2, 1, 1, lk, dtype=torch.bool)
        key_mask[1, ..., : lk - 3] = False  # left padding: early queries of row 1 see nothing
        key_mask[0, ..., 4] = False  # a hole in row 0
    out = sliding_window_attention(q, k, v, window, key_mask=key_mask, block_size=block, kernel=kernel)
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
@pytest.mark.parametrize("kernel", [None, "matmul"])
def test_automatic_path_causal_head_and_blocks_equal_masked_dense(lq, lk, padded, kernel):
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
    out = sliding_window_attention(q, k, v, window, key_mask=key_mask, kernel=kernel)
    ref = _dense(q, k, v, window, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    for g_got, g_want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shift", [-7, -3, 0, 2, 5], ids=lambda s: f"shift{s}")
def test_shifted_key_blocks_equals_pad_and_slices_with_gradients(shift):
    """The strided gather and its own backward against an index gather and autograd (float64)."""
    from selfattn.nn.window import _ShiftedKeyBlocks

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
    "lq, lk, window, kernel, path",
    [(17, 17, 40, "flash", "causal"), (40, 40, 32, "flash", "head+dense"), (53, 53, 32, "matmul", "head+blocks"), (53, 53, 32, "flash", "head+dense"),
     (300, 300, 32, "flash", "head+blocks"), (150, 320, 32, "flash", "head+blocks"), (600, 600, 32, "flash", "blocks"),
     (1, 5000, 32, "flash", "causal"), (512, 2000, 32, "flash", "blocks"), (512, 2000, 32, "matmul", "blocks")],
)
def test_window_path_names_the_kernels_used(lq, lk, window, kernel, path):
    """window_path is what the dispatch runs: each named path gives the masked dense result.
    Blocks pay earlier with the matmul kernel (its cost factor is lower)."""
    from selfattn.nn.window import window_path

    assert window_path(lq, lk, window, kernel) == path
    q, k, v = _qkv(1, 2, 2, lq, lk, e=4)
    out = sliding_window_attention(q, k, v, window, kernel=kernel)
    torch.testing.assert_close(out, _dense(q, k, v, window, None), rtol=1e-10, atol=1e-10)


def test_band_matmul_attention_gradcheck_with_rows_that_see_nothing():
    """The matmul kernel's own backward (five matmuls and the softmax backward) against finite
    differences, with a mask whose dead rows must give zeros and zero gradients."""
    from selfattn.nn.window import _BandMatmulAttention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 3, 4, 6, generator=g) > 0.4
    mask[0, 1, 2] = False  # a row with no key
    out = _BandMatmulAttention.apply(q, k, v, mask, True)
    alive = mask.any(-1, keepdim=True)
    want = naive_attention(q, k, v, attn_mask=mask | ~alive) * alive
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[0, 1, 2], torch.zeros(7, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: _BandMatmulAttention.apply(a, b, c, mask, True), (q, k, v))


@pytest.mark.parametrize("padded", [False, True])
def test_matmul_kernel_in_bf16_is_about_as_close_to_float64_as_the_flash_kernel(padded):
    """bf16: the matmul kernel rounds the scores to bf16 (flash keeps float32). Relative error
    (Frobenius) against the float64 dense result, outputs and gradients: measured 0.5-0.6% against
    flash's 0.35-0.5% (ratio 1.16-1.41 over 24 seeds); a wrong scale or mask gives errors of order 1."""
    q, k, v = _qkv(1, 4, 4, 640, 640, e=32, seed=5)
    key_mask = None
    if padded:
        key_mask = torch.ones(1, 1, 1, 640, dtype=torch.bool)
        key_mask[..., :100] = False
    ref = _dense(q, k, v, 64, key_mask)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=ref.dtype)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    rel = lambda got, ref: ((got.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    errors = {}
    for kernel in ("flash", "matmul"):
        qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
        out = sliding_window_attention(qb, kb, vb, 64, key_mask=key_mask, block_size=16, kernel=kernel)
        got = torch.autograd.grad(out, (qb, kb, vb), grad.bfloat16())
        errors[kernel] = [rel(out, ref)] + [rel(a, b) for a, b in zip(got, want)]
    assert all(e < 0.01 for e in errors["matmul"]), errors
    for got, base in zip(errors["matmul"], errors["flash"]):
        assert got <= 1.6 * base, errors


def test_automatic_kernel_choice_and_errors(monkeypatch):
    from selfattn.nn import window as functional

    bf16 = torch.zeros(1, 4, 2, dtype=torch.bfloat16)
    monkeypatch.setattr(functional, "_cpu_has_fast_bf16", lambda: True)
    assert functional._window_kernel(bf16, 0.0) == "matmul"
    assert functional._window_kernel(bf16, 0.1) == "flash"  # no dropout in the matmul kernel
    assert functional._window_kernel(bf16.float(), 0.0) == "flash"
    monkeypatch.setattr(functional, "_cpu_has_fast_bf16", lambda: False)
    assert functional._window_kernel(bf16, 0.0) == "flash"  # emulated bf16 matmuls are slow
    q = torch.zeros(1, 8, 4)
    with pytest.raises(ValueError, match="kernel \\('cuda'\\)"):
        sliding_window_attention(q, q, q, 2, kernel="cuda")
    with pytest.raises(ValueError, match="dropout_p=0.1"):
        sliding_window_attention(q, q, q, 2, kernel="matmul", dropout_p=0.1)


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 8 * 24 * 8, 2 * 6 * 8 * 24 * 8, 1 << 30], ids=["per-block", "3-blocks", "2-rows", "one-pass"])
@pytest.mark.parametrize("padded", [False, True])
def test_matmul_kernel_chunks_give_the_same_result(monkeypatch, chunk_bytes, padded):
    """The matmul kernel runs in chunks of _CHUNK_BYTES of scores (pieces of one row of blocks, or
    whole rows): every split gives the masked dense result, gradients included (float64)."""
    from selfattn.nn import window as functional

    monkeypatch.setattr(functional, "_CHUNK_BYTES", chunk_bytes)
    q, k, v = _qkv(2, 4, 2, 45, 45)  # block 8, window 16: 6 blocks of [8, 24] per head, 8 heads
    key_mask = None
    if padded:
        key_mask = torch.ones(2, 1, 1, 45, dtype=torch.bool)
        key_mask[1, ..., :30] = False  # the first blocks of row 1 see nothing
    out = sliding_window_attention(q, k, v, 16, key_mask=key_mask, block_size=8, kernel="matmul")
    ref = _dense(q, k, v, 16, key_mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    for g_got, g_want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)
