"""The nightly pipeline as Prefect 3 flows: one main flow, one sub-flow per stage.

    validate (gate) -> pretrain | init_from -> Optuna search -> fine-tune -> evaluate -> register -> promote

Each sub-flow opens the stage's MLflow run, calls the stage (:mod:`flows.stages`: plain functions,
cached by done markers keyed by their inputs + code version + data digests) through a thin task,
and records what the stage declared (``flows.tracking.runs.log_stage``). Retries only on I/O tasks
(data download, model logging, registration). Stages hand each other paths and small JSON values
(``StageOutput``). MLflow: one parent run per pipeline run, a nested run per stage and per Optuna trial.

Deployment entry point: ``flows/pipeline.py:pipeline``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import prefect_ops, summary
from flows.config import PipelineConfig, as_config
from flows.paths import selfattn_home
from flows.reliability import retry_on_io
from flows.serving import log_model
from flows.stages import data as data_stages
from flows.stages import evaluate, finetune, init_from, pretrain, register, search
from flows.stages.base import StageOutput
from flows.summary import PipelineResult
from flows.tracking import registry
from flows.tracking.callbacks import MlflowCallback, TrialRuns
from flows.tracking.runs import (
    TAG_PIPELINE_RUN_ID,
    RunContext,
    artifacts_disk_full,
    log,
    log_stage,
    pipeline_run,
    run_url,
    stage_run,
)
from flows.tune import run_workers
from selfattn.train.callbacks import ProgressBar
from selfattn.utils import atomic_write_text

FLOW_NAME = "selfattn-pipeline"


def _log(msg: str, *args: Any) -> None:
    try:
        get_run_logger().info(msg, *args)
    except Exception:  # outside a flow run (direct calls in tests)
        logging.getLogger(__name__).info(msg, *args)


# --------------------------------------------------------------------------- tasks (thin wrappers)


@task(name="prepare-data", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_on_io, cache_policy=NO_CACHE)
def prepare_data_task(cfg: PipelineConfig, home: str) -> StageOutput:
    """Materialise the run's data files (downloads when SELFATTN_DATA_DIR is unset: I/O, retried)."""
    return data_stages.prepare_data(cfg, Path(home))


@task(name="check-data", cache_policy=NO_CACHE)
def validate_task(cfg: PipelineConfig, data: StageOutput, home: str) -> StageOutput:
    """Great Expectations checks on corpus, train and dev."""
    return data_stages.validate_data(cfg, data, Path(home))


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(cfg: PipelineConfig, data: StageOutput, home: str, run_id: str) -> StageOutput:
    """Causal-LM pretraining, metrics streamed to the stage's MLflow run."""
    cb = MlflowCallback(run_id=run_id, log_every=cfg.tracking.log_every)
    return pretrain.pretrain_stage(cfg, data, Path(home), [cb, ProgressBar()])


@task(name="init-from", cache_policy=NO_CACHE)
def init_from_task(cfg: PipelineConfig, home: str) -> StageOutput:
    """The model ``init_from`` names (a Hugging Face import is converted once)."""
    return init_from.init_from_stage(cfg, Path(home))


@task(name="optuna-search", cache_policy=NO_CACHE)
def search_task(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, ctx: RunContext, run_id: str) -> StageOutput:
    """Optuna trials (nested MLflow runs) on the shared study."""
    trials = TrialRuns(parent_run_id=run_id, experiment_id=ctx.experiment_id, log_every=cfg.tracking.log_every, tags={TAG_PIPELINE_RUN_ID: ctx.pipeline_run_id})
    return search.search_stage(cfg, data, pre, Path(ctx.home), trial_callbacks=trials.factory, study_callbacks=[trials])


@task(name="finetune", cache_policy=NO_CACHE)
def finetune_task(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, sr: StageOutput, home: str, run_id: str, parent_run_id: str = "") -> StageOutput:
    """The final fine-tune with the best parameters (its curves also on the parent run)."""
    cb = MlflowCallback(run_id=run_id, log_every=cfg.tracking.log_every, mirror_run_ids=[parent_run_id])
    return finetune.finetune_stage(cfg, data, pre, sr, Path(home), [cb, ProgressBar()])


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, data: StageOutput, ft: StageOutput, home: str) -> StageOutput:
    """Dev-set metrics and plots."""
    return evaluate.evaluate_stage(cfg, data, ft, Path(home))


@task(name="log-model", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io, cache_policy=NO_CACHE)
def log_model_task(model_dir: str, run_id: str) -> str:
    """Log the evaluated model (``model_dir``) as a pyfunc on ``run_id`` (the parent run); returns its URI."""
    with artifacts_disk_full(run_id):  # a full disk is DiskFull (not retried), not a copy error
        return log_model(model_dir, name="model", run_id=run_id).model_uri


@task(name="register", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def register_task(model_uri: str, model_name: str, run_key: str, tags: dict[str, str], home: str) -> str:
    """New registry version (alias challenger); idempotent on ``run_key``."""
    mv = registry.register(model_uri=model_uri, model_name=model_name, run_key=run_key, tags=tags, home=Path(home))
    return str(mv.version)


@task(name="champion-gate", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def gate_task(model_name: str, version: str, metric: str, margin: float, home: str, slices: dict[str, float] | None = None) -> dict[str, Any]:
    """Move champion if the challenger is better by the margin (and loses no guarded slice)."""
    return registry.gate(model_name=model_name, version=version, metric=metric, margin=margin, home=Path(home), slices=slices).to_dict()


# --------------------------------------------------------------------------- sub-flows (one per stage)


@flow(name="validate", flow_run_name=prefect_ops.stage_run_name("validate"))
def validate_flow(cfg: PipelineConfig, ctx: RunContext) -> StageOutput:
    """Data gate: materialise + check; a failure stops the pipeline before any training."""
    with stage_run("validate", ctx) as run_id:
        data = prepare_data_task(cfg, ctx.home)
        log_stage(run_id, data, ctx)
        checked = validate_task(cfg, data, ctx.home)
        log_stage(run_id, checked, ctx)
        data_stages.require_passed(checked)
    return data


@flow(name="pretrain", flow_run_name=prefect_ops.stage_run_name("pretrain"))
def pretrain_flow(cfg: PipelineConfig, data: StageOutput, ctx: RunContext) -> StageOutput:
    with stage_run("pretrain", ctx) as run_id:
        out = pretrain_task(cfg, data, ctx.home, run_id)
        log_stage(run_id, out, ctx)
    return out


@flow(name="init_from", flow_run_name=prefect_ops.stage_run_name("init_from"))
def init_from_flow(cfg: PipelineConfig, ctx: RunContext) -> StageOutput:
    """An imported or existing checkpoint stands in for pretraining."""
    with stage_run("init_from", ctx) as run_id:
        out = init_from_task(cfg, ctx.home)
        log_stage(run_id, out, ctx)
    return out


@flow(name="search", flow_run_name=prefect_ops.stage_run_name("search"))
def search_flow(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, ctx: RunContext) -> StageOutput:
    with stage_run("search", ctx) as run_id:
        out = search_task(cfg, data, pre, ctx, run_id)
        log_stage(run_id, out, ctx)
    return out


@flow(name="finetune", flow_run_name=prefect_ops.stage_run_name("finetune"))
def finetune_flow(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, sr: StageOutput, ctx: RunContext) -> StageOutput:
    with stage_run("finetune", ctx) as run_id:
        out = finetune_task(cfg, data, pre, sr, ctx.home, run_id, ctx.parent_run_id)
        log_stage(run_id, out, ctx)
    return out


@flow(name="evaluate", flow_run_name=prefect_ops.stage_run_name("evaluate"))
def evaluate_flow(cfg: PipelineConfig, data: StageOutput, ft: StageOutput, ctx: RunContext) -> StageOutput:
    with stage_run("evaluate", ctx) as run_id:
        out = evaluate_task(cfg, data, ft, ctx.home)
        log_stage(run_id, out, ctx)
    return out


@flow(name="register", flow_run_name=prefect_ops.stage_run_name("register"))
def register_flow(cfg: PipelineConfig, ft: StageOutput, ev: StageOutput, ctx: RunContext) -> dict[str, Any]:
    """Log the pyfunc, register a version (idempotent), then the champion gate."""
    name, metric = cfg.registry.model_name, cfg.promotion.metric
    run_key = register.run_key(ft, ev, name)
    with stage_run("register", ctx) as run_id:
        existing = registry.find_version(name, run_key)
        # on the parent run: its page lists the logged model and the registered version. The
        # evaluate stage's copy, with the temperature its metrics were computed with
        model_uri = existing.source if existing is not None else log_model_task(ev.result["model_dir"], ctx.parent_run_id)
        tags = register.version_tags(ev, metric=metric, pipeline_run_id=ctx.pipeline_run_id, mlflow_run_id=ctx.parent_run_id, slices=cfg.promotion.slices)
        version = register_task(model_uri, name, run_key, tags, ctx.home)
        decision = gate_task(name, version, metric, cfg.promotion.margin, ctx.home, cfg.promotion.slices)
        log(run_id, register.Decision(**decision).log())
    return {"model_uri": model_uri, "version": version, "decision": decision}


# --------------------------------------------------------------------------- the main flows


def _start(cfg: PipelineConfig, kind: str):
    """Flow runs of killed pipelines marked Crashed, then the MLflow run of this one."""
    if crashed := prefect_ops.on_pipeline_start():
        _log("marked %d flow run(s) of killed pipelines Crashed: %s", len(crashed), ", ".join(crashed))
    return pipeline_run(cfg, kind=kind, pipeline_run_id=prefect_ops.pipeline_run_id(), home=selfattn_home())


@flow(name=FLOW_NAME, log_prints=True, flow_run_name=prefect_ops.pipeline_run_name)
def pipeline(config: str | PipelineConfig = "demo", overrides: list[str] | None = None) -> PipelineResult:
    """Run the whole pipeline for a preset name, a YAML path or a ``PipelineConfig``."""
    cfg = as_config(config, overrides)
    with _start(cfg, "pipeline") as ctx:
        out: dict[str, StageOutput] = {"data": validate_flow(cfg, ctx)}
        out["pretrain"] = init_from_flow(cfg, ctx) if cfg.init_from else pretrain_flow(cfg, out["data"], ctx)
        out["search"] = search_flow(cfg, out["data"], out["pretrain"], ctx)
        out["finetune"] = finetune_flow(cfg, out["data"], out["pretrain"], out["search"], ctx)
        out["evaluate"] = evaluate_flow(cfg, out["data"], out["finetune"], ctx)
        result = PipelineResult(
            pipeline_run_id=ctx.pipeline_run_id, mlflow_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id,
            stages=out, metrics=out["evaluate"].result["metrics"], identity=summary.run_identity(cfg),
        )
        if cfg.registry.enabled:
            reg = register_flow(cfg, out["finetune"], out["evaluate"], ctx)
            result.model_name, result.model_version, result.decision = cfg.registry.model_name, reg["version"], reg["decision"]
        text = summary.markdown(cfg.name, result, run_url(ctx.parent_run_id, ctx.experiment_id))
        log(ctx.parent_run_id, summary.logged(result, text))
    run_dir = Path(ctx.home) / "runs" / f"pipeline-{ctx.pipeline_run_id}"
    atomic_write_text(run_dir / "result.json", result.model_dump_json(indent=2))
    atomic_write_text(run_dir / "summary.md", text)
    prefect_ops.markdown_artifact(text)
    return result


@flow(name="selfattn-tune", log_prints=True)
def tune_flow(config: str | PipelineConfig = "demo", overrides: list[str] | None = None, workers: int = 1) -> dict[str, Any]:
    """``selfattn tune``: the pipeline's gate and pretraining stages, then ``workers`` processes on the study."""
    cfg = as_config(config, overrides)
    with _start(cfg, "tune") as ctx:
        data = validate_flow(cfg, ctx)
        pre = init_from_flow(cfg, ctx) if cfg.init_from else pretrain_flow(cfg, data, ctx)
        return run_workers(cfg, data, pre, ctx, workers=workers)


def build_deployment(*, cron: str, config: str = "demo", overrides: list[str] | None = None, name: str = "nightly"):
    """The Prefect deployment object for ``pipeline`` on a cron schedule (what ``deploy`` serves)."""
    return pipeline.to_deployment(name=name, cron=cron, parameters={"config": config, "overrides": list(overrides or [])})
