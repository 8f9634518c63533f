"""``selfattn tune --workers N``: several processes on one Optuna study.

The gate and pretraining before it are the pipeline's own stages (``flows.pipeline.tune_flow``);
this module is the part that needs no Prefect: each worker is a separate process (``spawn``)
with its own storage connection, the RDB storage serialises trial bookkeeping, and the trials
still missing are split into fixed shares up front, so the study ends with exactly
``search.n_trials`` finished trials. Trials are nested MLflow runs under the ``tune`` run, which
gets the search stage's own summary and plots (``flows.stages.search.summarize`` / ``search_log``).
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from flows import tuning
from flows.config import PipelineConfig
from flows.stages.base import StageOutput
from flows.stages.search import make_objective, search_log, summarize
from flows.tracking.callbacks import TrialRuns
from flows.tracking.runs import RunContext, configure, log


def _worker(cfg_json: str, data_json: str, pre_json: str, home: str, out_dir: str, parent_run_id: str, experiment_id: str, worker: int, share: int | None = None) -> int:
    """One worker process: run its ``share`` of the trials still missing from the shared study."""
    cfg = PipelineConfig.model_validate_json(cfg_json)
    data = StageOutput.model_validate_json(data_json)
    pre = StageOutput.model_validate_json(pre_json)
    configure(Path(home))
    trials = TrialRuns(parent_run_id=parent_run_id, experiment_id=experiment_id, log_every=cfg.tracking.log_every)
    objective = make_objective(cfg, data, pre, Path(out_dir), trials.factory)
    study = tuning.optimize(cfg, objective, home=Path(home), worker=worker, callbacks=[trials], share=share)
    return tuning.n_finished(study)


def shares(missing: int, workers: int) -> list[int]:
    """``missing`` trials split over ``workers`` as evenly as possible (first ones get the rest)."""
    if workers < 1:
        raise ValueError(f"workers ({workers}) must be >= 1")
    return [missing // workers + (i < missing % workers) for i in range(workers)]


def run_workers(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, ctx: RunContext, *, workers: int = 1) -> dict[str, Any]:
    """Run the missing trials in ``workers`` processes; the study's summary and plots go on the tune run."""
    home = Path(ctx.home)
    out_dir = home / "runs" / f"tune-{cfg.search.study_name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = (cfg.model_dump_json(), data.model_dump_json(), pre.model_dump_json(), str(home), str(out_dir), ctx.parent_run_id, ctx.experiment_id)
    # schema + study once: workers creating them together race on PostgreSQL (CREATE TYPE)
    split = shares(max(0, cfg.search.n_trials - tuning.n_finished(tuning.make_study(cfg, home))), workers)
    if workers == 1:
        _worker(*args, 0)
    else:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
            for f in [pool.submit(_worker, *args, i, split[i]) for i in range(workers) if split[i]]:
                f.result()
    result = summarize(tuning.make_study(cfg, home), cfg, home, out_dir)
    log(ctx.parent_run_id, search_log(result))
    return {**{k: v for k, v in result.items() if k != "plots"}, "workers": workers, "mlflow_run_id": ctx.parent_run_id}
