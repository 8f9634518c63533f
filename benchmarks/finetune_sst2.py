"""Benchmark: SST-2 dev accuracy for (a) a classifier from scratch, (b) fine-tuned from our own
pretraining, (c) LoRA on that same pretraining, (d) an ensemble of fine-tunes from that
pretraining; wall time and tokens/s for each. Peer measured in the same run: a bag-of-n-grams
logistic regression (scikit-learn) on the same training rows.

Pretraining is a causal LM on the SST-2 training phrases without their labels. Model selection
holds out whole training *sentences* (``data.val_holdout=sentences``: 10% of the sentences, and
every phrase inside them leaves the training rows), so it is leak-free and looks like dev; the
dev set is only used for the final numbers, as published SST-2 results report them. Differences
between stages come with a 95% paired-bootstrap interval over the 872 dev sentences.

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
    "arch": {"n_layers": 4, "d_model": 128, "n_heads": 4, "dropout": 0.2, "position": "rope"},
    "pretrain_steps": 3000, "pretrain_batch": 32, "pretrain_lr": 1e-3,
    "scratch_steps": 3000, "scratch_lr": 5e-4,
    "finetune_steps": 2500, "finetune_lr": 3e-4,
    "lora_steps": 2000, "lora_lr": 2e-3, "lora_rank": 8,
    "ensemble_members": 5,  # (b) and four more seeds
    "batch": 64, "max_length": 64, "token_dropout": 0.1, "val_holdout": "sentences", "val_fraction": 0.1,
    "few_labels": 3000, "few_steps": 600,  # the low-label stages: the first 3,000 training rows only
}
BUDGET_SHARE = {"scratch": 0.12, "pretrain": 0.25, "finetune": 0.1, "lora": 0.08, "ensemble": 0.4, "few": 0.05, "wordllama": 0.3}


class TimeBudget(Callback):
    """Ends a stage gracefully (StopTraining) once its share of the budget is spent."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.t0, self.hit = seconds, time.perf_counter(), False

    def on_step(self, step, metrics):
        if time.perf_counter() - self.t0 > self.seconds:
            self.hit = True
            raise StopTraining


def linear_peer(train_path: Path, dev_path: Path, val_fraction: float, out: Path) -> dict:
    """TF-IDF word 1-2-grams + logistic regression on the same training rows as the models."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from selfattn.data.classification import read_labelled, sentence_holdout
    from selfattn.eval.evaluate import write_predictions

    t0 = time.perf_counter()
    texts, labels = read_labelled(str(train_path), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    train_idx, _ = sentence_holdout(texts, val_fraction)
    vec = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"\S+", sublinear_tf=True)
    x = vec.fit_transform([texts[i] for i in train_idx])
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(x, [labels[i] for i in train_idx])
    dev_texts, dev_labels = read_labelled(str(dev_path), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    probs = clf.predict_proba(vec.transform(dev_texts))
    write_predictions(out / "predictions.tsv", probs, np.asarray(dev_labels), [0, 1], dev_texts)
    acc = float((probs.argmax(axis=1) == np.asarray(dev_labels)).mean())
    return {"wall_s": round(time.perf_counter() - t0, 1), "dev_accuracy": round(acc, 4), "train_rows": len(train_idx)}


WORDLLAMA = {  # the transfer stage: same trunk and tokenizer, random vs wordllama embeddings
    "arch": {"n_layers": 2, "d_model": 256, "n_heads": 4, "d_ff": 512, "dropout": 0.1, "position": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
    "steps": 1500, "batch": 64, "lr": 1e-3, "emb_lr": 2e-4, "freeze_frac": 0.3, "emb_std": 0.02, "evals": 6,
}


def wordllama_stage(sst2: Path, out: Path, steps: int, budget_s: float, device: str) -> dict:
    """Token embeddings from a real pretrained table (wordllama's 32k x 256, derived from Llama-2's)
    through the import path (HFTokenizer + init_embeddings), against random init, same everything else.

    Transfer recipe: table rescaled to ``emb_std``, embeddings frozen for the first ``freeze_frac``
    of the steps, then trained at their own ``emb_lr``; random init trains its embeddings at ``lr``
    throughout. Both select their best state on the held-out training sentences, then evaluate on dev once.
    """
    from importlib.util import find_spec

    import numpy as np
    import torch

    from selfattn.config import ModelConfig
    from selfattn.data.classification import read_labelled, sentence_holdout
    from selfattn.eval.evaluate import paired_bootstrap, write_predictions
    from selfattn.io.hf import init_embeddings, load_embedding_table
    from selfattn.nn.models import SequenceClassifier

    spec = find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        return {"skipped": "wordllama is not installed (pip install wordllama)"}
    root = Path(list(spec.submodule_search_locations)[0])
    table, tok = load_embedding_table(root / "weights" / "l2_supercat_256.safetensors", root / "tokenizers" / "l2_supercat_tokenizer_config.json", bos_token_id=1, eos_token_id=2)
    w = WORDLLAMA
    texts, labels = read_labelled(str(sst2 / "train.tsv"), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    tr_idx, val_idx = sentence_holdout(texts, 0.1)
    dev_texts, dev_labels = read_labelled(str(sst2 / "dev.tsv"), split="train", text_column="sentence", label_column="label", labels=[0, 1])

    def encode(ts):  # -> ids [B, T] (right-padded), mask [B, T] True = real token
        ids = [e[:64] or [tok.bos_id] for e in tok.encode_batch(ts)]
        x = torch.full((len(ids), max(map(len, ids))), tok.pad_id, dtype=torch.long)
        for i, row in enumerate(ids):
            x[i, : len(row)] = torch.tensor(row)
        lengths = torch.tensor([len(r) for r in ids])
        return x, torch.arange(x.shape[1])[None, :] < lengths[:, None]

    def batches(idx_texts):
        xs = []
        for i in range(0, len(idx_texts), 512):
            xs.append(encode(idx_texts[i : i + 512]))
        return xs

    train_texts = [texts[i] for i in tr_idx]
    y_train = torch.tensor([labels[i] for i in tr_idx])
    val_b = batches([texts[i] for i in val_idx])
    y_val = torch.tensor([labels[i] for i in val_idx])
    dev_b = batches(dev_texts)

    @torch.no_grad()
    def probs(model, bs):
        model.eval()
        p = torch.cat([model(x.to(device), attention_mask=m.to(device)).logits.float().softmax(-1).cpu() for x, m in bs])
        model.train()
        return p

    rows = {}
    for variant in ("random", "wordllama"):
        # a budget-cut first run caps the second at the same step (same schedule): the pair differs only in the init
        limit = rows["random"]["steps"] if rows else steps
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=table.shape[0], context_length=64, n_classes=2, pooling="mean", causal=False, pad_token_id=tok.pad_id, **w["arch"])
        model = SequenceClassifier(cfg).to(device)
        if variant == "wordllama":
            init_embeddings(model, table, std=w["emb_std"])
        emb = [model.tok_emb.weight]
        rest = [p for n, p in model.named_parameters() if n != "tok_emb.weight"]
        emb_lr = w["emb_lr"] if variant == "wordllama" else w["lr"]
        opt = torch.optim.AdamW([{"params": rest, "lr": w["lr"], "weight_decay": 0.01}, {"params": emb, "lr": emb_lr, "weight_decay": 0.0}])
        freeze_until = int(steps * w["freeze_frac"]) if variant == "wordllama" else 0
        gen = torch.Generator().manual_seed(0)
        best, best_state, t0, done, hit = -1.0, None, time.perf_counter(), 0, False
        every = max(steps // w["evals"], 1)
        for step in range(1, steps + 1):
            frozen = step <= freeze_until
            model.tok_emb.weight.requires_grad_(not frozen)
            warm = min(1.0, step / 100)
            for g, base in zip(opt.param_groups, (w["lr"], emb_lr)):
                g["lr"] = base * warm * 0.5 * (1 + np.cos(np.pi * step / steps))
            pick = torch.randint(0, len(train_texts), (w["batch"],), generator=gen)
            x, m = encode([train_texts[i] for i in pick])
            loss = model(x.to(device), attention_mask=m.to(device), labels=y_train[pick].to(device)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = step
            over = time.perf_counter() - t0 > budget_s / 2
            last = step >= limit or over
            if step % every == 0 or last:
                acc = float((probs(model, val_b).argmax(-1) == y_val).float().mean())
                if acc > best:
                    best, best_state = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
            if last:
                hit = over or step < steps
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        p = probs(model, dev_b)
        y = np.asarray(dev_labels)
        write_predictions(out / f"wordllama_{variant}" / "predictions.tsv", p.numpy(), y, [0, 1], dev_texts)
        rows[variant] = {
            "dev_accuracy": round(float((p.argmax(-1).numpy() == y).mean()), 4), "val_accuracy": round(best, 4),
            "steps": done, "budget_hit": hit, "wall_s": round(time.perf_counter() - t0, 1), "correct": (p.argmax(-1).numpy() == y).astype(int),
        }
    cmp = paired_bootstrap(rows["random"].pop("correct"), rows["wordllama"].pop("correct"))
    return {**rows, "paired_wordllama-random": {k: round(v, 4) for k, v in cmp.items()}, "recipe": w, "selection": "held-out training sentences; dev once"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("SELFATTN_DATA_DIR", "../shared/data"))
    ap.add_argument("--budget-minutes", type=float, default=30.0)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (quick checks)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--members", type=int, default=RECIPE["ensemble_members"], help="ensemble size, (b) included")
    ap.add_argument("--stages", default="linear,scratch,pretrain,finetune,lora,ensemble,few", help="few = scratch vs pretrained with few labels; wordllama (not in the default) = pretrained embedding table vs random init")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    import torch

    from selfattn.eval.evaluate import evaluate_checkpoint, evaluate_ensemble, paired_bootstrap, read_correct
    from selfattn.train import FinetuneConfig, PretrainConfig, finetune, pretrain

    if args.threads:
        torch.set_num_threads(args.threads)
    r, budget = RECIPE, args.budget_minutes * 60
    sst2 = Path(args.data_dir) / "sst2"
    dev_path = sst2 / "dev.tsv"
    stages = args.stages.split(",")
    steps = lambda n: max(int(n * args.scale), 10)  # noqa: E731
    train_common = {"batch_size": r["batch"], "log_every": 50, "checkpoint_every": 0, "device": args.device, "early_stopping_metric": "val_accuracy", "eval_batch_size": 256}
    data = {
        "train_path": str(sst2 / "train.tsv"), "val_fraction": r["val_fraction"], "val_holdout": r["val_holdout"],
        "tokenizer": "bpe", "vocab_size": r["vocab_size"], "max_length": r["max_length"], "token_dropout": r["token_dropout"],
    }
    report: dict = {"benchmark": "finetune_sst2", "recipe": r, "scale": args.scale, "device": args.device, "threads": torch.get_num_threads()}
    tmp = tempfile.TemporaryDirectory()
    out = Path(args.output) if args.output else Path(tmp.name)
    os.environ.setdefault("SELFATTN_HOME", str(out / "home"))
    t_all = time.perf_counter()

    def emit(name, row):
        report[name] = row
        print(json.dumps({name: row}), flush=True)

    def train_stage(name, fn, cfg, budget_s, out_dir=None):
        tb = TimeBudget(budget_s)
        t0 = time.perf_counter()
        res = fn(cfg, out_dir or out / name, [tb])
        row = {"wall_s": round(time.perf_counter() - t0, 1), "tokens_per_s": round(res.metrics["tokens_per_s"], 1), "steps": int(res.metrics["steps"]), "budget_hit": tb.hit}
        return res, row

    def dev_eval(res, row, where):
        dev = evaluate_checkpoint(res.best_dir, str(dev_path), where, n_attention_examples=0, learning_curves=False)
        row.update(dev_accuracy=round(dev["accuracy"], 4), dev_f1=round(dev["macro_f1"], 4), dev_ece=round(dev["ece"], 4), val_accuracy=round(res.metrics["best_accuracy"], 4))
        return row

    def finetune_cfg(seed, max_steps, data=data):
        return FinetuneConfig.model_validate({
            "data": data, "init_from": str(out / "pretrain"), "head": {"pooling": "mean", "dropout": r["arch"]["dropout"], "causal": False},
            "optim": {"lr": r["finetune_lr"], "weight_decay": 0.01, "warmup_steps": 100},
            "train": {**train_common, "seed": seed, "max_steps": max_steps, "eval_every": max(max_steps // 5, 1)},
        })

    if "linear" in stages:
        emit("linear", linear_peer(sst2 / "train.tsv", dev_path, r["val_fraction"], out / "linear"))
    if "scratch" in stages:
        cfg = FinetuneConfig.model_validate({
            "data": data, "model": {**r["arch"], "pooling": "mean"},
            "optim": {"lr": r["scratch_lr"], "weight_decay": 0.01, "warmup_steps": 200},
            "train": {**train_common, "max_steps": steps(r["scratch_steps"]), "eval_every": steps(r["scratch_steps"]) // 6},
        })
        res, row = train_stage("scratch", finetune, cfg, budget * BUDGET_SHARE["scratch"])
        emit("scratch", dev_eval(res, row, out / "scratch" / "dev"))
    if "pretrain" in stages:
        cfg = PretrainConfig.model_validate({
            "data": {"path": str(sst2 / "train.tsv"), "text_column": "sentence", "tokenizer": "bpe", "vocab_size": r["vocab_size"], "block_size": r["max_length"], "val_fraction": 0.02},
            "model": {**r["arch"], "dropout": 0.0},
            "optim": {"lr": r["pretrain_lr"], "warmup_steps": 100},
            "train": {**train_common, "early_stopping_metric": None, "batch_size": r["pretrain_batch"], "max_steps": steps(r["pretrain_steps"]), "eval_every": steps(r["pretrain_steps"]), "eval_batches": 20, "eval_batch_size": 64},
        })
        res, row = train_stage("pretrain", pretrain, cfg, budget * BUDGET_SHARE["pretrain"])
        row["val_loss"] = round(res.metrics.get("val_loss", res.metrics.get("best_loss", float("nan"))), 4)
        emit("pretrain", row)
        report["pretrain_wall_s"] = row["wall_s"]
    if "finetune" in stages:
        res, row = train_stage("finetune", finetune, finetune_cfg(0, steps(r["finetune_steps"])), budget * BUDGET_SHARE["finetune"])
        emit("finetune", dev_eval(res, row, out / "finetune" / "dev"))
    if "lora" in stages:
        cfg = FinetuneConfig.model_validate({
            "data": data, "init_from": str(out / "pretrain"), "head": {"pooling": "mean", "causal": True},  # adapters keep the causal trunk
            "lora": {"rank": r["lora_rank"], "alpha": 2 * r["lora_rank"], "targets": ["q_proj", "k_proj", "v_proj", "out_proj"]},
            "optim": {"lr": r["lora_lr"], "weight_decay": 0.0, "warmup_steps": 100},
            "train": {**train_common, "max_steps": steps(r["lora_steps"]), "eval_every": steps(r["lora_steps"]) // 5},
        })
        res, row = train_stage("lora", finetune, cfg, budget * BUDGET_SHARE["lora"])
        emit("lora", dev_eval(res, row, out / "lora" / "dev"))
    if "ensemble" in stages and "finetune" in stages and args.members > 1:
        t0 = time.perf_counter()
        member_dirs, rows = [out / "finetune" / "best"], []
        share = budget * BUDGET_SHARE["ensemble"] / (args.members - 1)
        for seed in range(1, args.members):
            res, row = train_stage(f"member{seed}", finetune, finetune_cfg(seed, steps(r["finetune_steps"])), share, out / f"member{seed}")
            rows.append(dev_eval(res, row, out / f"member{seed}" / "dev"))
            member_dirs.append(res.best_dir)
            print(json.dumps({f"member{seed}": rows[-1]}), flush=True)
        ens = evaluate_ensemble(member_dirs, str(dev_path), out / "ensemble" / "dev")
        accs = [report["finetune"]["dev_accuracy"]] + [m["dev_accuracy"] for m in rows]
        emit("ensemble", {
            "members": args.members, "extra_wall_s": round(time.perf_counter() - t0, 1),
            "dev_accuracy": round(ens["accuracy"], 4), "dev_f1": round(ens["macro_f1"], 4), "dev_ece": round(ens["ece"], 4),
            "member_dev_accuracy": accs, "member_mean": round(sum(accs) / len(accs), 4),
        })
        # the time to the ensemble's number: pretraining plus every member's fine-tuning
        report["ensemble"]["wall_s_from_nothing"] = round(report.get("pretrain_wall_s", 0) + report["finetune"]["wall_s"] + report["ensemble"]["extra_wall_s"], 1)
    if "few" in stages:
        # pretraining's value where labels are scarce: the first few_labels rows, scratch vs from the LM
        few = {**data, "max_examples": r["few_labels"]}
        n = steps(r["few_steps"])
        cfg = FinetuneConfig.model_validate({
            "data": few, "model": {**r["arch"], "pooling": "mean"},
            "optim": {"lr": r["scratch_lr"], "weight_decay": 0.01, "warmup_steps": 50},
            "train": {**train_common, "max_steps": n, "eval_every": max(n // 6, 1)},
        })
        res, row = train_stage("few_scratch", finetune, cfg, budget * BUDGET_SHARE["few"])
        emit("few_scratch", dev_eval(res, row, out / "few_scratch" / "dev"))
        res, row = train_stage("few_finetune", finetune, finetune_cfg(0, n, few), budget * BUDGET_SHARE["few"])
        emit("few_finetune", dev_eval(res, row, out / "few_finetune" / "dev"))
    if "wordllama" in stages:
        emit("wordllama", wordllama_stage(sst2, out, steps(WORDLLAMA["steps"]), budget * BUDGET_SHARE["wordllama"], args.device))
    # paired comparisons on the same dev rows
    preds = {n: out / n / "dev" / "predictions.tsv" for n in ("scratch", "finetune", "lora", "ensemble", "few_scratch", "few_finetune")}
    preds["linear"] = out / "linear" / "predictions.tsv"
    pairs = [("scratch", "finetune"), ("finetune", "ensemble"), ("linear", "finetune"), ("linear", "ensemble"), ("scratch", "ensemble"), ("few_scratch", "few_finetune")]
    report["paired"] = {}
    for a, b in pairs:
        if preds[a].is_file() and preds[b].is_file():
            cmp = paired_bootstrap(read_correct(preds[a]), read_correct(preds[b]))
            report["paired"][f"{b}-{a}"] = {k: round(v, 4) for k, v in cmp.items()}
    report["total_wall_s"] = round(time.perf_counter() - t_all, 1)
    report["targets"] = {"dev_accuracy": 0.85, "minutes": 30}
    print(json.dumps(report))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
