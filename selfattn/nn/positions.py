"""Position information for attention: rotary (RoPE), learned absolute, ALiBi.

* :class:`RotaryEmbedding` + :func:`apply_rotary`: rotate query/key pairs by position-dependent
  angles (Su et al., 2021), "rotate-half" layout as in GPT-NeoX / Llama. ``offset`` gives the
  position of the first token, so a KV-cache decoding step rotates its one new token correctly.
  :func:`rope_inv_freq` holds the frequencies, optionally stretched (Llama 3.1's ``llama3``, ``linear``, ``yarn``).
* :class:`LearnedPositions`: an embedding table ``[max_len, d_model]`` added to the token
  embeddings by the model (the attention layer applies nothing for ``position="learned"``).
* :func:`alibi_slopes` / :func:`alibi_bias`: ALiBi (Press et al., 2022) linear distance penalties,
  one slope per head, added to the attention scores.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from selfattn.config import RopeScaling

__all__ = ["RotaryEmbedding", "rope_inv_freq", "rope_attention_factor", "apply_rotary", "LearnedPositions", "alibi_slopes", "alibi_bias"]


class RotaryEmbedding(nn.Module):
    """Cached cos/sin tables for rotary position embeddings.

    ``forward(seq_len, offset=0, device=None, dtype=None) -> (cos, sin)``, each ``[seq_len, head_dim]``
    for positions ``offset .. offset + seq_len - 1``. The table grows on demand (no max length). It is
    always computed and kept in float32 on the requested device, as plain attributes rather than
    buffers, so ``model.half()`` cannot round the frequencies and nothing lands in the state dict.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RotaryEmbedding needs an even head_dim >= 2, got {head_dim}")
        if not base > 0:
            raise ValueError(f"rope base ({base}) must be > 0")
        self.head_dim = head_dim
        self.base = float(base)
        self.scaling = scaling
        self._cos: Tensor | None = None  # [cached, head_dim] float32
        self._sin: Tensor | None = None

    def _table(self, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
        stale = self._cos is not None and self._cos.is_inference() and not torch.is_inference_mode_enabled()
        # a table built under inference_mode cannot enter autograd (e.g. gradients after a served prediction)
        if stale or self._cos is None or self._sin is None or self._cos.shape[0] < length or self._cos.device != device:
            cached = 0 if self._cos is None else self._cos.shape[0]
            length = max(length, 2 * cached)  # amortised growth
            inv_freq = rope_inv_freq(self.head_dim, self.base, self.scaling, device)  # [head_dim / 2]
            angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)  # [length, head_dim]
            factor = rope_attention_factor(self.scaling)  # YaRN scales both; 1 otherwise
            self._cos, self._sin = angles.cos() * factor, angles.sin() * factor
        return self._cos, self._sin

    def forward(
        self, seq_len: int, offset: int = 0, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        if seq_len < 0 or offset < 0:
            raise ValueError(f"seq_len ({seq_len}) and offset ({offset}) must be >= 0")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # so the cache's device compares equal
        cos, sin = self._table(offset + seq_len, device)
        cos, sin = cos[offset : offset + seq_len], sin[offset : offset + seq_len]
        return cos.to(dtype=dtype), sin.to(dtype=dtype)


def rope_inv_freq(
    head_dim: int, base: float, scaling: RopeScaling | None = None, device: torch.device | str | None = None
) -> Tensor:
    """``[head_dim / 2]`` float32 inverse frequencies ``base ** (-2i / head_dim)``, stretched by
    ``scaling`` (:class:`selfattn.config.RopeScaling`) the way Hugging Face's ``rope_type`` computes
    them, in the same float32 operations (so converted checkpoints rotate exactly as they did there).
    YaRN's cos/sin factor is :func:`rope_attention_factor`."""
    exponent = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (base**exponent)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "yarn":
        return _yarn_inv_freq(head_dim, base, scaling, device)
    if scaling.kind != "llama3":
        raise ValueError(f"rope scaling kind {scaling.kind!r} is not supported (linear, llama3, yarn)")
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_context_length
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long waves: interpolated
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(head_dim: int, base: float, scaling: RopeScaling, device: torch.device | str | None) -> Tensor:
    """YaRN (Peng et al., 2023): interpolated frequencies where a dimension turns fewer than
    ``beta_slow`` times in the pretraining context, kept ones above ``beta_fast``, a linear ramp between."""
    beta_fast, beta_slow = scaling.beta_fast or 32.0, scaling.beta_slow or 1.0
    old_len = scaling.original_context_length

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times in old_len
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    pos_freqs = base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (scaling.factor * pos_freqs)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1).to(device)
    keep = 1 - ramp  # 1: the dimension keeps its frequency
    return interpolation * (1 - keep) + extrapolation * keep


def rope_attention_factor(scaling: RopeScaling | None) -> float:
    """What cos and sin are multiplied by: YaRN's ``attention_factor`` (default ``0.1 ln(factor) + 1``), else 1."""
    if scaling is None or scaling.kind != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor
    return 1.0 if scaling.factor <= 1 else 0.1 * math.log(scaling.factor) + 1.0


def apply_rotary_rolled(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """:func:`apply_rotary` with ``signed_sin = cat([-sin_half, sin_half])``: the same result, bit for
    bit (only a sign moves), in fewer ops: ``roll`` replaces rotate-half's chunk, neg and cat."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def signed_sin(sin: Tensor) -> Tensor:
    """``sin [..., head_dim]`` -> ``cat([-sin[..., :hd/2], sin[..., hd/2:]])`` for :func:`apply_rotary_rolled`."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat([-s1, s2], dim=-1)


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [..., T, head_dim]`` by the angles in ``cos``/``sin [T, head_dim]`` (broadcast).

    ``x [B, T, H, head_dim]`` with ``cos``/``sin [T, 1, head_dim]`` works too (heads-last layout,
    before the transpose to ``[B, H, T, head_dim]``).
    """
    if cos.dim() == 3 and x.dim() >= 3:
        if x.shape[-1] != cos.shape[-1] or x.shape[-3] != cos.shape[0] or cos.shape[1] != 1:
            raise ValueError(
                f"apply_rotary: x {tuple(x.shape)} needs cos/sin of shape [T={x.shape[-3]}, 1, head_dim={x.shape[-1]}], "
                f"got {tuple(cos.shape)}"
            )
        return x * cos + _rotate_half(x) * sin
    if x.shape[-1] != cos.shape[-1] or x.shape[-2] != cos.shape[-2]:
        raise ValueError(
            f"apply_rotary: x {tuple(x.shape)} needs cos/sin of shape [T={x.shape[-2]}, head_dim={x.shape[-1]}], "
            f"got {tuple(cos.shape)}"
        )
    return x * cos + _rotate_half(x) * sin


class LearnedPositions(nn.Module):
    """Learned absolute positions: ``forward(seq_len, offset=0) -> [seq_len, d_model]``.

    The model adds the result to its token embeddings. Raises ``ValueError`` past ``max_len``.
    """

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        if max_len < 1 or d_model < 1:
            raise ValueError(f"LearnedPositions needs max_len >= 1 and d_model >= 1, got {max_len}, {d_model}")
        self.max_len = max_len
        self.embedding = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def forward(self, seq_len: int, offset: int = 0) -> Tensor:
        if offset < 0 or offset + seq_len > self.max_len:
            raise ValueError(
                f"positions {offset}..{offset + seq_len - 1} exceed the learned table (max_len={self.max_len})"
            )
        pos = torch.arange(offset, offset + seq_len, device=self.embedding.weight.device)
        return self.embedding(pos)  # [seq_len, d_model]


def alibi_slopes(n_heads: int) -> Tensor:
    """ALiBi head slopes ``[n_heads]``: the geometric sequence 2^(-8/n), 2^(-16/n), ...

    For a head count that is not a power of two, the slopes of the closest lower power of two are
    followed by every other slope of the next power (the reference implementation's rule).
    """
    if n_heads < 1:
        raise ValueError(f"n_heads ({n_heads}) must be >= 1")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(
    slopes: Tensor, lq: int, lk: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """ALiBi score bias ``[n_heads, lq, lk]``: ``-slope * |p - j|``.

    Query ``i`` has absolute position ``p = i + (lk - lq)`` (bottom-right aligned, as with a KV cache).
    The distance is symmetric, so the same bias serves causal attention (future keys are masked
    anyway) and bidirectional attention (the classifier).
    """
    p = torch.arange(lq, device=device).unsqueeze(-1) + (lk - lq)  # [lq, 1]
    j = torch.arange(lk, device=device).unsqueeze(0)  # [1, lk]
    dist = (p - j).abs().to(torch.float32)  # [lq, lk]
    bias = -slopes.to(device=device, dtype=torch.float32).view(-1, 1, 1) * dist  # [H, lq, lk]
    return bias.to(dtype)
