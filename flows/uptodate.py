"""``selfattn run`` when there is nothing to do: the earlier pipeline run that did it all, in seconds.

A rerun whose every stage is cached (:func:`flows.stages.lookup.completed`) would start Prefect's
API, import the flows, open an MLflow run per stage and register nothing new: 13 s on two
cores for stage work of under one second. So before any of that, ``run`` asks :func:`find`: are
all stages done, is there an earlier pipeline run in this home with the same config (every
section, the gate's margin included), the same pipeline code and these stage keys (its
``result.json``), does its MLflow run still exist in the configured experiment, and is its
registered version still in the registry? If so the command prints that run's summary and the
registry's state now, and stops; ``selfattn run --new-run`` records a new pipeline run anyway
(its stages still come from the cache). Scheduled runs (Prefect deployments) call the flow
itself and always record one.

Anything unexpected (a store that does not answer, a file that does not parse) means "not known
to be up to date": the full run goes ahead and reports the problem the usual way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flows.config import PipelineConfig
from flows.summary import PipelineResult, console_lines, run_identity

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpToDate:
    """The earlier pipeline run that did everything this config asks, and the registry now."""

    result: PipelineResult  # as that run wrote it (its stages: the current keys)
    champion: str | None = None  # the version holding the alias now (None: no champion, or no registry)


def earlier_result(home: Path, stages: dict, identity: str) -> PipelineResult | None:
    """The newest ``runs/pipeline-*/result.json`` of ``home`` with this run identity (config and
    pipeline code) and these stage keys."""
    want = {name: out.key for name, out in stages.items()}
    paths = sorted((home / "runs").glob("pipeline-*/result.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in paths:
        try:
            result = PipelineResult.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
        if result.identity == identity and {name: out.key for name, out in result.stages.items()} == want:
            return result
    return None


def find(cfg: PipelineConfig, home: Path) -> UpToDate | None:
    """The earlier run when nothing is left to do for ``cfg`` in ``home``, else None."""
    from flows.stages.lookup import completed

    try:
        stages = completed(cfg, home)
        result = earlier_result(home, stages, run_identity(cfg)) if stages is not None else None
        if result is None:
            return None
        # the stages as they stand: all cached now, whatever that run had to do
        return _in_stores(cfg, home, result.model_copy(update={"stages": stages}))
    except Exception as exc:  # never a reason to fail: the full run checks everything again
        logger.debug("up-to-date check skipped: %s", exc)
        return None


def _in_stores(cfg: PipelineConfig, home: Path, result: PipelineResult) -> UpToDate | None:
    """``result`` if its MLflow run is still in the configured experiment and its version in the
    registry (the same config, so the same experiment and model name: the identity says so)."""
    from flows.stages.register import run_key
    from flows.tracking import registry, runs

    runs.configure(home)
    if not runs.run_is_in(result.mlflow_run_id, cfg.tracking.experiment):
        return None
    if not cfg.registry.enabled:
        return UpToDate(result)
    name = cfg.registry.model_name
    version = registry.find_version(name, run_key(result.stages["finetune"], result.stages["evaluate"], name))
    if version is None:
        return None
    champion = registry.champion_version(name)
    result = result.model_copy(update={"model_version": str(version.version)})
    return UpToDate(result, champion=str(champion.version) if champion is not None else None)


def console(found: UpToDate, ui_hint: str) -> list[str]:
    """What ``selfattn run`` prints when nothing is left to do: that run's summary, with the
    registered version's standing now (not the gate's verdict back then)."""
    r = found.result
    head = (
        f"up to date: every stage of this config, code and data finished earlier in pipeline run {r.pipeline_run_id}; "
        "nothing ran (--new-run records a new pipeline run from the cached stages)"
    )
    if not (r.model_name and r.model_version):
        return [head, *console_lines(r, ui_hint)]
    is_champion = found.champion == r.model_version
    if is_champion:
        state = "the champion"
    elif found.champion:
        state = f"registered, not the champion (the champion is v{found.champion})"
    else:
        state = "registered; no version holds the champion alias"
    now = r.model_copy(update={"decision": {"promoted": is_champion}})
    return [head, *console_lines(now, ui_hint, model_line=f"model {r.model_name} v{r.model_version}: {state}")]
