"""RoPE, learned absolute positions and ALiBi against direct formulas."""

from __future__ import annotations

import pytest
import torch

from selfattn.nn.positions import LearnedPositions, RotaryEmbedding, alibi_bias, alibi_slopes, apply_rotary


def _rope_complex_reference(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE as a complex rotation of the pairs (x[i], x[i + d/2]) by angle pos * base^(-2i/d)."""
    d = x.shape[-1]
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [d/2]
    angles = positions.double()[:, None] * freqs[None]  # [T, d/2]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double()) * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


@pytest.mark.parametrize("offset", [0, 5])
def test_rope_matches_complex_rotation(offset):
    rope = RotaryEmbedding(8, base=100.0)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    cos, sin = rope(6, offset, dtype=torch.float64)
    out = apply_rotary(x, cos, sin)
    expected = _rope_complex_reference(x, torch.arange(offset, offset + 6), 100.0)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # table is float32
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-6, rtol=1e-6)


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    cos, sin = rope(40, dtype=torch.float64)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rotary(q[None], cos[m : m + 1], sin[m : m + 1]) @ apply_rotary(k[None], cos[n : n + 1], sin[n : n + 1]).T

    torch.testing.assert_close(score(3, 1), score(33, 31), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(0, 0), (q @ k)[None, None])


def test_rope_offset_slices_the_same_table_and_grows():
    rope = RotaryEmbedding(4)
    cos_a, sin_a = rope(4)
    cos_b, sin_b = rope(3, offset=1000)  # grows the cache
    cos_full, sin_full = rope(1003)
    torch.testing.assert_close(cos_b, cos_full[1000:])
    torch.testing.assert_close(sin_a, sin_full[:4])
    assert "inv_freq" not in rope.state_dict() and len(rope.state_dict()) == 0


def test_rope_and_apply_rotary_bad_input():
    with pytest.raises(ValueError, match=r"even head_dim >= 2, got 5"):
        RotaryEmbedding(5)
    with pytest.raises(ValueError, match=r"rope base \(0.0\)"):
        RotaryEmbedding(4, base=0.0)
    cos, sin = RotaryEmbedding(4)(3)
    with pytest.raises(ValueError, match=r"x \(2, 5, 4\).*\[T=5, head_dim=4\].*\(3, 4\)"):
        apply_rotary(torch.randn(2, 5, 4), cos, sin)


def test_learned_positions():
    pos = LearnedPositions(10, 6)
    out = pos(4, offset=3)
    assert out.shape == (4, 6)
    torch.testing.assert_close(out, pos.embedding.weight[3:7])
    with pytest.raises(ValueError, match=r"positions 8\.\.10 exceed the learned table \(max_len=10\)"):
        pos(3, offset=8)


def test_alibi_slopes_known_values():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    # 6 heads: the 4-head slopes, then every other 8-head slope
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]))
    with pytest.raises(ValueError, match=r"n_heads \(0\)"):
        alibi_slopes(0)


def test_alibi_bias_values_and_bottom_right_alignment():
    slopes = alibi_slopes(2)  # [1/16, 1/256]
    bias = alibi_bias(slopes, 4, 4)
    dist = (torch.arange(4)[:, None] - torch.arange(4)[None]).abs().float()
    torch.testing.assert_close(bias, -slopes[:, None, None] * dist)
    torch.testing.assert_close(alibi_bias(slopes, 1, 4), bias[:, -1:])  # the newest query of a KV-cache step


def test_rope_table_stays_float32_after_half():
    rope = RotaryEmbedding(8, base=10000.0).half()
    cos, _ = rope(300, dtype=torch.float32)
    expected, _ = RotaryEmbedding(8)(300)
    torch.testing.assert_close(cos, expected, rtol=0, atol=0)  # frequencies were not rounded to fp16
    assert rope(4, dtype=torch.float16)[0].dtype == torch.float16


def test_apply_rotary_rolled_is_bit_identical_to_rotate_half():
    import torch

    from selfattn.nn.positions import RotaryEmbedding, apply_rotary, apply_rotary_rolled, signed_sin

    cos, sin = RotaryEmbedding(16)(10, 3)  # [T, hd]
    x = torch.randn(2, 10, 3, 16, generator=torch.Generator().manual_seed(0))  # [B, T, H, hd]
    ref = apply_rotary(x.transpose(1, 2), cos, sin).transpose(1, 2)  # the [B, H, T, hd] layout
    assert torch.equal(apply_rotary_rolled(x, cos[:, None], signed_sin(sin)[:, None]), ref)
