"""Benchmark: character-level Tiny Shakespeare with nanoGPT's ``shakespeare_char`` CPU recipe.

Setting (issue 3): first 90% of characters train, last 10% val; 4 layers, 4 heads, 128 dims,
context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4 after 100 warmup steps, dropout 0,
AdamW betas (0.9, 0.99), weight decay 0.1, grad clip 1.0. Validation loss is estimated like
nanoGPT (mean over 200 random val batches) at the end; the full-pass val loss is reported too.

Peer in the same run (``--bare-steps N``, default 200): the same model and optimizer stepped by a
bare PyTorch loop with no engine around it, so ``engine_overhead`` = bare tokens/s / engine tokens/s.

    python benchmarks/pretrain_shakespeare.py                 # full run (~1-2 min on 2 idle cores)
    python benchmarks/pretrain_shakespeare.py --max-steps 200 # a quick check

The last line of output is one JSON object (val_loss, tokens_per_s, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="input.txt (default: $SELFATTN_DATA_DIR/tinyshakespeare/input.txt)")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--bare-steps", type=int, default=200, help="steps of the bare-loop peer (0 = skip)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--position", default="rope", choices=["learned", "rope", "alibi", "none"], help="position encoding (selfattn default: rope; nanoGPT uses learned)")
    ap.add_argument("--output", default=None, help="run directory (default: a temp dir)")
    args = ap.parse_args()

    import torch

    from selfattn.train import PretrainConfig, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or str(Path(os.environ.get("SELFATTN_DATA_DIR", "../shared/data")) / "tinyshakespeare" / "input.txt")
    cfg = PretrainConfig.model_validate({
        "data": {"path": data, "tokenizer": "char", "block_size": 64, "val_fraction": 0.1, "sampling": "random"},
        "model": {"n_layers": 4, "n_heads": 4, "d_model": 128, "dropout": 0.0, "position": args.position, "bias": False},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "decay_steps": 2000, "betas": [0.9, 0.99], "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"max_steps": args.max_steps, "batch_size": 12, "eval_every": args.max_steps, "eval_batches": 200, "log_every": 50,
                  "checkpoint_every": 0, "device": args.device, "compile": args.compile, "seed": 1337},
    })
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output) if args.output else Path(tmp) / "run"
        os.environ.setdefault("SELFATTN_HOME", str(Path(tmp) / "home"))
        t0 = time.perf_counter()
        result = pretrain(cfg, out)
        wall = time.perf_counter() - t0
        bare = bare_loop_tokens_per_s(result.best_dir, args.bare_steps, args.device) if args.bare_steps else None
    m = result.metrics
    report = {
        "benchmark": "pretrain_shakespeare",
        "val_loss": round(m["val_loss"], 4),
        "val_loss_full_pass": round(m["best_loss"], 4),
        "train_loss": round(m["train_loss"], 4),
        "tokens_per_s": round(m["tokens_per_s"], 1),
        "train_time_s": round(m["train_time_s"], 1),
        "wall_s": round(wall, 1),
        "steps": int(m["steps"]),
        "device": args.device,
        "position": args.position,
        "threads": torch.get_num_threads(),
        "target": {"val_loss": 1.88, "tokens_per_s": 21000},
    }
    if bare:
        report["bare_loop_tokens_per_s"] = round(bare, 1)
        report["engine_overhead"] = round(bare / m["tokens_per_s"], 3)
    print(json.dumps(report))
    return 0


def bare_loop_tokens_per_s(model_dir: Path, steps: int, device: str) -> float:
    """The peer: the same model/optimizer stepped by a minimal loop (random tokens, no data, no engine)."""
    import torch

    from selfattn.checkpoint import load_pretrained
    from selfattn.models import param_groups

    model = load_pretrained(model_dir, map_location=device).model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.99))
    V = model.cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(V, (steps + 5, 12, 65), generator=g)
    for i in range(steps + 5):
        if i == 5:
            t0 = time.perf_counter()
        loss = model(x[i, :, :-1].to(device), targets=x[i, :, 1:].to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    float(loss.detach())
    return steps * 12 * 64 / (time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
