"""The evaluate stage's calibration and behavioural evaluation (called from ``flows.stages``).

:func:`calibrate` fits the temperature on the fine-tune's own held-out rows (never dev) and
stores it in the model directory it is given (the evaluate stage's own copy of the fine-tuned
model, never the fine-tune stage's directory) before dev is scored, so the dev metrics, the
registered pyfunc and ``selfattn predict`` all use the calibrated probabilities.
:func:`behaviour` runs the CheckList-style suite (``selfattn.eval.behaviour``) on templates and
perturbed dev sentences, and the accuracy slices on dev; it writes ``behaviour/cases.tsv`` and
``behaviour/summary.json`` and returns the ``behaviour.*`` / ``slice.*`` / ``calibration.*``
metrics. :func:`log_results` logs them to the active MLflow run (a table artifact plus the files).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from selfattn.errors import UserError

from flows.config import PipelineConfig

BEHAVIOUR_DIR = "behaviour"
CASES_FILE = "cases.tsv"
SUMMARY_FILE = "summary.json"


def calibrate(cfg: PipelineConfig, model_dir: str | Path, train_data: dict[str, Any], dev: str | Path) -> dict[str, float]:
    """Fit and store the temperature (``evaluation.calibrate``), or remove a stored one; returns
    ``calibration.*`` metrics (temperature, held-out NLL and ECE before and after)."""
    from selfattn.eval.calibration import save_temperature
    from selfattn.data.config import ClassificationDataConfig
    from selfattn.eval.evaluate import calibrate_checkpoint

    if not cfg.evaluation.calibrate:
        save_temperature(model_dir, None)
        return {}
    data = ClassificationDataConfig.model_validate(train_data)
    if data.val_path and Path(data.val_path).resolve() == Path(dev).resolve():
        raise UserError(f"calibration would be fitted on the dev file {dev}, the set the model is scored on; hold out part of train instead")
    report = calibrate_checkpoint(model_dir, data)
    metrics = {"calibration.temperature": float(report["temperature"])}
    metrics.update({f"calibration.heldout_{k}": float(report[k]) for k in ("n", "nll_before", "nll_after", "ece_before", "ece_after")})
    return metrics


def behaviour(cfg: PipelineConfig, model_dir: str | Path, dev: str | Path, out_dir: Path) -> dict[str, float]:
    """The behavioural suite and dev slices (``evaluation.behaviour``); writes ``out_dir/behaviour/``."""
    from selfattn.eval.behaviour import checkpoint_predictor, run_suite, slice_metrics
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.data.classification import read_labelled

    ev = cfg.evaluation
    if not ev.behaviour:
        return {}
    labels = list(cfg.data.labels)
    if len(labels) != 2:
        raise UserError(f"the behavioural tests are for binary sentiment; data.labels has {len(labels)} classes ({labels})")
    pre = load_pretrained(model_dir)
    predict = checkpoint_predictor(pre)
    texts, y = read_labelled(str(dev), split="train", text_column=cfg.data.text_column, label_column=cfg.data.label_column, labels=labels)
    report = run_suite(predict, texts, seed=ev.behaviour_seed, n_per_test=ev.behaviour_cases, negative=0, positive=1)
    correct = (predict(list(texts)).argmax(axis=1) == y).tolist()
    metrics = {**report.metrics(), **slice_metrics(texts, correct, length_bins=ev.length_bins)}
    out = out_dir / BEHAVIOUR_DIR
    out.mkdir(parents=True, exist_ok=True)
    with (out / CASES_FILE).open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(report.rows[0]), delimiter="\t", lineterminator="\n")
        w.writeheader()
        w.writerows(report.rows)
    (out / SUMMARY_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return metrics


def log_results(result: dict[str, Any]) -> None:
    """Log the stage's behaviour files to the active MLflow run: ``behaviour/cases.json`` as an
    MLflow table (viewable and comparable in the UI) and the TSV/JSON files beside it."""
    import mlflow
    import pandas as pd

    folder = result.get("behaviour_dir")
    if not folder or not (Path(folder) / CASES_FILE).is_file():
        return
    cases = pd.read_csv(Path(folder) / CASES_FILE, sep="\t", quoting=csv.QUOTE_MINIMAL, keep_default_na=False)
    mlflow.log_table(cases, artifact_file=f"{BEHAVIOUR_DIR}/cases.json")
    mlflow.log_artifacts(folder, BEHAVIOUR_DIR)

