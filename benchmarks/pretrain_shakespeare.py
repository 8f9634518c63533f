"""Benchmark: character-level Tiny Shakespeare with nanoGPT's ``shakespeare_char`` CPU recipe.

Setting (issue 3): first 90% of characters train, last 10% val; 4 layers, 4 heads, 128 dims,
context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4 after 100 warmup steps, dropout 0,
AdamW betas (0.9, 0.99), weight decay 0.1, grad clip 1.0. Validation loss is estimated like
nanoGPT (mean over 200 random val batches) at the end; the full-pass val loss is reported too.

Peer in the same run (``--bare-steps N``, default 200): the same model and optimizer stepped by a
bare PyTorch loop with no engine around it, so ``engine_overhead`` = bare tokens/s / engine tokens/s.

    python benchmarks/pretrain_shakespeare.py                 # full run (~1-2 min on 2 idle cores)
    python benchmarks/pretrain_shakespeare.py --max-steps 200 # a quick check
    python benchmarks/pretrain_shakespeare.py --peer nanogpt /path/to/nanoGPT  # side by side

``--peer nanogpt PATH`` (PATH: a local checkout of karpathy/nanoGPT holding ``model.py``; never
downloaded here) trains nanoGPT's own ``GPT`` in the same process, with a loop equal to the inner
loop of nanoGPT's ``train.py`` (its ``get_batch``, ``get_lr``, ``configure_optimizers`` = AdamW,
fused only on CUDA, clip, ``zero_grad(set_to_none=True)``), at the same config and seed. The two
alternate in timed windows of ``--window`` steps (ours, then nanoGPT's, ...), so a change in
machine load hits both; the first window of each is warm-up and not counted. Both run on the
same torch threads. Printed: tokens/s of each, their ratio, train loss at equal steps, val loss
(200 random val batches each) at the end.

The last line of output is one JSON object (val_loss, tokens_per_s, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from selfattn.train.callbacks import Callback


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="input.txt (default: $SELFATTN_DATA_DIR/tinyshakespeare/input.txt)")
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--bare-steps", type=int, default=200, help="steps of the bare-loop peer (0 = skip)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--position", default="rope", choices=["learned", "rope", "alibi", "none"], help="position encoding (selfattn default: rope; nanoGPT uses learned)")
    ap.add_argument("--peer", nargs=2, metavar=("NAME", "PATH"), default=None, help="train a peer side by side: 'nanogpt PATH' (a local nanoGPT checkout)")
    ap.add_argument("--window", type=int, default=50, help="steps per timed window when alternating with --peer")
    ap.add_argument("--output", default=None, help="run directory (default: a temp dir)")
    args = ap.parse_args()
    if args.peer and args.peer[0] != "nanogpt":
        ap.error(f"--peer NAME must be 'nanogpt', got {args.peer[0]!r}")

    import torch

    from selfattn.train import PretrainConfig, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or str(Path(os.environ.get("SELFATTN_DATA_DIR", "../shared/data")) / "tinyshakespeare" / "input.txt")
    cfg = PretrainConfig.model_validate({
        "data": {"path": data, "tokenizer": "char", "block_size": 64, "val_fraction": 0.1, "sampling": "random"},
        "model": {"n_layers": 4, "n_heads": 4, "d_model": 128, "dropout": 0.0, "position": args.position, "bias": False},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 100, "decay_steps": 2000, "betas": [0.9, 0.99], "weight_decay": 0.1, "grad_clip": 1.0},
        "train": {"max_steps": args.max_steps, "batch_size": 12, "eval_every": args.max_steps, "eval_batches": 200, "log_every": args.window if args.peer else 50,
                  "checkpoint_every": 0, "device": args.device, "compile": args.compile, "seed": 1337},
    })
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.output) if args.output else Path(tmp) / "run"
        os.environ.setdefault("SELFATTN_HOME", str(Path(tmp) / "home"))
        peer = NanoGPTPeer(Path(args.peer[1]), data, args.window, args.device) if args.peer else None
        t0 = time.perf_counter()
        result = pretrain(cfg, out, callbacks=[peer] if peer else ())
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
    if peer:
        report["peer"] = peer.report(result.metrics)
    if bare:
        report["bare_loop_tokens_per_s"] = round(bare, 1)
        report["engine_overhead"] = round(bare / m["tokens_per_s"], 3)
    print(json.dumps(report))
    return 0


def bare_loop_tokens_per_s(model_dir: Path, steps: int, device: str) -> float:
    """The peer: the same model/optimizer stepped by a minimal loop (random tokens, no data, no engine)."""
    import torch

    from selfattn.io.checkpoint import load_pretrained
    from selfattn.nn.models import param_groups

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


class NanoGPTPeer(Callback):
    """nanoGPT's model and train.py inner loop, stepped ``window`` steps at every read-out of our run.

    Used as a training callback: ``on_step`` fires after every ``window`` engine steps (the engine's
    ``log_every``); the wall time since the previous peer window is our window (engine step, data,
    read-out and all), then the peer runs ``window`` steps of its own, timed the same way.
    """

    B, T = 12, 64  # batch, block: the same as the engine's config above

    def __init__(self, path: Path, data: str, window: int, device: str) -> None:
        import importlib.util

        import numpy as np
        import torch

        if not (path / "model.py").is_file():
            raise SystemExit(f"--peer nanogpt {path}: no model.py there (give a local checkout of karpathy/nanoGPT)")
        spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
        mod = importlib.util.module_from_spec(spec)
        assert spec.loader is not None
        spec.loader.exec_module(mod)
        text = Path(data).read_text(encoding="utf-8")
        # nanoGPT's data/shakespeare_char/prepare.py: sorted characters, first 90% train
        stoi = {c: i for i, c in enumerate(sorted(set(text)))}
        ids = np.array([stoi[c] for c in text], dtype=np.uint16)
        n = int(0.9 * len(ids))
        self.train_data, self.val_data = ids[:n], ids[n:]
        torch.manual_seed(1337)
        conf = mod.GPTConfig(block_size=self.T, vocab_size=len(stoi), n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
        self.model = mod.GPT(conf).to(device).train()
        self.opt = self.model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), torch.device(device).type)
        self.device, self.window = device, window
        self.gen = torch.Generator().manual_seed(1337)  # its own batch stream, apart from the engine's
        self.iter_num = 0
        self.windows: list[dict[str, float]] = []  # {"step", "ours_s", "peer_s", "ours_loss", "peer_loss"}
        self.resume_t = time.perf_counter()
        self.X, self.Y = self._get_batch("train")

    def _get_batch(self, split: str):
        import numpy as np
        import torch

        data = self.train_data if split == "train" else self.val_data
        ix = torch.randint(len(data) - self.T, (self.B,), generator=self.gen)
        x = torch.stack([torch.from_numpy(data[i : i + self.T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + self.T].astype(np.int64)) for i in ix])
        return x.to(self.device), y.to(self.device)

    @staticmethod
    def _get_lr(it: int, lr: float = 1e-3, min_lr: float = 1e-4, warmup: int = 100, decay: int = 2000) -> float:
        # nanoGPT train.py get_lr
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / (decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    def _steps(self, n: int) -> float:
        import torch

        total = 0.0
        for _ in range(n):
            lr = self._get_lr(self.iter_num)
            for group in self.opt.param_groups:
                group["lr"] = lr
            _, loss = self.model(self.X, self.Y)
            self.X, self.Y = self._get_batch("train")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            total += loss.item()  # train.py reads the loss every log_interval (1 in its CPU recipe)
            self.iter_num += 1
        return total / n

    def on_train_start(self, info: dict) -> None:
        self.resume_t = time.perf_counter()

    def on_step(self, step: int, metrics: dict) -> None:
        ours_s = time.perf_counter() - self.resume_t
        n = step - self.iter_num
        t0 = time.perf_counter()
        peer_loss = self._steps(n)
        peer_s = time.perf_counter() - t0
        self.windows.append({"step": step, "steps": n, "ours_s": ours_s, "peer_s": peer_s, "ours_loss": metrics["train_loss"], "peer_loss": peer_loss})
        self.resume_t = time.perf_counter()

    def report(self, ours: dict) -> dict:
        import torch

        self.model.eval()
        with torch.no_grad():
            val = sum(float(self.model(*self._get_batch("val"))[1]) for _ in range(200)) / 200
        timed = self.windows[1:] or self.windows  # the first window of each is warm-up
        tok = sum(w["steps"] for w in timed) * self.B * self.T
        ours_tps, peer_tps = tok / sum(w["ours_s"] for w in timed), tok / sum(w["peer_s"] for w in timed)
        per_window = [round((w["peer_s"] / w["ours_s"]), 3) for w in timed]
        marks = sorted({len(self.windows) // 4, len(self.windows) // 2, len(self.windows) - 1})
        return {
            "name": "nanogpt",
            "tokens_per_s": round(peer_tps, 1),
            "ours_tokens_per_s_windows": round(ours_tps, 1),
            "ratio_ours_over_peer": round(ours_tps / peer_tps, 3),
            "ratio_per_window_min_median_max": [min(per_window), sorted(per_window)[len(per_window) // 2], max(per_window)],
            "train_loss_at_steps": [{"step": self.windows[i]["step"], "ours": round(self.windows[i]["ours_loss"], 4), "peer": round(self.windows[i]["peer_loss"], 4)} for i in marks],
            "val_loss": {"ours": round(ours["val_loss"], 4), "peer": round(val, 4)},
            "windows": len(timed),
            "window_steps": self.window,
        }


if __name__ == "__main__":
    sys.exit(main())
