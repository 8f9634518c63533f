"""KV-cache bytes of a tiny sliding-window model after N generated tokens: rolling vs full cache.

    python benchmarks/rolling_cache.py --tokens 10000

2 layers, d_model 64, 4 heads, window 64, RoPE, fp32, B=1, greedy decoding one token at a time.
"""

from __future__ import annotations

import argparse
import json

import torch

from selfattn.config import ModelConfig
from selfattn.nn.models import DecoderLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=10000)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=65, context_length=args.tokens + 16, n_layers=2, d_model=64, n_heads=4,
                      attention="sliding_window", window=args.window, position="rope")
    model = DecoderLM(cfg).eval()
    rolling, full = model.new_kv_cache(1), model.new_kv_cache(1, rolling=False)
    peak = 0
    with torch.no_grad():
        ids = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(args.tokens):
            ids = model(ids, kv_cache=rolling).logits[:, -1:].argmax(-1)  # [1, 1]
            peak = max(peak, rolling.nbytes)
    print(json.dumps(dict(generated=args.tokens, window=args.window, rolling_cache_bytes=rolling.nbytes,
                          rolling_peak_bytes=peak, held_positions=rolling.held(0), positions_seen=rolling.length,
                          full_cache_bytes=full.nbytes)))


if __name__ == "__main__":
    main()
