"""scaled_dot_product_attention vs PyTorch's SDPA and a float64 naive reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfattn.nn.functional import (
    causal_mask,
    naive_attention,
    scaled_dot_product_attention,
    sliding_window_mask,
)
from selfattn.nn.window import sliding_window_attention


def _qkv(*lead: int, lq: int = 5, lk: int = 7, e: int = 8, ev: int | None = None, kv_lead=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv_lead = lead if kv_lead is None else kv_lead
    q = torch.randn(*lead, lq, e, generator=g, dtype=dtype)
    k = torch.randn(*kv_lead, lk, e, generator=g, dtype=dtype)
    v = torch.randn(*kv_lead, lk, ev or e, generator=g, dtype=dtype)
    return q, k, v


def _both_paths(q, k, v, **kw):
    fast = scaled_dot_product_attention(q, k, v, **kw)
    ref, weights = scaled_dot_product_attention(q, k, v, return_weights=True, **kw)
    return fast, ref, weights


# --------------------------------------------------------------------------- the tutorial's worked example


def test_tutorial_worked_example_softmax_of_scores_001():
    """Scores [0, 0, 1] give softmax weights [0.2119, 0.2119, 0.5761] (the tutorial printed [1/3, 1/3, 2/3])."""
    # one query, three keys; q . k_j = [0, 0, 1] and scale=1 so the scores are exactly [0, 0, 1]
    q = torch.tensor([[1.0, 0.0]])  # [Lq=1, E=2]
    k = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 0.0]])  # [Lk=3, E=2]
    v = torch.eye(3)  # [Lk=3, Ev=3]: the output row *is* the weight vector
    out, w = scaled_dot_product_attention(q, k, v, scale=1.0, return_weights=True)
    expected = torch.tensor([[0.2119, 0.2119, 0.5761]])
    torch.testing.assert_close(w, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(w, torch.tensor([[1 / 3, 1 / 3, 2 / 3]]), atol=1e-2)
    # exact values: e^0 / (2 + e), e / (2 + e)
    torch.testing.assert_close(w[0, 2].double(), torch.tensor(math.e / (2 + math.e), dtype=torch.float64))


def test_docs_worked_example_x_times_w():
    """docs/attention.md: Q = X @ W_Q (rows are tokens), not W_Q @ X; every query scores [0, 0, 1]."""
    X = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # [T=3, d_model=2]
    W_Q, W_K = torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [1.0]])  # [d_model=2, d_k=1]
    W_V = torch.eye(2)  # [d_model=2, d_v=2]
    Q, K, V = X @ W_Q, X @ W_K, X @ W_V  # [3, 1], [3, 1], [3, 2]
    out, w = scaled_dot_product_attention(Q, K, V, return_weights=True)  # scale 1/sqrt(1) = 1
    torch.testing.assert_close(w, torch.tensor([[0.2119, 0.2119, 0.5761]]).expand(3, 3), atol=1e-4, rtol=0)
    torch.testing.assert_close(out, torch.tensor([[0.4239, 0.5761]]).expand(3, 2), atol=1e-4, rtol=0)


def test_default_scale_is_one_over_sqrt_e():
    q, k, v = _qkv(2, e=16)
    out = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, naive_attention(q, k, v, scale=1 / 4))
    assert not torch.allclose(out, naive_attention(q, k, v, scale=1.0))


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["3d", "4d"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_parity_no_mask(lead, scale):
    q, k, v = _qkv(*lead, ev=6)
    fast, ref, w = _both_paths(q, k, v, scale=scale)
    torch.testing.assert_close(fast, naive_attention(q, k, v, scale=scale))
    torch.testing.assert_close(ref, naive_attention(q, k, v, scale=scale))
    torch.testing.assert_close(fast, F.scaled_dot_product_attention(q, k, v, scale=scale))
    torch.testing.assert_close(w.sum(-1), torch.ones(*lead, 5, dtype=torch.float64))


@pytest.mark.parametrize(
    "mask_shape", [(5, 7), (1, 7), (2, 1, 5, 7), (2, 3, 5, 7), (1, 3, 1, 7)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_parity_masks_broadcast(mask_shape, kind):
    q, k, v = _qkv(2, 3)
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(*mask_shape, generator=g) > 0.3
        mask[..., 0] = True  # no fully masked rows here (those are tested separately)
    else:
        mask = torch.randn(*mask_shape, generator=g, dtype=torch.float64)
    fast, ref, _ = _both_paths(q, k, v, attn_mask=mask)
    expected = naive_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(ref, expected)
    torch.testing.assert_close(fast, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_causal_square_matches_torch():
    q, k, v = _qkv(2, 3, lq=6, lk=6)
    fast, ref, w = _both_paths(q, k, v, is_causal=True)
    torch.testing.assert_close(fast, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    torch.testing.assert_close(ref, fast)
    assert torch.all(w.triu(1) == 0)


def test_causal_bottom_right_when_lq_lt_lk():
    """Lq < Lk: query i sees keys j <= i + Lk - Lq (the last query sees everything)."""
    q, k, v = _qkv(2, 3, lq=3, lk=7)
    fast, ref, w = _both_paths(q, k, v, is_causal=True)
    explicit = torch.ones(3, 7, dtype=torch.bool).tril(diagonal=7 - 3)
    torch.testing.assert_close(causal_mask(3, 7), explicit, rtol=0, atol=0)
    torch.testing.assert_close(fast, F.scaled_dot_product_attention(q, k, v, attn_mask=explicit))
    torch.testing.assert_close(ref, naive_attention(q, k, v, is_causal=True))
    assert torch.all(w[..., -1, :] > 0)  # the newest query sees every key
    assert torch.all(w[..., 0, 5:] == 0)
    # ... which differs from torch's top-left is_causal
    assert not torch.allclose(fast, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_causal_combined_with_mask():
    q, k, v = _qkv(2, lq=6, lk=6)
    pad = torch.tensor([True] * 4 + [False] * 2)  # [Lk]
    fast, ref, _ = _both_paths(q, k, v, attn_mask=pad, is_causal=True)
    expected = naive_attention(q, k, v, attn_mask=pad & causal_mask(6, 6))
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(ref, expected)
    fmask = torch.randn(6, 6, dtype=torch.float64)
    fast, ref, _ = _both_paths(q, k, v, attn_mask=fmask, is_causal=True)
    torch.testing.assert_close(fast, naive_attention(q, k, v, attn_mask=fmask, is_causal=True))
    torch.testing.assert_close(ref, fast)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_matches_repeated_heads(kv_heads):
    q, k, v = _qkv(2, 4, kv_lead=(2, kv_heads))
    k_rep, v_rep = k.repeat_interleave(4 // kv_heads, dim=1), v.repeat_interleave(4 // kv_heads, dim=1)
    expected = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=False)
    fast, ref, w = _both_paths(q, k, v)
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(ref, expected)
    assert w.shape == (2, 4, 5, 7)
    # with causal + a mask, GQA still matches
    mask = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(3)) > 0.2
    mask[..., 0] = True
    fast, ref, _ = _both_paths(q, k, v, attn_mask=mask, is_causal=True)
    expected = naive_attention(q, k_rep, v_rep, attn_mask=mask, is_causal=True)
    torch.testing.assert_close(fast, expected)
    torch.testing.assert_close(ref, expected)


def test_gradcheck_float64():
    q, k, v = _qkv(1, 2, lq=3, lk=4, e=4)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = torch.tensor([[True, True, False, True]] * 3)
    fmask = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, attn_mask=mask), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, is_causal=True), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: scaled_dot_product_attention(a, b, c, attn_mask=fmask, return_weights=True)[0], (q, k, v)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: scaled_dot_product_attention(a, b, c, is_causal=True, return_weights=True)[1], (q, k, v)
    )
    # grouped-query: 4 query heads share 2 kv heads, fast and reference paths
    qg = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    kg, vg = (torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b, c: scaled_dot_product_attention(a, b, c, is_causal=True), (qg, kg, vg))
    assert torch.autograd.gradcheck(
        lambda a, b, c: scaled_dot_product_attention(a, b, c, return_weights=True)[0], (qg, kg, vg)
    )


def test_dropout_zero_weights_and_scaling():
    q, k, v = _qkv(2, 3)
    torch.manual_seed(0)
    out, w = scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True)
    assert out.shape == (2, 3, 5, 8) and torch.isfinite(out).all()
    torch.manual_seed(0)
    fast = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(fast, scaled_dot_product_attention(q, k, v))  # dropout did something


# --------------------------------------------------------------------------- fully masked rows, low precision


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_fully_masked_rows_give_zeros_and_finite_grads(kind, path):
    q, k, v = _qkv(2, 3, lq=4, lk=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[1] = False  # query 1 attends nothing
    mask = keep if kind == "bool" else torch.zeros(4, 5, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    out = (
        scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if path == "fast"
        else scaled_dot_product_attention(q, k, v, attn_mask=mask, return_weights=True)[0]
    )
    assert torch.all(out[..., 1, :] == 0)
    other = [0, 2, 3]
    torch.testing.assert_close(out[..., other, :], naive_attention(q, k, v)[..., other, :])
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[..., 1, :] == 0)


def test_fully_masked_rows_from_causal_lq_gt_lk():
    q, k, v = _qkv(2, lq=6, lk=4)  # first two queries precede every key
    fast, ref, w = _both_paths(q, k, v, is_causal=True)
    assert torch.all(fast[..., :2, :] == 0) and torch.all(ref[..., :2, :] == 0) and torch.all(w[..., :2, :] == 0)
    torch.testing.assert_close(fast[..., 2:, :], naive_attention(q, k, v, is_causal=True)[..., 2:, :])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["fast", "reference"])
def test_low_precision_masked_no_nan(dtype, path):
    q, k, v = _qkv(2, 2, lq=6, lk=6, dtype=torch.float32)
    keep = causal_mask(6, 6) & torch.tensor([True, True, True, True, False, False])
    keep[0] = False  # one fully masked row too
    fmin = torch.zeros(6, 6).masked_fill(~keep, torch.finfo(dtype).min)  # HF-style additive mask
    for mask in (keep, fmin.to(dtype)):
        args = (q.to(dtype), k.to(dtype), v.to(dtype))
        if path == "fast":
            out = scaled_dot_product_attention(*args, attn_mask=mask, is_causal=True)
        else:
            out = scaled_dot_product_attention(*args, attn_mask=mask, is_causal=True, return_weights=True)[0]
        assert out.dtype == dtype
        assert not torch.isnan(out).any()
        assert torch.all(out[..., 0, :] == 0)
        # rows 1.. against float64 (row 0 is fully masked)
        ref = naive_attention(q.double()[..., 1:, :], k.double(), v.double(), attn_mask=keep[1:])
        torch.testing.assert_close(out[..., 1:, :].double(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("gqa", [False, True])
def test_bf16_cpu_training_on_the_composed_path_gives_the_fused_results(gqa, monkeypatch):
    """bf16 on CPU with autograd recording and short keys, the composed path (two matmuls, a float32
    softmax) forced: the fused kernel's outputs and gradients, padded keys and a fully padded row included."""
    from selfattn.nn.functional import CPU_ATTENTION_ENV, COMPOSED_MAX_KEYS, composed_is_faster

    monkeypatch.setenv(CPU_ATTENTION_ENV, "composed")

    dtype = torch.bfloat16
    q, k, v = _qkv(3, 4, lq=9, lk=9, kv_lead=(3, 2 if gqa else 4), dtype=torch.float32)
    lengths = torch.tensor([9, 5, 0])  # the last row has no real key at all
    keep = (torch.arange(9)[None] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    grads = {}
    for path in ("selfattn", "torch", "float64"):
        leaves = [t.to(torch.float64 if path == "float64" else dtype).requires_grad_() for t in (q, k, v)]
        if path == "selfattn":
            assert composed_is_faster(*leaves)
            out = scaled_dot_product_attention(*leaves, attn_mask=keep)
        else:
            a, b, c = leaves
            if gqa:
                b, c = b.repeat_interleave(2, dim=-3), c.repeat_interleave(2, dim=-3)
            out = F.scaled_dot_product_attention(a, b, c, attn_mask=keep | (lengths == 0)[:, None, None, None])
            out = out.masked_fill((lengths == 0)[:, None, None, None], 0.0)  # what selfattn gives a row with no key
        (out.double() * torch.linspace(-1, 1, out.shape[-1], dtype=torch.float64)).sum().backward()
        grads[path] = [out.detach().double()] + [t.grad.double() for t in leaves]
    assert grads["selfattn"][0].dtype == torch.float64 and torch.all(grads["selfattn"][0][2] == 0)
    for ours, fused, exact in zip(grads["selfattn"], grads["torch"], grads["float64"]):
        torch.testing.assert_close(ours, exact, atol=3e-2, rtol=3e-2)
        assert (ours - exact).abs().max() <= (fused - exact).abs().max() * 2 + 1e-3  # no worse than the fused kernel

    fp32 = [t.clone().requires_grad_() for t in (q, k, v)]
    assert not composed_is_faster(*fp32)  # float32: the fused kernel, never measured
    monkeypatch.setenv(CPU_ATTENTION_ENV, "fused")
    assert not composed_is_faster(*[t.detach().to(dtype).requires_grad_() for t in (q, k, v)])
    monkeypatch.setenv(CPU_ATTENTION_ENV, "composed")
    low = [t.to(dtype) for t in (q, k, v)]
    assert not composed_is_faster(*low)  # inference: nothing records, the fused forward is fast
    long_k = torch.zeros(3, 4, COMPOSED_MAX_KEYS + 1, 8, dtype=dtype, requires_grad=True)
    assert not composed_is_faster(low[0].requires_grad_(), long_k, long_k)


def test_the_cpu_attention_path_is_the_one_measured_faster_once_per_bucket(monkeypatch):
    """Measured, not assumed: the composed path is taken where it ran faster (by 10%) on this very
    call's shapes, each (dtype, head dim, key bucket) is measured once per process, and nothing is
    measured for float32, inference or keys past COMPOSED_MAX_KEYS."""
    from selfattn.nn import functional as fn

    monkeypatch.delenv(fn.CPU_ATTENTION_ENV, raising=False)
    monkeypatch.setattr(fn, "_measured", {})
    timings = {}  # key length -> (fused s, composed s)
    calls = []

    def fake_time_both(q, k, v, attn_mask, is_causal, scale):
        calls.append((q.dtype, q.shape[-1], k.shape[-2]))
        return timings[k.shape[-2]]

    monkeypatch.setattr(fn, "_time_both", fake_time_both)

    def leaves(lk, dtype=torch.bfloat16, hd=8):
        return [torch.zeros(2, 4, n, hd, dtype=dtype, requires_grad=True) for n in (lk, lk, lk)]

    timings.update({20: (0.100, 0.050), 40: (0.100, 0.095), 200: (0.100, 0.080)})
    assert fn.composed_is_faster(*leaves(20))  # half the time: composed
    assert not fn.composed_is_faster(*leaves(40))  # 95%: within the margin, the fused kernel stays
    assert fn.composed_is_faster(*leaves(200))
    assert fn.composed_is_faster(*leaves(30)) and not fn.composed_is_faster(*leaves(64))  # same buckets: no new measurement
    assert calls == [(torch.bfloat16, 8, 20), (torch.bfloat16, 8, 40), (torch.bfloat16, 8, 200)]
    timings[20] = (0.100, 0.500)
    assert not fn.composed_is_faster(*leaves(20, hd=16))  # another head dim: measured again
    assert not fn.composed_is_faster(*leaves(20, dtype=torch.float16))  # another dtype too
    assert len(calls) == 5
    # never measured: float32, inference, past the key limit
    assert not fn.composed_is_faster(*leaves(20, dtype=torch.float32))
    with torch.no_grad():
        assert not fn.composed_is_faster(*leaves(20))
    assert not fn.composed_is_faster(*leaves(fn.COMPOSED_MAX_KEYS + 1))
    assert len(calls) == 5
    monkeypatch.setenv(fn.CPU_ATTENTION_ENV, "sometimes")
    with pytest.raises(ValueError, match="SELFATTN_CPU_ATTENTION='sometimes'"):
        fn.composed_is_faster(*leaves(20))


def test_the_measurement_times_both_paths_on_copies_and_leaves_the_inputs_alone():
    from selfattn.nn import functional as fn

    q, k, v = [torch.randn(2, 3, 12, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    keep = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    fused_s, composed_s = fn._time_both(q, k, v, keep, False, None)
    assert fused_s > 0 and composed_s > 0
    assert q.grad is None and k.grad is None and v.grad is None  # copies were differentiated, not the inputs


# --------------------------------------------------------------------------- helpers


def test_sliding_window_mask():
    m = sliding_window_mask(5, 5, 2)
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.bool
    )
    assert torch.equal(m, expected)
    assert torch.equal(sliding_window_mask(2, 5, 2), expected[3:])  # bottom-right aligned
    assert torch.equal(sliding_window_mask(5, 5, 9), causal_mask(5, 5))
    sym = sliding_window_mask(4, 4, 2, causal=False)
    assert torch.equal(sym, (torch.arange(4)[:, None] - torch.arange(4)[None]).abs() < 2)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(8), torch.randn(4, 8), torch.randn(4, 8)), r"at least 2 dims.*\(8,\)"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)), r"same rank.*3-D.*4-D"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 8)), r"head dim E.*E=8.*E=6"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 5, 8)), r"same length Lk.*Lk=4.*Lk=5"),
        (lambda: (torch.randn(2, 4, 3, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)), r"k/v heads \(3\).*q heads \(4\)"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8)), r"do not broadcast.*\(2,\) vs \(3,\)"),
        (lambda: (torch.randn(2, 3, 8), torch.randn(2, 4, 8).double(), torch.randn(2, 4, 8)), r"share a dtype"),
    ],
    ids=["rank1", "rank-mismatch", "head-dim", "kv-length", "gqa-heads", "batch", "dtype"],
)
def test_bad_shapes_raise_value_error_naming_values(make, match):
    q, k, v = make()
    with pytest.raises(ValueError, match=match):
        scaled_dot_product_attention(q, k, v)


def test_bad_mask_dropout_scale_raise():
    q, k, v = _qkv(2, 3)  # scores [2, 3, 5, 7]
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 7\) does not broadcast.*\(2, 3, 5, 7\)"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 1, 1\).*\(2, 3, 5, 7\)"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask of shape \(4, 2, 3, 5, 7\)"):  # would grow the output
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(4, 2, 3, 5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask must be bool.*torch.int64"):
        scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.long))
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"dropout_p \({p}\) must be in \[0, 1\)"):
            scaled_dot_product_attention(q, k, v, dropout_p=p)
    with pytest.raises(ValueError, match=r"scale \(nan\)"):
        scaled_dot_product_attention(q, k, v, scale=float("nan"))
    with pytest.raises(ValueError, match=r"window \(0\)"):
        sliding_window_mask(3, 3, 0)


@pytest.mark.parametrize("block", [2, 3, 4, 128])
@pytest.mark.parametrize("lq, lk", [(11, 11), (5, 11), (1, 11)], ids=["square", "cached-prefix", "one-step"])
def test_sliding_window_attention_blockwise_equals_banded_mask(block, lq, lk):
    q, k, v = _qkv(2, 4, lq=lq, lk=lk, kv_lead=(2, 2))  # GQA: 4 query heads, 2 kv heads
    real = torch.ones(2, 1, 1, lk, dtype=torch.bool)
    real[1, ..., :2] = False  # left padding in the second sequence
    out = sliding_window_attention(q, k, v, 3, key_mask=real, block_size=block)
    expected = scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(lq, lk, 3) & real)
    torch.testing.assert_close(out, expected)
    wide = sliding_window_attention(q, k, v, lk, block_size=block)  # window >= Lk: plain causal
    torch.testing.assert_close(wide, naive_attention(q, k, v, is_causal=True))
    with pytest.raises(ValueError, match=r"key_mask must be a bool key-padding mask.*\(2, 1, 4, 11\)"):
        sliding_window_attention(q, k, v, 3, key_mask=torch.ones(2, 1, 4, lk, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"block_size \(0\) must be a positive int"):
        sliding_window_attention(q, k, v, 3, block_size=0)
