"""Is there anything to do? The stored outputs of every stage of a config, read from their markers.

``selfattn run`` asks this before it starts Prefect and MLflow: when every stage of the config
finished earlier in this home (same inputs, same code, same data digests), nothing would run.
The keys come from the same ``*_plan`` functions the stages use, so this lookup and a run agree
by construction; it reads done markers only: it computes, writes and locks nothing.
"""

from __future__ import annotations

from pathlib import Path

from flows.config import PipelineConfig
from flows.stages import data as data_stages
from flows.stages.base import StageOutput
from flows.stages.evaluate import evaluate_plan
from flows.stages.finetune import finetune_plan
from flows.stages.init_from import init_from_done
from flows.stages.pretrain import pretrain_plan
from flows.stages.search import search_plan

STAGES = ("data", "pretrain", "search", "finetune", "evaluate")


def completed(cfg: PipelineConfig, home: Path) -> dict[str, StageOutput] | None:
    """``{stage: stored output}`` in the pipeline's order (``data`` is the materialised data, the
    gate's pass included; ``pretrain`` is ``init_from``'s output when the config names one), or
    None as soon as a stage has no marker for its current key."""
    data = data_stages.data_plan(cfg, home)[0].done()
    if data is None or data_stages.validate_plan(cfg, data, home).done() is None:  # a failed gate leaves no marker
        return None
    pre = init_from_done(cfg, home) if cfg.init_from else pretrain_plan(cfg, data, home)[0].done()
    if pre is None:
        return None
    search = search_plan(cfg, data, pre, home).done()
    if search is None:
        return None
    finetuned = finetune_plan(cfg, data, pre, search, home)[0].done()
    if finetuned is None:
        return None
    evaluated = evaluate_plan(cfg, data, finetuned, home).done()
    if evaluated is None:
        return None
    return {"data": data, "pretrain": pre, "search": search, "finetune": finetuned, "evaluate": evaluated}
