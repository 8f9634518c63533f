"""MultiHeadAttention and KVCache against torch.nn.MultiheadAttention and explicit references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selfattn.nn.kv_cache import KVCache
from selfattn.nn.attention import MultiHeadAttention
from selfattn.config import ModelConfig
from selfattn.nn.functional import causal_mask, naive_attention, sliding_window_mask
from selfattn.nn.positions import apply_rotary

D, H = 32, 4


def _x(b: int = 2, t: int = 7, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, t, D, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _mha(seed: int = 0, **kw) -> MultiHeadAttention:
    torch.manual_seed(seed)
    kw = {"d_model": D, "n_heads": H, **kw}
    return MultiHeadAttention(**kw).double().eval()


def _cache(m: MultiHeadAttention, b: int = 2, max_len: int = 16) -> KVCache:
    return KVCache(
        n_layers=1, batch_size=b, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, max_len=max_len, dtype=torch.float64
    )


def _reference(m: MultiHeadAttention, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Projections + float64 naive attention with an explicit bool mask ``keep [.., T, T]``."""
    B, T, _ = x.shape
    q = m.q_proj(x).view(B, T, m.n_heads, m.head_dim).transpose(1, 2)
    k = m.k_proj(x).view(B, T, m.n_kv_heads, m.head_dim).transpose(1, 2)
    v = m.v_proj(x).view(B, T, m.n_kv_heads, m.head_dim).transpose(1, 2)
    if m.rotary is not None:
        cos, sin = m.rotary(T, dtype=x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    out = naive_attention(q, k, v, attn_mask=keep)
    return m.out_proj(out.transpose(1, 2).reshape(B, T, D))


# --------------------------------------------------------------------------- parity with torch.nn.MultiheadAttention


def _torch_twin(m: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(D, H, bias=True, batch_first=True).double().eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([m.q_proj.weight, m.k_proj.weight, m.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([m.q_proj.bias, m.k_proj.bias, m.v_proj.bias]))
        ref.out_proj.weight.copy_(m.out_proj.weight)
        ref.out_proj.bias.copy_(m.out_proj.bias)
    return ref


def test_parity_with_torch_multihead_attention():
    m = _mha(position="none", bias=True)
    ref = _torch_twin(m)
    x = _x()
    # bidirectional, no mask
    out, w = m(x, is_causal=False, return_weights=True)
    ref_out, ref_w = ref(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(m(x, is_causal=False), ref_out)  # fused path too
    # causal (torch's attn_mask: True = NOT allowed)
    future = ~causal_mask(7, 7)
    ref_out, ref_w = ref(x, x, x, attn_mask=future, need_weights=True, average_attn_weights=False)
    out, w = m(x, return_weights=True)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(m(x), ref_out)
    # key padding (ours: True = real token; torch's: True = padding)
    real = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    ref_out, _ = ref(x, x, x, key_padding_mask=~real)
    torch.testing.assert_close(m(x, attention_mask=real, is_causal=False), ref_out)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = _mha(n_kv_heads=2)
    mha = _mha(seed=1)
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.out_proj.weight.copy_(gqa.out_proj.weight)
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(2, gqa.head_dim, D)  # [H_kv, hd, D]
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(H * gqa.head_dim, D))
    x = _x()
    torch.testing.assert_close(gqa(x), mha(x))
    torch.testing.assert_close(gqa(x, return_weights=True)[1], mha(x, return_weights=True)[1])
    assert gqa.k_proj.weight.shape == (2 * gqa.head_dim, D)


@pytest.mark.parametrize("position", ["rope", "none", "learned"])
def test_forward_matches_float64_reference(position):
    m = _mha(position=position)
    x = _x()
    keep = causal_mask(7, 7)
    torch.testing.assert_close(m(x), _reference(m, x, keep))
    out, w = m(x, return_weights=True)
    torch.testing.assert_close(out, _reference(m, x, keep))
    assert w.shape == (2, H, 7, 7)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, H, 7, dtype=torch.float64))


def test_alibi_adds_distance_bias():
    m = _mha(position="alibi")
    x = _x()
    out, w = m(x, return_weights=True)
    torch.testing.assert_close(m(x), out)
    assert torch.all(w.triu(1) == 0)
    m_none = _mha(position="none")
    assert not torch.allclose(out, m_none(x))  # same weights (same seed), the bias changes the result


@pytest.mark.parametrize("n_kv_heads", [H, 2])
@pytest.mark.parametrize("is_causal", [True, False])
def test_alibi_matches_a_float64_reference_that_adds_the_bias_itself(is_causal, n_kv_heads):
    """ALiBi written out here, not with the library's helpers: scores ``q k^T / sqrt(hd) - m_h |i - j|``
    with the paper's slopes ``m_h = 2^(-8 (h + 1) / H)``, padding and the causal mask, softmax, values."""
    m = _mha(position="alibi", n_kv_heads=n_kv_heads)
    x = _x()
    B, T, hd = 2, 7, D // H
    real = torch.tensor([[True] * T, [False] * 2 + [True] * (T - 2)])  # row 1: left padding
    q = m.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
    k, v = (p(x).view(B, T, n_kv_heads, hd).transpose(1, 2).repeat_interleave(H // n_kv_heads, dim=1) for p in (m.k_proj, m.v_proj))
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)  # [H]
    pos = torch.arange(T, dtype=torch.float64)
    bias = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()  # [H, T, T]: farther keys weigh less
    seen = torch.ones(T, T, dtype=torch.bool)
    keep = real[:, None, None, :] & (seen.tril() if is_causal else seen)  # [B, 1, T, T]
    scores = (q @ k.transpose(-2, -1) / hd**0.5 + bias).masked_fill(~keep, float("-inf"))
    weights = scores.softmax(-1).nan_to_num()  # row 1's padded queries see no key under causal: zeros
    ref = m.out_proj((weights @ v).transpose(1, 2).reshape(B, T, D))
    alive = keep.any(-1).squeeze(1)  # [B, T] queries that see at least one key
    out, w = m(x, attention_mask=real, is_causal=is_causal, return_weights=True)
    torch.testing.assert_close(w * alive[:, None, :, None], weights)
    torch.testing.assert_close(out[alive], ref[alive])
    torch.testing.assert_close(m(x, attention_mask=real, is_causal=is_causal)[alive], ref[alive])  # the fused path too


# --------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
    "kw",
    [
        {"position": "rope"},
        {"position": "rope", "n_kv_heads": 2},
        {"position": "rope", "n_kv_heads": 1},
        {"position": "alibi", "n_kv_heads": 2},
        {"position": "none"},
        {"position": "rope", "attention": "sliding_window", "window": 3},
    ],
    ids=["rope", "gqa", "mqa", "alibi-gqa", "none", "sliding"],
)
def test_kv_cache_incremental_equals_full_forward(kw):
    m = _mha(**kw)
    x = _x(t=9)
    full = m(x)
    cache = _cache(m)
    # prefill 4 tokens at once, then decode one at a time
    steps = [m(x[:, :4], kv_cache=cache)] + [m(x[:, t : t + 1], kv_cache=cache) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == 9 and cache.layer_length(0) == 9
    assert cache.k[0].shape == (2, m.n_kv_heads, 16, m.head_dim)  # stored unexpanded
    # the cached weights cover every key so far
    cache.reset()
    assert cache.length == 0
    m(x[:, :8], kv_cache=cache)
    _, w = m(x[:, 8:], kv_cache=cache, return_weights=True)
    torch.testing.assert_close(w, m(x, return_weights=True)[1][:, :, 8:])


def test_kv_cache_with_padding_mask():
    m = _mha(n_kv_heads=2)
    x = _x(t=6)
    real = torch.tensor([[True] * 6, [True] * 5 + [False]])
    full = m(x, attention_mask=real)
    cache = _cache(m)
    steps = [m(x[:, t : t + 1], attention_mask=real[:, : t + 1], kv_cache=cache) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)


def test_kv_cache_two_layers_and_errors():
    m = _mha()
    cache = KVCache(n_layers=2, batch_size=2, n_kv_heads=H, head_dim=8, max_len=5, dtype=torch.float64)
    x = _x(t=3)
    m(x, kv_cache=cache, layer_idx=0)
    assert cache.length == 0 and cache.layer_length(0) == 3  # layer 1 has not seen them yet
    m(x, kv_cache=cache, layer_idx=1)
    assert cache.length == 3
    with pytest.raises(ValueError, match=r"KVCache full: layer 0 holds 3 positions, adding 3 exceeds max_len=5"):
        m(x, kv_cache=cache, layer_idx=0)
    with pytest.raises(ValueError, match=r"layer_idx \(2\) must be in \[0, 2\)"):
        m(x, kv_cache=cache, layer_idx=2)
    with pytest.raises(ValueError, match=r"batch=2, n_kv_heads=4, t, head_dim=8\], got k \(1, 4, 3, 8\)"):
        cache.update(0, torch.zeros(1, 4, 3, 8), torch.zeros(1, 4, 3, 8))
    with pytest.raises(ValueError, match=r"KVCache max_len \(0\)"):
        KVCache(n_layers=1, batch_size=1, n_kv_heads=1, head_dim=8, max_len=0)


# --------------------------------------------------------------------------- sliding window


def test_sliding_window_wide_equals_full():
    full = _mha()
    x = _x()
    for window in (7, 50):
        sw = _mha(attention="sliding_window", window=window)
        torch.testing.assert_close(sw(x), full(x))
        torch.testing.assert_close(sw(x, return_weights=True)[1], full(x, return_weights=True)[1])


@pytest.mark.parametrize("is_causal", [True, False])
def test_sliding_window_small_equals_banded_reference(is_causal):
    m = _mha(attention="sliding_window", window=3, position="rope")
    x = _x()
    band = sliding_window_mask(7, 7, 3, causal=is_causal)
    explicit = torch.tensor([[abs(i - j) < 3 and (j <= i or not is_causal) for j in range(7)] for i in range(7)])
    assert torch.equal(band, explicit)
    out, w = m(x, is_causal=is_causal, return_weights=True)
    torch.testing.assert_close(m(x, is_causal=is_causal), _reference(m, x, explicit))
    torch.testing.assert_close(out, _reference(m, x, explicit))
    assert torch.all(w[..., ~explicit] == 0)


def test_sliding_window_blockwise_path_equals_banded_mask_path():
    m = _mha(attention="sliding_window", window=3, n_kv_heads=2)
    x = _x(t=11)
    real = torch.tensor([[True] * 11, [False] * 2 + [True] * 9])
    banded = m(x, attention_mask=real, return_weights=True)[0]  # the weights path builds the band densely
    assert m.window_block is None and m._use_local_window(True, False)
    m.window_block = 4  # force the block-local path (3 blocks)
    torch.testing.assert_close(m(x, attention_mask=real), banded)
    torch.testing.assert_close(m(x), _reference(m, x, sliding_window_mask(11, 11, 3)))
    cache = _cache(m)  # prefill 9 (blockwise) then decode 2
    steps = [m(x[:, :9], kv_cache=cache)] + [m(x[:, t : t + 1], kv_cache=cache) for t in (9, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), m(x))


def test_window_kernel_choice():
    from selfattn.nn.window import choose_window_kernel

    train_shape = dict(cuda=True, training=True, cached=False, padded=False, dropout_p=0.0, flex_available=True, head_dim=64)
    assert choose_window_kernel("auto", **train_shape) == "flex"  # CUDA training: FlexAttention
    for flip in (dict(cuda=False), dict(training=False), dict(cached=True), dict(padded=True), dict(dropout_p=0.1),
                 dict(flex_available=False), dict(head_dim=48), dict(head_dim=8)):
        assert choose_window_kernel("auto", **{**train_shape, **flip}) == "blocks", flip
    assert choose_window_kernel("blocks", **train_shape) == "blocks"
    assert choose_window_kernel("flex", **{**train_shape, "cuda": False, "cached": True}) == "flex"
    with pytest.raises(ValueError, match="no attention dropout, got dropout_p=0.1"):
        choose_window_kernel("flex", **{**train_shape, "dropout_p": 0.1})
    with pytest.raises(ValueError, match="flex_attention"):
        choose_window_kernel("flex", **{**train_shape, "flex_available": False})
    with pytest.raises(ValueError, match="window_kernel \\('fast'\\) must be one of"):
        choose_window_kernel("fast", **train_shape)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_window_kernel_equals_the_blocks_in_the_layer():
    """The layer's FlexAttention path (forward only on CPU: no FlexAttention backward there) gives
    the blocks' result with padding and with a KV cache; CUDA runs it compiled with gradients
    (tests/unit/selfattn/test_devices.py)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    m = _mha(attention="sliding_window", window=3, n_kv_heads=2)
    x = _x(t=11)
    real = torch.tensor([[True] * 11, [False] * 2 + [True] * 9])
    with torch.no_grad():
        blocks = m(x, attention_mask=real), m(x)
        cache = _cache(m)
        blocks_cached = torch.cat([m(x[:, :9], kv_cache=cache)] + [m(x[:, t : t + 1], kv_cache=cache) for t in (9, 10)], dim=1)
        m.window_kernel = "flex"
        flex = m(x, attention_mask=real), m(x)
        cache = _cache(m)
        flex_cached = torch.cat([m(x[:, :9], kv_cache=cache)] + [m(x[:, t : t + 1], kv_cache=cache) for t in (9, 10)], dim=1)
    for a, b in zip(flex + (flex_cached,), blocks + (blocks_cached,)):
        torch.testing.assert_close(a, b)
    m.train()
    m.dropout = 0.1
    with pytest.raises(ValueError, match="no attention dropout"):
        m(x)


# --------------------------------------------------------------------------- low rank (Linformer)


def test_low_rank_identity_projection_equals_full():
    lr = _mha(attention="low_rank", low_rank_k=7, max_len=7, position="rope")
    full = _mha(position="rope")
    with torch.no_grad():
        lr.e_proj.copy_(torch.eye(7))
        lr.f_proj.copy_(torch.eye(7))
    x = _x()
    torch.testing.assert_close(lr(x, is_causal=False), full(x, is_causal=False))
    out, w = lr(x, is_causal=False, return_weights=True)
    assert w.shape == (2, H, 7, 7)


def test_low_rank_approximation_error_is_reported(record_property):
    """Relative error of Linformer vs full attention on a fixed input, default (random) projections."""
    x = _x(b=2, t=32)
    full = _mha(position="none")(x, is_causal=False)
    errors = {}
    for k in (4, 16, 32):
        lr = _mha(attention="low_rank", low_rank_k=k, max_len=32, position="none")  # same q/k/v/out weights
        errors[k] = ((lr(x, is_causal=False) - full).norm() / full.norm()).item()
        record_property(f"low_rank_rel_error_k{k}", errors[k])
    print("low_rank relative error vs full:", {k: round(e, 4) for k, e in errors.items()})
    assert all(0 < e < 10 for e in errors.values())
    # the approximation converges to full as the projection approaches the identity (k = max_len)
    lr = _mha(attention="low_rank", low_rank_k=32, max_len=32, position="none")
    gaps = []
    for t in (1.0, 0.5, 0.1, 0.0):
        with torch.no_grad():
            noise = torch.randn(32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64) / 32**0.5
            lr.e_proj.copy_(torch.eye(32) + t * noise)
            lr.f_proj.copy_(torch.eye(32) + t * noise)
        gaps.append(((lr(x, is_causal=False) - full).norm() / full.norm()).item())
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-12


def test_low_rank_ignores_padding_values_and_rejects_causal():
    m = _mha(attention="low_rank", low_rank_k=4, max_len=16, position="none")
    x = _x(t=6)
    real = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = m(x, attention_mask=real, is_causal=False)
    x2 = x.clone()
    x2[1, 4:] = 100.0  # change only the padding tokens
    torch.testing.assert_close(m(x2, attention_mask=real, is_causal=False)[1, :4], out[1, :4])
    with pytest.raises(ValueError, match=r"attention='low_rank'.*is_causal=True is not supported"):
        m(x)
    with pytest.raises(ValueError, match=r"sequence length \(20\) exceeds max_len \(16\)"):
        m(_x(t=20), is_causal=False)
    with pytest.raises(ValueError, match=r"does not support a kv_cache"):
        m(x, is_causal=False, kv_cache=_cache(m))


# --------------------------------------------------------------------------- dtype, dropout, config, errors


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_left_padding_no_nan(dtype):
    torch.manual_seed(0)
    m = MultiHeadAttention(d_model=D, n_heads=H, n_kv_heads=2).to(dtype).eval()
    x = _x(dtype=torch.float32).to(dtype)
    real = torch.tensor([[False, False] + [True] * 5, [True] * 7])  # left padding: padded queries see nothing
    out = m(x, attention_mask=real)
    assert out.dtype == dtype and not torch.isnan(out).any()
    out_w, _ = m(x, attention_mask=real, return_weights=True)
    assert not torch.isnan(out_w).any()
    ref = m.double()(x.double(), attention_mask=real)
    torch.testing.assert_close(out[0, 2:].double(), ref[0, 2:], atol=5e-2, rtol=5e-2)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = MultiHeadAttention(d_model=D, n_heads=H, dropout=0.5).double()
    x = _x()
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m.eval()(x))


def test_from_config_and_lora_target_names():
    cfg = ModelConfig(vocab_size=10, d_model=32, n_heads=4, n_kv_heads=2, attention="sliding_window", window=4, bias=True)
    m = MultiHeadAttention.from_config(cfg)
    assert (m.n_heads, m.n_kv_heads, m.head_dim, m.window, m.max_len, m.position) == (4, 2, 8, 4, 256, "rope")
    names = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    assert names == {"q_proj", "k_proj", "v_proj", "out_proj"}
    assert m.q_proj.bias is not None
    assert m(torch.randn(1, 5, 32)).shape == (1, 5, 32)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"n_heads": 5}, r"n_heads \(5\) must divide d_model \(32\)"),
        ({"n_kv_heads": 3}, r"n_kv_heads \(3\) must divide n_heads \(4\)"),
        ({"dropout": 1.0}, r"dropout \(1.0\) must be in \[0, 1\)"),
        ({"attention": "sparse"}, r"attention \('sparse'\) must be one of"),
        ({"position": "sinusoid"}, r"position \('sinusoid'\) must be one of"),
        ({"attention": "sliding_window"}, r"needs window >= 1.*got None"),
        ({"attention": "low_rank", "max_len": 8}, r"needs low_rank_k >= 1, got None"),
        ({"attention": "low_rank", "low_rank_k": 4}, r"needs max_len >= 1.*got None"),
        ({"attention": "low_rank", "low_rank_k": 4, "max_len": 8, "position": "alibi"}, r"cannot use position='alibi'"),
        ({"d_model": 12, "n_heads": 4}, r"position='rope' needs an even head_dim, got 3"),
    ],
)
def test_constructor_errors_name_values(kw, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**{"d_model": D, "n_heads": H, **kw})


def test_forward_errors_name_values():
    m = _mha()
    with pytest.raises(ValueError, match=r"x must be \[B, T, d_model=32\], got shape \(7, 32\)"):
        m(_x()[0])
    with pytest.raises(ValueError, match=r"attention_mask must be \[B=2, S=7\].*got shape \(2, 6\)"):
        m(_x(), attention_mask=torch.ones(2, 6, dtype=torch.bool))


def test_fused_qkv_projection_matches_separate_projections():
    import torch

    from selfattn.nn.attention import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=32, n_heads=4, n_kv_heads=2, position="rope").double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    q, k, v = attn._project(x, 3)  # the fused path: one stacked matmul, q and k rotated together
    ref_cos, ref_sin = attn.rotary(7, 3, dtype=torch.float64)  # [T, hd]
    from selfattn.nn.positions import apply_rotary

    def heads(t, n):  # [B, T, n*hd] -> [B, n, T, hd]
        return t.view(2, 7, n, 8).transpose(1, 2)

    torch.testing.assert_close(q, apply_rotary(heads(attn.q_proj(x), 4), ref_cos, ref_sin), rtol=0, atol=1e-12)
    torch.testing.assert_close(k, apply_rotary(heads(attn.k_proj(x), 2), ref_cos, ref_sin), rtol=0, atol=1e-12)
    torch.testing.assert_close(v, heads(attn.v_proj(x), 2), rtol=0, atol=1e-12)
