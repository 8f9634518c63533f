"""What a finished pipeline run reports: ``PipelineResult`` and its summary (markdown and console lines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from flows.stages.base import Logged, StageOutput


class PipelineResult(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    pipeline_run_id: str
    mlflow_run_id: str
    experiment_id: str
    stages: dict[str, StageOutput]
    metrics: dict[str, float] = {}
    model_name: str | None = None
    model_version: str | None = None
    decision: dict[str, Any] | None = None
    # what asked for this run: the validated config and the pipeline's code (run_identity); a later
    # `selfattn run` with the same identity and every stage cached has nothing to do
    identity: str = ""


def run_identity(cfg: Any) -> str:
    """Digest of the validated config (every section: the gate's margin and the experiment too)
    and of the ``flows`` code (the stage keys cover ``selfattn`` and ``flows/stages``; the gate,
    registration and tracking code live beside them)."""
    from flows.stages.base import digest, sources_digest

    return digest({"config": cfg.model_dump(mode="json"), "flows": sources_digest(Path(__file__).resolve().parent)})[:24]


# the metrics the console shows (the rest are in the MLflow run and summary.md), in this order
HEADLINE = ("accuracy", "macro_f1", "majority_accuracy", "ece", "loss", "n")
PREDICT_EXAMPLE = "a gripping , beautifully acted film ."


def format_metric(name: str, value: float) -> str:
    """A metric as text: counts (``n``, ``n_*``, ``*.n``, ``*_count``, ``tokens``) as integers, the rest to 4 places."""
    last = name.rsplit(".", 1)[-1]
    is_count = last in ("n", "tokens") or last.startswith("n_") or last.endswith(("_count", "_n"))
    if is_count and float(value).is_integer():
        return str(int(value))
    return f"{value:.4f}"


def baseline_warning(result: PipelineResult) -> str | None:
    """A warning when the registered model is no better than always predicting the most frequent class."""
    score, floor = result.metrics.get("accuracy"), result.metrics.get("majority_accuracy")
    if score is None or floor is None or score > floor:
        return None
    promoted = bool(result.decision and result.decision.get("promoted"))
    what = "the champion" if promoted else "this model"
    return (
        f"warning: accuracy {score:.4f} is at or below the majority-class baseline {floor:.4f} (always predicting "
        f"the most frequent label): {what} has learnt nothing useful yet; train longer (the demo preset) before using it"
    )


def decision_line(result: PipelineResult) -> str | None:
    """``model NAME vN: promoted to champion (reason)`` or ``not promoted (reason)``."""
    if not result.decision:
        return None
    from flows.stages.register import ALREADY_CHAMPION

    d = result.decision
    if d["promoted"] and d.get("reason") == ALREADY_CHAMPION:
        return f"model {result.model_name} v{result.model_version}: the champion already (the same model as before)"
    verdict = "promoted to champion" if d["promoted"] else "not promoted, the champion stays"
    return f"model {result.model_name} v{result.model_version}: {verdict} ({d['reason']})"


def next_steps(result: PipelineResult, ui_hint: str) -> list[str]:
    """What to run next: the registered model's URI, the command that predicts with it, the UI."""
    lines = []
    if result.model_name and result.model_version:
        promoted = bool(result.decision and result.decision.get("promoted"))
        uri = f"models:/{result.model_name}@champion" if promoted else f"models:/{result.model_name}/{result.model_version}"
        lines.append(f"registered model: models:/{result.model_name}/{result.model_version}" + (f" (= {uri})" if promoted else ""))
        lines.append(f'predict:          selfattn predict --model {uri} "{PREDICT_EXAMPLE}"')
    lines.append(f"UI:               {ui_hint}")
    return lines


def markdown(config_name: str, result: PipelineResult, url: str) -> str:
    """The run's summary as markdown (the Prefect artifact, ``summary.md`` in MLflow and in the home)."""
    lines = [f"# selfattn pipeline `{config_name}`", "", f"MLflow run: {url}", "", "| stage | cached | key |", "| --- | --- | --- |"]
    for name, out in result.stages.items():
        lines.append(f"| {name} | {'yes' if out.cached else 'no'} | `{out.key}` |")
    lines += ["", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {format_metric(k, v)} |" for k, v in sorted(result.metrics.items())]
    if decision := decision_line(result):
        lines += ["", f"**{decision}**", f"`models:/{result.model_name}/{result.model_version}`"]
    if warning := baseline_warning(result):
        lines += ["", f"**{warning}**"]
    return "\n".join(lines) + "\n"


def console_lines(result: PipelineResult, ui_hint: str = "selfattn ui", model_line: str | None = None) -> list[str]:
    """The run's summary as ``selfattn run`` prints it: stages, headline metrics, the decision
    (or ``model_line`` in its place), what next."""
    lines = [f"pipeline run {result.pipeline_run_id} (MLflow run {result.mlflow_run_id})"]
    lines += [f"  {name:<9} {'cached' if out.cached else 'ran   '} {out.dir}" for name, out in result.stages.items()]
    shown = [k for k in HEADLINE if k in result.metrics]
    lines += [f"  {k:<17} {format_metric(k, result.metrics[k])}" for k in shown]
    if len(result.metrics) > len(shown):
        lines.append(f"  ({len(result.metrics) - len(shown)} more metrics in the MLflow run and summary.md)")
    if decision := model_line or decision_line(result):
        lines.append(decision)
    if warning := baseline_warning(result):
        lines.append(warning)
    return lines + next_steps(result, ui_hint)


def logged(result: PipelineResult, markdown_text: str) -> Logged:
    """What the pipeline's own run records at the end: the summary and the whole result."""
    return Logged(texts={"summary.md": markdown_text}, dicts={"pipeline_result.json": json.loads(result.model_dump_json())})


def last_model_name(home: Path) -> str | None:
    """The registered model of the last pipeline run in ``home`` that registered one, or None."""
    results = sorted((home / "runs").glob("pipeline-*/result.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in results:
        try:
            name = json.loads(path.read_text(encoding="utf-8")).get("model_name")
        except (OSError, ValueError):
            continue
        if name:
            return name
    return None
