"""Rolling KV cache for sliding-window models: same tokens as the full cache, memory bounded by the window."""

from __future__ import annotations

import pytest
import torch

from selfattn.nn.kv_cache import KVCache, RollingKVCache
from selfattn.config import ModelConfig
from selfattn.nn.models import DecoderLM


def _lm(position: str = "rope", window: int = 5, context_length: int = 96, **kw) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=53, context_length=context_length, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2,
        attention="sliding_window", window=window, position=position, **kw,
    )
    return DecoderLM(cfg).eval()


@pytest.mark.parametrize("position", ["rope", "learned", "alibi"])
def test_rolling_cache_generates_the_same_tokens_as_the_full_cache(position):
    lm = _lm(position)
    prompt = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(1))
    full = lm.generate(prompt, 16, temperature=0, rolling_cache=False)
    rolling = lm.generate(prompt, 16, temperature=0)  # default for windowed models
    assert torch.equal(rolling, full)
    # and both equal recomputing the whole sequence without any cache
    with torch.no_grad():
        logits = lm(full[:, :-1]).logits  # [B, T - 1, V]
    assert torch.equal(logits[:, prompt.shape[1] - 1 :].argmax(-1), full[:, prompt.shape[1] :])


def test_rolling_cache_memory_is_bounded_by_the_window():
    lm = _lm(window=4, context_length=40)
    rolling, full = lm.new_kv_cache(1), lm.new_kv_cache(1, rolling=False)
    assert isinstance(rolling, RollingKVCache) and isinstance(full, KVCache)
    ids = torch.randint(0, 53, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        lm(ids, kv_cache=rolling)  # prefill longer than the window
        sizes = []
        for t in range(20):
            lm(ids[:, t % 7 :][:, :1], kv_cache=rolling)
            sizes.append(rolling.nbytes)
    per_position = 2 * 2 * 1 * 2 * 8 * 4  # k+v, layers, batch, kv heads, head_dim, float32 bytes
    assert max(sizes) == 3 * per_position  # window - 1 positions per layer, never more
    assert rolling.length == 27 and rolling.held(0) == 3
    assert full.nbytes == 40 * per_position


def test_rolling_cache_refuses_a_layer_it_cannot_serve():
    lm = _lm(window=8)
    small = RollingKVCache(n_layers=2, batch_size=1, n_kv_heads=2, head_dim=8, window=4)
    with pytest.raises(ValueError, match=r"RollingKVCache \(window=4\).*window=8"):
        lm(torch.zeros(1, 3, dtype=torch.long), kv_cache=small)
    full_attention = DecoderLM(ModelConfig(vocab_size=53, context_length=32, n_layers=2, d_model=32, n_heads=4))
    with pytest.raises(ValueError, match=r"rolling=True needs attention='sliding_window', got 'full'"):
        full_attention.new_kv_cache(1, rolling=True)
