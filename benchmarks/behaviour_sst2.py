"""Benchmark: behavioural tests, dev slices and temperature scaling of a fine-tuned SST-2 classifier.

Runs on a copy of ``MODEL_DIR`` (the original is never written): fits the temperature on the
model's own held-out training sentences (its ``extra.data``: ``val_path`` or the held-out
``val_fraction`` of train), reports NLL/ECE before and after on that hold-out and on dev, then
the CheckList-style failure rates and the dev accuracy per slice. Peer measured in the same run:
a bag-of-n-grams logistic regression (scikit-learn) trained on the same training rows, through
the same suite and slices.

    python benchmarks/behaviour_sst2.py /work/demo_home/runs/finetune-*/train/best \\
        --dev $SELFATTN_DATA_DIR/sst2/dev.tsv

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _peer(train_path: str, text_column: str, label_column: str, labels: list):
    """Word 1-2 gram TF-IDF + logistic regression on the training rows: a predictor of probs [N, 2]."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from selfattn.data.classification import read_labelled

    texts, y = read_labelled(train_path, split="train", text_column=text_column, label_column=label_column, labels=labels)
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    clf = LogisticRegression(C=4.0, max_iter=2000).fit(vec.fit_transform(texts), y)
    return lambda batch: clf.predict_proba(vec.transform(list(batch)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="a save_pretrained classifier directory (e.g. runs/finetune-*/train/best)")
    ap.add_argument("--dev", default=os.path.join(os.environ.get("SELFATTN_DATA_DIR", "../shared/data"), "sst2", "dev.tsv"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=200, help="cases per test from templates (and up to as many from dev)")
    ap.add_argument("--length-bins", type=int, nargs="*", default=[12, 24])
    ap.add_argument("--no-peer", action="store_true")
    args = ap.parse_args(argv)

    from selfattn.eval.behaviour import checkpoint_predictor, run_suite, slice_metrics
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.data.config import ClassificationDataConfig
    from selfattn.data.classification import read_labelled
    from selfattn.eval.evaluate import calibrate_checkpoint, evaluate_checkpoint

    work = Path(tempfile.mkdtemp(prefix="behaviour-sst2-"))
    os.environ.setdefault("SELFATTN_HOME", str(work / "home"))  # caches go here, not beside the model
    model_dir = work / "model"
    shutil.copytree(args.model_dir, model_dir)
    data = ClassificationDataConfig.model_validate(load_pretrained(model_dir).extra["data"])
    if data.val_path and Path(data.val_path).resolve() == Path(args.dev).resolve():
        sys.exit(f"{args.model_dir} was validated on the dev file {args.dev}; calibrating on it would score on the fitting set")

    t0 = time.perf_counter()
    before = evaluate_checkpoint(model_dir, args.dev, work / "eval-before", n_attention_examples=0, learning_curves=False)
    cal = calibrate_checkpoint(model_dir, data)  # writes the temperature into the copy
    after = evaluate_checkpoint(model_dir, args.dev, work / "eval-after", n_attention_examples=0, learning_curves=False)
    t_cal = time.perf_counter() - t0

    texts, y = read_labelled(args.dev, split="train", text_column=data.text_column, label_column=data.label_column, labels=data.labels)
    predictors = {"model": checkpoint_predictor(load_pretrained(model_dir))}
    if not args.no_peer:
        predictors["tfidf_logreg"] = _peer(data.train_path, data.text_column, data.label_column, list(data.labels))
    results: dict[str, dict] = {}
    for name, predict in predictors.items():
        t1 = time.perf_counter()
        report = run_suite(predict, texts, seed=args.seed, n_per_test=args.cases)
        correct = (predict(list(texts)).argmax(axis=1) == y).tolist()
        results[name] = {**report.metrics(), **slice_metrics(texts, correct, length_bins=args.length_bins), "accuracy": sum(correct) / len(correct), "seconds": time.perf_counter() - t1}

    print(f"model: {args.model_dir}  dev: {args.dev} ({len(texts)} sentences)")
    print(f"\ncalibration (fitted on {cal['fitted_on']}, {cal['n']} rows): T = {cal['temperature']:.3f}  [{t_cal:.1f} s]")
    print(f"  held-out  NLL {cal['nll_before']:.4f} -> {cal['nll_after']:.4f}   ECE {cal['ece_before']:.4f} -> {cal['ece_after']:.4f}")
    print(f"  dev       NLL {before['loss']:.4f} -> {after['loss']:.4f}   ECE {before['ece']:.4f} -> {after['ece']:.4f}   accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}")
    names = list(results)
    print("\n| figure | " + " | ".join(names) + " |")
    print("| --- | " + " | ".join("---" for _ in names) + " |")
    keys = [k for k in results["model"] if k.endswith((".failure_rate", ".accuracy")) or k == "accuracy"]
    for k in keys:
        n = results["model"].get(k.rsplit(".", 1)[0] + ".n")
        label = f"{k} (n={int(n)})" if n is not None else k
        print(f"| {label} | " + " | ".join(f"{results[m].get(k, float('nan')):.3f}" for m in names) + " |")
    out = {"model_dir": args.model_dir, "calibration": cal, "dev_before": {k: before[k] for k in ("accuracy", "loss", "ece")},
           "dev_after": {k: after[k] for k in ("accuracy", "loss", "ece", "ece_uncalibrated")}, "results": results}
    print(json.dumps(out, default=float))
    shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
