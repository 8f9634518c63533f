"""Benchmark: how faithful is each token attribution on SST-2 dev? ERASER-style deletion tests.

For every dev sentence (cut to the model's context) and every method, rank the tokens by score
(signed methods: support for the predicted class first) and, for k in {1, 5, 10, 20, 50}% of the
tokens (at least one), measure with p = probability of the class predicted on the full text
(DeYoung et al. 2020, "ERASER"):

* comprehensiveness = p(x) - p(x without its top-k tokens)   (higher: the tokens mattered)
* sufficiency       = p(x) - p(only the top-k tokens)        (lower: they were enough)
* AOPC: each averaged over the five k.

Tokens are deleted (the sequence gets shorter), not masked. Peer measured in the same run:
random token rankings (mean of ``--random-seeds`` seeds). Also reported: the mean integrated
gradients completeness error |delta| / |p(x) - p(baseline)| and seconds per sentence per method.

    python benchmarks/explain_sst2.py --model /path/to/best        # a trained classifier dir
    python benchmarks/explain_sst2.py                              # trains a smoke-size one first
    python benchmarks/explain_sst2.py --model DIR --n 300          # the first 300 dev sentences

The last line of output is one JSON object.
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

KS = (0.01, 0.05, 0.10, 0.20, 0.50)
METHODS = ("integrated_gradients", "gradient_x_input", "attention_rollout", "attention_last")


def train_small(data_dir: Path, out: Path, steps: int) -> Path:
    """A smoke-size classifier from scratch on SST-2 train (BPE, 2 layers x 64 dims)."""
    from selfattn.train import FinetuneConfig, finetune

    cfg = FinetuneConfig.model_validate({
        "data": {"train_path": str(data_dir / "sst2" / "train.tsv"), "val_fraction": 0.05, "val_holdout": "sentences",
                 "tokenizer": "bpe", "vocab_size": 2048, "max_length": 64},
        "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "dropout": 0.1, "position": "rope", "pooling": "mean"},
        "optim": {"lr": 1e-3, "warmup_steps": 30},
        "train": {"max_steps": steps, "batch_size": 64, "eval_every": max(steps // 2, 1), "checkpoint_every": 0,
                  "log_every": 100, "device": "cpu", "early_stopping_metric": "val_accuracy"},
    })  # fmt: skip
    return Path(finetune(cfg, out).best_dir)


def _probs(model, seqs, target, *, fallback, pad_id, temperature=1.0, batch=256):
    """p(target[i]) for each id list in ``seqs`` (an empty one becomes ``[fallback]``), with the
    checkpoint's ``temperature`` as the served model applies it."""
    import torch

    out = []
    for i in range(0, len(seqs), batch):
        chunk = [s or [fallback] for s in seqs[i : i + batch]]
        T = max(map(len, chunk))
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.bool)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = True
        with torch.no_grad():
            p = (model(ids, mask).logits.float() / temperature).softmax(-1)
        out.extend(p[torch.arange(len(chunk)), torch.tensor(target[i : i + len(chunk)])].tolist())
    return out


def deletion_scores(model, tok, ids_list, target, p_full, rankings, temperature=1.0):
    """``{"comprehensiveness": {k: mean}, "sufficiency": {k: mean}, "aopc_*": ...}`` for one set of rankings."""
    remove, keep, tgt = [], [], []
    for ids, order, t in zip(ids_list, rankings, target):
        for k in KS:
            n = min(len(ids), max(1, math.ceil(k * len(ids))))
            top = set(order[:n])
            remove.append([x for i, x in enumerate(ids) if i not in top])
            keep.append([x for i, x in enumerate(ids) if i in top])
            tgt.append(t)
    fallback = tok.bos_id
    p_remove = _probs(model, remove, tgt, fallback=fallback, pad_id=tok.pad_id, temperature=temperature)
    p_keep = _probs(model, keep, tgt, fallback=fallback, pad_id=tok.pad_id, temperature=temperature)
    nk = len(KS)
    comp = {k: 0.0 for k in KS}
    suff = {k: 0.0 for k in KS}
    for i, p0 in enumerate(p_full):
        for j, k in enumerate(KS):
            comp[k] += p0 - p_remove[i * nk + j]
            suff[k] += p0 - p_keep[i * nk + j]
    n = len(p_full)
    comp = {f"{int(k * 100)}%": v / n for k, v in comp.items()}
    suff = {f"{int(k * 100)}%": v / n for k, v in suff.items()}
    return {"comprehensiveness": comp, "sufficiency": suff,
            "aopc_comprehensiveness": sum(comp.values()) / nk, "aopc_sufficiency": sum(suff.values()) / nk}  # fmt: skip


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a save_pretrained classifier directory; omitted = train a smoke-size one")
    ap.add_argument("--data-dir", default=os.environ.get("SELFATTN_DATA_DIR", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    ap.add_argument("--n", type=int, default=None, help="first N dev sentences (default all 872)")
    ap.add_argument("--steps", type=int, default=32, help="integrated gradients quadrature nodes")
    ap.add_argument("--random-seeds", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=300, help="steps of the smoke model when --model is not given")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)

    import random

    import torch

    from selfattn.eval.calibration import temperature_of
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.data.classification import read_labelled
    from selfattn.eval.interpret import explain

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    tmp = tempfile.TemporaryDirectory(prefix="explain-sst2-")
    os.environ.setdefault("SELFATTN_HOME", str(Path(tmp.name) / "home"))
    model_dir = Path(args.model) if args.model else train_small(data_dir, Path(tmp.name) / "clf", args.train_steps)
    pre = load_pretrained(model_dir)
    model, tok = pre.model.eval(), pre.tokenizer
    temperature = temperature_of(pre.extra)  # a calibrated checkpoint: probabilities as served
    texts, labels = read_labelled(str(data_dir / "sst2" / "dev.tsv"), split="validation", text_column="sentence",
                                  label_column="label", labels=[0, 1], max_rows=args.n)  # fmt: skip
    texts = [t.strip() for t in texts]
    report: dict = {"benchmark": "explain_sst2", "model_dir": str(model_dir), "trained_here": not args.model,
                    "n": len(texts), "ig_steps": args.steps, "threads": torch.get_num_threads(),
              "temperature": temperature, "methods": {}}  # fmt: skip

    # the reference forward: predicted class and its probability on the (cut) full text
    t0 = time.perf_counter()
    base = explain(model, tok, texts, method="attention_last", batch_size=64, temperature=temperature)
    report["forward_s_per_sentence"] = (time.perf_counter() - t0) / len(texts)
    ids_list = [tok.encode(t)[: model.cfg.context_length] for t in texts]
    target = [a.target for a in base]
    p_full = _probs(model, ids_list, target, fallback=tok.bos_id, pad_id=tok.pad_id, temperature=temperature)
    report["dev_accuracy"] = sum(int(t == y) for t, y in zip(target, labels)) / len(texts)
    report["mean_tokens"] = sum(map(len, ids_list)) / len(ids_list)

    for method in METHODS:
        t0 = time.perf_counter()
        attrs = explain(model, tok, texts, method=method, steps=args.steps, targets=target, batch_size=16,
                        temperature=temperature)
        secs = (time.perf_counter() - t0) / len(texts)
        rankings = [sorted(range(len(a.scores)), key=lambda i, s=a.scores: (-s[i], i)) for a in attrs]
        row = deletion_scores(model, tok, ids_list, target, p_full, rankings, temperature)
        row["s_per_sentence"] = secs
        if method == "integrated_gradients":
            rel = [abs(a.delta) / max(abs(sum(a.scores) + a.delta), 1e-6) for a in attrs]
            row["ig_completeness_rel_error_mean"] = sum(rel) / len(rel)
        report["methods"][method] = row
        print(json.dumps({method: row}), flush=True)

    rows = []
    for seed in range(args.random_seeds):
        rng = random.Random(seed)
        rows.append(deletion_scores(model, tok, ids_list, target, p_full, [rng.sample(range(len(x)), len(x)) for x in ids_list], temperature))
    rand = {key: {k: sum(r[key][k] for r in rows) / len(rows) for k in rows[0][key]} for key in ("comprehensiveness", "sufficiency")}
    rand["aopc_comprehensiveness"] = sum(r["aopc_comprehensiveness"] for r in rows) / len(rows)
    rand["aopc_sufficiency"] = sum(r["aopc_sufficiency"] for r in rows) / len(rows)
    report["methods"]["random"] = rand
    print(json.dumps({"random": rand}), flush=True)

    r_comp, r_suff = rand["aopc_comprehensiveness"], rand["aopc_sufficiency"]
    print(f"\n{'method':<22}{'AOPC comp':>10}{'x random':>9}{'AOPC suff':>10}{'- random':>9}{'s/sent':>8}", file=sys.stderr)
    for name, row in report["methods"].items():
        c, s = row["aopc_comprehensiveness"], row["aopc_sufficiency"]
        print(f"{name:<22}{c:>10.4f}{c / r_comp if r_comp else float('nan'):>9.2f}{s:>10.4f}{s - r_suff:>+9.4f}"
              f"{row.get('s_per_sentence', 0.0):>8.4f}", file=sys.stderr)  # fmt: skip
    ranked = sorted(METHODS, key=lambda m: -report["methods"][m]["aopc_comprehensiveness"])
    report["most_faithful_by_comprehensiveness"] = ranked[0]
    report["most_faithful_by_sufficiency"] = min(METHODS, key=lambda m: report["methods"][m]["aopc_sufficiency"])
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
