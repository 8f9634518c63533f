"""The evaluate stage: calibration, dev metrics and plots, behavioural tests and slices, explained examples.

The fine-tune's checkpoint is copied to ``<stage dir>/model`` and only that copy is calibrated,
scored and returned (``result["model_dir"]``: the model to serve and register). The fine-tune
stage's directory is never written: another evaluate stage (e.g. with ``evaluation.calibrate:
false``) reads the same checkpoint and gets its own copy.

:func:`calibrate` fits the temperature on the fine-tune's own held-out rows (never dev) and
stores it in that copy before dev is scored, so the dev metrics, the registered pyfunc and
``selfattn predict`` all use the calibrated probabilities. :func:`behaviour` runs the
CheckList-style suite (``selfattn.eval.behaviour``) on templates and perturbed dev sentences, and
the accuracy slices on dev; it writes ``behaviour/cases.tsv`` and ``behaviour/summary.json`` and
returns the ``behaviour.*`` / ``slice.*`` metrics.

A new evaluation artifact goes into :func:`_evaluate_log`: written by the stage, declared there,
logged by ``flows.tracking.runs.log_stage``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from flows.stages.base import Artifact, Logged, Stage, StageOutput, Table
from selfattn.errors import UserError
from selfattn.eval.evaluate import evaluate_checkpoint
from selfattn.eval.report_html import write_examples_page
from selfattn.io.checkpoint import copy_pretrained
from selfattn.utils import atomic_write_text

MODEL_DIR = "model"
BEHAVIOUR_DIR = "behaviour"
CASES_FILE = "cases.tsv"
SUMMARY_FILE = "summary.json"
# the pipeline's run shows the headline figures; behaviour, slice and calibration details stay on
# the evaluate run, so the pipeline's charts and compare view are not buried under forty keys
DETAIL_METRIC_PREFIXES = ("behaviour.", "slice.", "calibration.", "ece_uncalibrated")


def evaluate_plan(cfg: PipelineConfig, data: StageOutput, finetuned: StageOutput, home: Path) -> Stage:
    """The evaluate stage, keyed by the fine-tune, the dev split and the evaluation section."""
    inputs = {"finetune": finetuned.key, "dev": data.result["digests"]["dev.tsv"], "evaluation": cfg.evaluation.model_dump()}
    return Stage(home, "evaluate", inputs)


def evaluate_stage(cfg: PipelineConfig, data: StageOutput, finetuned: StageOutput, home: Path) -> StageOutput:
    """Metrics on the dev split, plots (learning curves, confusion matrix, reliability, attention), explained examples."""
    stage = evaluate_plan(cfg, data, finetuned, home)
    with stage.claim() as (out, out_dir):
        if out is None:
            out = stage.finish(_evaluate(cfg, data, finetuned, out_dir))
    return out.declare(_evaluate_log(out.result))


def _evaluate(cfg: PipelineConfig, data: StageOutput, finetuned: StageOutput, out_dir: Path) -> dict[str, Any]:
    dev = data.result["files"]["dev.tsv"]
    eval_dir = out_dir / "eval"
    model_dir = copy_pretrained(finetuned.result["best_dir"], out_dir / MODEL_DIR)
    # the temperature goes into the copy before dev is scored, so dev metrics use it
    extra = calibrate(cfg, model_dir, finetuned.result["config"]["data"], dev)
    metrics = evaluate_checkpoint(model_dir, dev, eval_dir)
    plots = sorted(str(p) for p in (eval_dir / "plots").rglob("*.png"))
    if not any(p.endswith("learning_curves.png") for p in plots):
        plots += _learning_curves(finetuned, eval_dir / "plots")
    metrics.update(extra, **behaviour(cfg, model_dir, dev, out_dir))
    page = write_examples_page(model_dir, eval_dir / "predictions.tsv", eval_dir / "plots" / "examples.html")
    plots += [str(page)] if page else []  # explained dev examples, logged with the plots
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    return {
        "metrics": {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "metrics_file": str(out_dir / "metrics.json"),
        "plots": plots,
        "dataset_digest": data.result["digests"]["dev.tsv"][:16],
        "eval_dir": str(eval_dir),
        "behaviour_dir": str(out_dir / BEHAVIOUR_DIR),
        "model_dir": str(model_dir),
    }


def _evaluate_log(result: dict[str, Any]) -> Logged:
    """Every metric, the metrics file, the plots and the behaviour table on the stage's run;
    the headline metrics on the pipeline's run."""
    metrics = result["metrics"]
    behaviour_dir = Path(result["behaviour_dir"])
    cases = behaviour_dir / CASES_FILE
    behaviour_files = [Artifact(path=str(behaviour_dir), to=BEHAVIOUR_DIR)] if cases.is_file() else []
    return Logged(
        metrics=metrics,
        tags={"eval.dataset_digest": result["dataset_digest"]},
        artifacts=[Artifact(path=result["metrics_file"], to="evaluation"), *(Artifact(path=p, to="plots") for p in result["plots"]), *behaviour_files],
        # an MLflow-style table (viewable and comparable in the UI) beside the TSV/JSON files
        tables=[Table(path=str(cases), artifact_file=f"{BEHAVIOUR_DIR}/cases.json")] if cases.is_file() else [],
        pipeline=Logged(metrics={k: v for k, v in metrics.items() if not k.startswith(DETAIL_METRIC_PREFIXES)}),
    )


def _learning_curves(finetuned: StageOutput, out_dir: Path) -> list[str]:
    """Learning curves of the fine-tune (the engine plots only when it finds its own history)."""
    from selfattn.eval.plots import plot_learning_curves

    history = json.loads(Path(finetuned.result["history"]).read_text(encoding="utf-8"))
    if not history:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [str(plot_learning_curves(history, out_dir / "learning_curves.png"))]


def calibrate(cfg: PipelineConfig, model_dir: str | Path, train_data: dict[str, Any], dev: str | Path) -> dict[str, float]:
    """Fit and store the temperature (``evaluation.calibrate``), or remove a stored one; returns
    ``calibration.*`` metrics (temperature, held-out NLL and ECE before and after)."""
    from selfattn.data.config import ClassificationDataConfig
    from selfattn.eval.calibration import save_temperature
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
    from selfattn.data.classification import read_labelled
    from selfattn.eval.behaviour import checkpoint_predictor, run_suite, slice_metrics
    from selfattn.io.checkpoint import load_pretrained

    ev = cfg.evaluation
    if not ev.behaviour:
        return {}
    labels = list(cfg.data.labels)
    if len(labels) != 2:
        raise UserError(f"the behavioural tests are for binary sentiment; data.labels has {len(labels)} classes ({labels})")
    predict = checkpoint_predictor(load_pretrained(model_dir))
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
