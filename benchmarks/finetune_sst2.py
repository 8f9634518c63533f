"""Benchmark: SST-2 dev accuracy for (a) a classifier from scratch, (b) fine-tuned from our own
pretraining, (c) LoRA on that same pretraining. Wall time and tokens/s for each stage.

Pretraining is a causal LM on the SST-2 training sentences without their labels. Model selection
uses a held-out slice of the training phrases (``--val-fraction``); the dev set is only used for
the final number, as published SST-2 results report it.

    python benchmarks/finetune_sst2.py                       # full recipe, bounded by --budget-minutes (30)
    python benchmarks/finetune_sst2.py --scale 0.1           # a quick check (10% of the steps)

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from selfattn.train import Callback, StopTraining

# the recipe (see docs/training.md): BPE on SST-2 train, 4 layers x 128 dims, max_length 64, phrases
RECIPE = {
    "vocab_size": 4096,
    "arch": {"n_layers": 4, "d_model": 128, "n_heads": 4, "dropout": 0.1, "position": "rope"},
    "pretrain_steps": 3000, "pretrain_batch": 32, "pretrain_lr": 1e-3,
    "scratch_steps": 3000, "scratch_lr": 5e-4,
    "finetune_steps": 2000, "finetune_lr": 3e-4,
    "lora_steps": 2000, "lora_lr": 2e-3, "lora_rank": 8,
    "batch": 64, "max_length": 64,
}
BUDGET_SHARE = {"pretrain": 0.3, "scratch": 0.25, "finetune": 0.25, "lora": 0.2}


class TimeBudget(Callback):
    """Ends a stage gracefully (StopTraining) once its share of the budget is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0, self.hit = seconds, time.perf_counter(), False

    def on_step(self, step, metrics):
        if time.perf_counter() - self.t0 > self.seconds:
            self.hit = True
            raise StopTraining


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("SELFATTN_DATA_DIR", "../shared/data"))
    ap.add_argument("--budget-minutes", type=float, default=30.0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick checks)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--stages", default="scratch,pretrain,finetune,lora")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import torch

    from selfattn.evaluate import evaluate_checkpoint
    from selfattn.train import FinetuneConfig, PretrainConfig, finetune, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    r, budget = RECIPE, args.budget_minutes * 60
    sst2 = Path(args.data_dir) / "sst2"
    stages = args.stages.split(",")
    steps = lambda n: max(int(n * args.scale), 10)  # noqa: E731
    train_common = {"batch_size": r["batch"], "log_every": 50, "checkpoint_every": 0, "device": args.device, "early_stopping_metric": "val_accuracy", "eval_batch_size": 256}
    data = {"train_path": str(sst2 / "train.tsv"), "val_fraction": args.val_fraction, "tokenizer": "bpe", "vocab_size": r["vocab_size"], "max_length": r["max_length"]}
    report: dict = {"benchmark": "finetune_sst2", "recipe": r, "scale": args.scale, "device": args.device, "threads": torch.get_num_threads()}
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.output) if args.output else Path(tmp.name)
    os.environ.setdefault("SELFATTN_HOME", str(out / "home"))
    t_all = time.perf_counter()

    def run_stage(name, fn, cfg):
        tb = TimeBudget(budget * BUDGET_SHARE[name])
        t0 = time.perf_counter()
        res = fn(cfg, out / name, [tb])
        wall = time.perf_counter() - t0
        row = {"wall_s": round(wall, 1), "tokens_per_s": round(res.metrics["tokens_per_s"], 1), "steps": int(res.metrics["steps"]), "budget_hit": tb.hit}
        if name != "pretrain":
            dev = evaluate_checkpoint(res.best_dir, str(sst2 / "dev.tsv"), out / name / "dev", n_attention_examples=0, learning_curves=False)
            row.update(dev_accuracy=round(dev["accuracy"], 4), dev_f1=round(dev["macro_f1"], 4), dev_ece=round(dev["ece"], 4), val_accuracy=round(res.metrics["best_accuracy"], 4))
        else:
            row.update(val_loss=round(res.metrics.get("val_loss", res.metrics.get("best_loss", float("nan"))), 4))
        report[name] = row
        print(json.dumps({name: row}), flush=True)
        return res

    if "scratch" in stages:
        cfg = FinetuneConfig.model_validate({
            "data": data, "model": {**r["arch"], "pooling": "mean"},
            "optim": {"lr": r["scratch_lr"], "weight_decay": 0.01, "warmup_steps": 200},
            "train": {**train_common, "max_steps": steps(r["scratch_steps"]), "eval_every": steps(r["scratch_steps"]) // 6},
        })
        run_stage("scratch", finetune, cfg)
    if "pretrain" in stages:
        cfg = PretrainConfig.model_validate({
            "data": {"path": str(sst2 / "train.tsv"), "text_column": "sentence", "tokenizer": "bpe", "vocab_size": r["vocab_size"], "block_size": r["max_length"], "val_fraction": 0.02},
            "model": {**r["arch"], "dropout": 0.0},
            "optim": {"lr": r["pretrain_lr"], "warmup_steps": 100},
            "train": {**train_common, "early_stopping_metric": None, "batch_size": r["pretrain_batch"], "max_steps": steps(r["pretrain_steps"]), "eval_every": steps(r["pretrain_steps"]), "eval_batches": 20, "eval_batch_size": 64},
        })
        run_stage("pretrain", pretrain, cfg)
    init = str(out / "pretrain")
    if "finetune" in stages:
        cfg = FinetuneConfig.model_validate({
            "data": data, "init_from": init, "head": {"pooling": "mean", "dropout": 0.1, "causal": False},
            "optim": {"lr": r["finetune_lr"], "weight_decay": 0.01, "warmup_steps": 100},
            "train": {**train_common, "max_steps": steps(r["finetune_steps"]), "eval_every": steps(r["finetune_steps"]) // 5},
        })
        run_stage("finetune", finetune, cfg)
    if "lora" in stages:
        cfg = FinetuneConfig.model_validate({
            "data": data, "init_from": init, "head": {"pooling": "mean", "causal": True},  # adapters keep the causal trunk
            "lora": {"rank": r["lora_rank"], "alpha": 2 * r["lora_rank"], "targets": ["q_proj", "k_proj", "v_proj", "out_proj"]},
            "optim": {"lr": r["lora_lr"], "weight_decay": 0.0, "warmup_steps": 100},
            "train": {**train_common, "max_steps": steps(r["lora_steps"]), "eval_every": steps(r["lora_steps"]) // 5},
        })
        run_stage("lora", finetune, cfg)
    report["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    report["targets"] = {"dev_accuracy": 0.85, "minutes": 30}
    print(json.dumps(report))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
