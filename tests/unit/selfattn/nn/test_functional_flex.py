"""FlexAttention block masks (causal, window, padding) against the masked dense result."""

from __future__ import annotations

import pytest
import torch

from selfattn.nn.window import flex_masked_attention
from selfattn.nn.functional import naive_attention, sliding_window_mask

pytest.importorskip("torch.nn.attention.flex_attention")


def _dense(q, k, v, causal, window, key_mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    lq, lk = q.shape[-2], k.shape[-2]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
    if window is not None:
        mask = sliding_window_mask(lq, lk, window, q.device, causal=causal)
    elif causal:
        mask = sliding_window_mask(lq, lk, lk + lq, q.device)
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :]
    alive = mask.any(-1, keepdim=True)
    return naive_attention(q, k, v, attn_mask=mask | ~alive) * alive


def _check(device, dtype, compile, tol, backward):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 24, 16, generator=g, dtype=dtype).to(device).requires_grad_(backward)
    k, v = (torch.randn(2, 2, 40, 16, generator=g, dtype=dtype).to(device).requires_grad_(backward) for _ in range(2))
    key_mask = torch.ones(2, 40, dtype=torch.bool, device=device)
    key_mask[1, :25] = False  # left padding: the first queries of row 1 see nothing
    for causal, window, km in [(True, None, None), (True, 6, None), (True, 6, key_mask), (False, None, key_mask)]:
        out = flex_masked_attention(q, k, v, causal=causal, window=window, key_mask=km, compile=compile)
        ref = _dense(q.double(), k.double(), v.double(), causal, window, km)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        if not backward:
            continue
        grad = torch.randn_like(ref)
        got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
        want = torch.autograd.grad(ref, (q, k, v), grad)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.double(), b.double(), rtol=tol * 10, atol=tol * 10)


@pytest.mark.slow  # torch's unfused CPU reference of FlexAttention takes ~10 s on 2 cores
def test_flex_block_masks_match_dense_on_cpu_float64():
    # torch 2.13 has no FlexAttention backward on CPU: forward only here, gradients on CUDA
    _check("cpu", torch.float64, compile=False, tol=1e-8, backward=False)


@pytest.mark.cuda
def test_flex_block_masks_match_dense_on_cuda_compiled():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check("cuda", torch.float32, compile=True, tol=2e-3, backward=True)
