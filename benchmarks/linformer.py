"""Low-rank (Linformer) attention against full attention: fwd+bwd time and memory at T=1k-8k, and
Tiny Shakespeare val loss at equal steps (tiny bidirectional-free setting: see below).

    python benchmarks/linformer.py --lengths 1024 2048 4096 8192 --steps 150

Time/memory: one MultiHeadAttention layer (d_model 512, 8 heads, k=256), B=1, float32, CPU time
with one thread (the machine is shared), peak RSS above the start (benchmarks/attention.py).
Quality: Linformer is bidirectional only (a projected key mixes past and future tokens), so it
cannot be a causal LM. The quality check is masked-character prediction on Tiny Shakespeare
(15% of characters replaced by a mask id, bidirectional trunk, equal steps and seeds): val loss of
low_rank against full.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.attention import CpuPeakMemory
from selfattn.nn.attention import MultiHeadAttention
from selfattn.config import ModelConfig
from selfattn.nn.models import DecoderLM


def _time_layer(attention: str, t: int, repeats: int, meter: CpuPeakMemory) -> tuple[float, int | None]:
    torch.manual_seed(0)
    layer = MultiHeadAttention(d_model=512, n_heads=8, attention=attention, low_rank_k=256 if attention == "low_rank" else None,
                               max_len=t, position="none")
    x = torch.randn(1, t, 512, requires_grad=True)

    def step() -> None:
        layer(x, is_causal=False).sum().backward()

    step()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        step()
        best = min(best, time.process_time() - start)
    return best, meter.measure(step)


def _masked_lm_loss(attention: str, text: str, steps: int, seq: int = 128) -> float:
    chars = sorted(set(text))
    stoi = {c: i + 1 for i, c in enumerate(chars)}  # 0 = mask id
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    cfg = ModelConfig(vocab_size=len(chars) + 1, context_length=seq, n_layers=2, d_model=64, n_heads=4,
                      position="learned")
    torch.manual_seed(0)
    model = DecoderLM(cfg)  # used as a bidirectional trunk + tied head (is_causal=False below)
    if attention == "low_rank":  # DecoderLM refuses low_rank (causal LM); swap the layers in
        lr_cfg = cfg.model_copy(update={"attention": "low_rank", "low_rank_k": 32})
        for block in model.blocks:
            block.attn = MultiHeadAttention.from_config(lr_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)

    def batch(src: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(len(src) - seq, (16,), generator=gen)
        y = torch.stack([src[i : i + seq] for i in ix])
        hide = torch.rand(y.shape, generator=gen) < 0.15
        x = y.masked_fill(hide, 0)
        return x, y.masked_fill(~hide, -100)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h, _ = model._hidden_states(x, attention_mask=None, is_causal=False, kv_cache=None, return_attention=False)
        logits = model.lm_head(h)  # [B, T, V]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)

    for _ in range(steps):
        x, y = batch(train, g)
        loss = loss_of(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    gv = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return float(torch.stack([loss_of(*batch(val, gv)) for _ in range(20)]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--data", default=os.path.join(os.environ.get("SELFATTN_DATA_DIR", "."), "tinyshakespeare/input.txt"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    meter = CpuPeakMemory()
    rows = []
    for t in [] if args.skip_timing else args.lengths:
        (tf, mf), (tl, ml) = _time_layer("full", t, args.repeats, meter), _time_layer("low_rank", t, args.repeats, meter)
        row = dict(T=t, full_ms=tf * 1e3, low_rank_ms=tl * 1e3, speedup=tf / tl, full_peak_bytes=mf, low_rank_peak_bytes=ml)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.steps == 0:
        print(json.dumps({"linformer_vs_full": rows}))
        return
    text = Path(args.data).read_text()
    quality = {a: _masked_lm_loss(a, text, args.steps) for a in ("full", "low_rank")}
    print(json.dumps({"linformer_vs_full": rows, "masked_char_val_loss": quality, "steps": args.steps}))


if __name__ == "__main__":
    main()
