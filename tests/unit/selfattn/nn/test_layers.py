"""Norms, MLP and the pre-norm block, checked against torch's modules and hand-written math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfattn.config import ModelConfig
from selfattn.nn.layers import MLP, RMSNorm, TransformerBlock, make_norm


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=50, context_length=32, n_layers=2, d_model=32, n_heads=4)
    base.update(kw)
    return ModelConfig(**base)


def test_rmsnorm_matches_torch_and_float64():
    torch.manual_seed(0)
    ours = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
    ref = nn.RMSNorm(16, eps=1e-6)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 16) * 3
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)
    x64 = x.double()
    manual = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * ours.weight.double()
    torch.testing.assert_close(ours(x).double(), manual, atol=1e-5, rtol=1e-5)


def test_rmsnorm_low_precision_is_finite_and_keeps_dtype():
    norm = RMSNorm(8)
    x = torch.full((2, 8), 300.0, dtype=torch.float16)  # x**2 overflows fp16; computed in fp32 instead
    y = norm(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.ones(2, 8), atol=1e-3, rtol=0)


def test_make_norm():
    assert isinstance(make_norm(_cfg(norm="rmsnorm")), RMSNorm)
    ln = make_norm(_cfg(norm="layernorm", bias=False))
    assert isinstance(ln, nn.LayerNorm) and ln.bias is None
    assert make_norm(_cfg(norm="layernorm", bias=True)).bias is not None


def test_mlp_gelu_and_swiglu_match_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32)
    gelu = MLP(_cfg(mlp="gelu", d_ff=48))
    expected = gelu.down_proj(F.gelu(gelu.up_proj(x)))
    torch.testing.assert_close(gelu(x), expected)
    assert gelu.gate_proj is None and gelu.up_proj.out_features == 48

    swiglu = MLP(_cfg(mlp="swiglu"))
    w_gate, w_up, w_down = swiglu.gate_proj.weight, swiglu.up_proj.weight, swiglu.down_proj.weight
    expected = (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    torch.testing.assert_close(swiglu(x), expected)
    assert swiglu.up_proj.out_features == 4 * 32  # d_ff=None -> 4 * d_model


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_block_is_prenorm_residual(norm):
    torch.manual_seed(0)
    block = TransformerBlock(_cfg(norm=norm))
    x = torch.randn(2, 6, 32)
    h = x + block.attn(block.norm1(x), is_causal=True)
    expected = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(block(x), expected)


def test_block_passes_weights_mask_and_causality_through():
    torch.manual_seed(0)
    block = TransformerBlock(_cfg())
    x = torch.randn(2, 5, 32)
    out, weights = block(x, return_weights=True)
    assert weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 5))
    assert torch.all(weights.triu(diagonal=1) == 0)  # causal by default

    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    _, w_bi = block(x, attention_mask=mask, is_causal=False, return_weights=True)
    assert torch.all(w_bi[1, :, :, 3:] == 0)  # padded keys get no weight
    assert torch.all(w_bi[0] > 0)  # bidirectional: every key is visible
    # the real tokens' outputs do not depend on what the padding holds
    x2 = x.clone()
    x2[1, 3:] = torch.randn(2, 32)
    a = block(x, attention_mask=mask, is_causal=False)
    b = block(x2, attention_mask=mask, is_causal=False)
    torch.testing.assert_close(a[1, :3], b[1, :3])


def test_block_kv_cache_matches_full_pass():
    from selfattn.nn.kv_cache import KVCache

    torch.manual_seed(0)
    cfg = _cfg(n_kv_heads=2)
    block = TransformerBlock(cfg).eval()
    x = torch.randn(1, 7, 32)
    full = block(x)
    cache = KVCache(n_layers=1, batch_size=1, n_kv_heads=2, head_dim=cfg.head_dim, max_len=7)
    steps = [block(x[:, :4], kv_cache=cache, layer_idx=0)]
    steps += [block(x[:, t : t + 1], kv_cache=cache, layer_idx=0) for t in range(4, 7)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
