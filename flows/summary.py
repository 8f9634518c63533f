"""What a finished pipeline run reports: ``PipelineResult`` and its summary (markdown and console lines)."""

from __future__ import annotations

import json
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


def markdown(config_name: str, result: PipelineResult, url: str) -> str:
    """The run's summary as markdown (the Prefect artifact, ``summary.md`` in MLflow and in the home)."""
    lines = [f"# selfattn pipeline `{config_name}`", "", f"MLflow run: {url}", "", "| stage | cached | key |", "| --- | --- | --- |"]
    for name, out in result.stages.items():
        lines.append(f"| {name} | {'yes' if out.cached else 'no'} | `{out.key}` |")
    lines += ["", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(result.metrics.items())]
    if result.decision:
        d = result.decision
        lines += ["", f"**Model** `{result.model_name}` version {result.model_version}: "
                  f"{'promoted to champion' if d['promoted'] else 'not promoted'} ({d['reason']})",
                  f"`models:/{result.model_name}/{result.model_version}`"]
    return "\n".join(lines) + "\n"


def console_lines(result: PipelineResult) -> list[str]:
    """The run's summary as ``selfattn run`` prints it."""
    lines = [f"pipeline run {result.pipeline_run_id} (MLflow run {result.mlflow_run_id})"]
    lines += [f"  {name:<9} {'cached' if out.cached else 'ran   '} {out.dir}" for name, out in result.stages.items()]
    lines += [f"  {k} = {v:.4f}" for k, v in sorted(result.metrics.items())]
    if result.decision:
        d = result.decision
        verdict = "promoted to champion" if d["promoted"] else "not promoted"
        lines.append(f"model {result.model_name} v{result.model_version}: {verdict} ({d['reason']})")
    return lines


def logged(result: PipelineResult, markdown_text: str) -> Logged:
    """What the pipeline's own run records at the end: the summary and the whole result."""
    return Logged(texts={"summary.md": markdown_text}, dicts={"pipeline_result.json": json.loads(result.model_dump_json())})
