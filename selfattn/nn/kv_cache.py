"""KV caches for decoding: :class:`KVCache` (preallocated up to ``max_len``) and
:class:`RollingKVCache` (the last ``window - 1`` positions of a sliding-window model), on one
base, :class:`BaseKVCache` (per-layer tensors, positions seen, layer and shape checks, reset).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_positive_ints(owner: str, **values: int) -> None:
    """ValueError naming the first argument of ``owner`` that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner} {name} ({value}) must be a positive int")


class BaseKVCache:
    """Keys and values per layer, ``[batch_size, n_kv_heads, held, head_dim]`` each (kv heads
    unexpanded, keys already rotated when RoPE is used), and the positions each layer has seen.

    ``length`` is the number of positions seen by every layer (the next token's position);
    ``layer_length(i)`` is one layer's count. Subclasses decide what ``update`` keeps.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        held: int,
        limits: dict[str, int],
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        sizes = {"n_layers": n_layers, "batch_size": batch_size, "n_kv_heads": n_kv_heads, "head_dim": head_dim, **limits}
        _check_positive_ints(type(self).__name__, **sizes)
        self.n_layers = n_layers
        self.batch_size = batch_size
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        shape = (batch_size, n_kv_heads, held, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self._lengths = [0] * n_layers

    @property
    def length(self) -> int:
        """Positions seen by every layer (the absolute position of the next token)."""
        return min(self._lengths)

    def layer_length(self, layer_idx: int) -> int:
        self._check_layer(layer_idx)
        return self._lengths[layer_idx]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys and values of every layer."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def reset(self) -> None:
        """Forget every position (a :class:`KVCache` keeps its memory and overwrites it)."""
        self._lengths = [0] * self.n_layers

    def _check_layer(self, layer_idx: int) -> None:
        if not 0 <= layer_idx < self.n_layers:
            raise ValueError(f"layer_idx ({layer_idx}) must be in [0, {self.n_layers}) for this {type(self).__name__}")

    def _check_update(self, layer_idx: int, k: Tensor, v: Tensor) -> None:
        """``k, v`` must be ``[batch_size, n_kv_heads, t, head_dim]`` (the same shape) for a valid layer."""
        self._check_layer(layer_idx)
        expected = (self.batch_size, self.n_kv_heads, k.shape[-2] if k.dim() == 4 else -1, self.head_dim)
        if k.dim() != 4 or tuple(k.shape) != expected or tuple(v.shape) != tuple(k.shape):
            raise ValueError(
                f"{type(self).__name__}.update expects k and v of shape [batch={self.batch_size}, "
                f"n_kv_heads={self.n_kv_heads}, t, head_dim={self.head_dim}], got k {tuple(k.shape)}, v {tuple(v.shape)}"
            )


class KVCache(BaseKVCache):
    """Preallocated keys/values for incremental decoding, one pair of tensors per layer.

    Each layer holds ``k, v [batch_size, n_kv_heads, max_len, head_dim]``. ``update(layer_idx, k, v)``
    writes the new positions after the ones already held and returns views of everything so far.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            n_layers=n_layers, batch_size=batch_size, n_kv_heads=n_kv_heads, head_dim=head_dim,
            held=max_len, limits={"max_len": max_len}, device=device, dtype=dtype,
        )
        self.max_len = max_len

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v [B, n_kv_heads, t, head_dim]``; return ``(k_all, v_all) [B, n_kv_heads, S, head_dim]``."""
        self._check_update(layer_idx, k, v)
        start, t = self._lengths[layer_idx], k.shape[-2]
        if start + t > self.max_len:
            raise ValueError(
                f"KVCache full: layer {layer_idx} holds {start} positions, adding {t} exceeds max_len={self.max_len}"
            )
        self.k[layer_idx][:, :, start : start + t] = k
        self.v[layer_idx][:, :, start : start + t] = v
        self._lengths[layer_idx] = start + t
        return self.k[layer_idx][:, :, : start + t], self.v[layer_idx][:, :, : start + t]


class RollingKVCache(BaseKVCache):
    """A KV cache that keeps only the last ``window - 1`` positions per layer (sliding-window models).

    A causal sliding window of ``window`` keys means the next query sees itself and the ``window - 1``
    keys before it, so nothing older is ever read again: memory stays ``2 * n_layers * batch_size *
    n_kv_heads * (window - 1) * head_dim`` elements however long generation runs. Keys are cached
    already rotated (RoPE at their absolute positions), so dropping old ones changes nothing.
    ``length`` / ``layer_length(i)`` count every position seen (the next token's absolute position,
    what RoPE and ``context_length`` need); ``held(i)`` is how many are kept. ``update`` returns the
    kept keys followed by the new ones; the attention aligns them bottom-right.
    """

    def __init__(
        self,
        *,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        head_dim: int,
        window: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            n_layers=n_layers, batch_size=batch_size, n_kv_heads=n_kv_heads, head_dim=head_dim,
            held=0, limits={"window": window}, device=device, dtype=dtype,
        )
        self.window = window

    def held(self, layer_idx: int) -> int:
        """Positions actually kept for one layer (at most ``window - 1``)."""
        self._check_layer(layer_idx)
        return self.k[layer_idx].shape[-2]

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``k, v [B, n_kv_heads, t, head_dim]``; return the kept ones then the new ones ``[B, n_kv_heads, <= window - 1 + t, head_dim]``."""
        self._check_update(layer_idx, k, v)
        k_all = torch.cat([self.k[layer_idx], k], dim=-2)  # [B, H_kv, held + t, hd]
        v_all = torch.cat([self.v[layer_idx], v], dim=-2)
        keep = min(self.window - 1, k_all.shape[-2])
        # copies so the kept keys do not pin a long prefill tensor in memory
        self.k[layer_idx] = k_all[:, :, k_all.shape[-2] - keep :].clone()
        self.v[layer_idx] = v_all[:, :, v_all.shape[-2] - keep :].clone()
        self._lengths[layer_idx] += k.shape[-2]
        return k_all, v_all

    def reset(self) -> None:
        """Forget every position (and the kept keys and values)."""
        super().reset()
        self.k = [t[:, :, :0] for t in self.k]
        self.v = [t[:, :, :0] for t in self.v]
