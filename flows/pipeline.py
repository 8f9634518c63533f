"""The nightly pipeline as Prefect 3 flows: one main flow, one sub-flow per stage.

    validate (gate) -> pretrain -> Optuna search -> fine-tune -> evaluate -> register -> promote

Tasks are thin wrappers over :mod:`flows.stages` (plain functions, cached by done markers keyed
by their inputs + code version + data digests); retries only on I/O tasks (data download, model
logging, registration). Stages hand each other paths and small JSON values (``StageOutput``).
MLflow: one parent run per pipeline run, a nested run per stage and per Optuna trial.

Deployment entry point: ``flows/pipeline.py:pipeline``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from selfattn.errors import UserError
from selfattn.utils import atomic_write_text
from selfattn.train.callbacks import ProgressBar

from flows import behaviour_stage, init_from, prefect_ops, registry, stages, tracking
from flows.config import PipelineConfig, load_pipeline_config
from flows.paths import selfattn_home
from flows.reliability import retry_on_io
from flows.serving import log_model
from flows.stages import StageOutput
from flows.tune import run_workers
from flows.tuning import pick_metric

FLOW_NAME = "selfattn-pipeline"
DETAIL_METRIC_PREFIXES = ("behaviour.", "slice.", "calibration.", "ece_uncalibrated")


class RunContext(BaseModel):
    """Where a stage logs: the pipeline's MLflow parent run and ids."""

    model_config = ConfigDict(extra="forbid")

    home: str
    experiment_id: str
    parent_run_id: str
    pipeline_run_id: str


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


def _log(msg: str, *args: Any) -> None:
    try:
        get_run_logger().info(msg, *args)
    except Exception:  # outside a flow run (direct calls in tests)
        logging.getLogger(__name__).info(msg, *args)


def _stage_tags(ctx: RunContext, out: StageOutput | None = None) -> dict[str, str]:
    tags = {tracking.TAG_PIPELINE_RUN_ID: ctx.pipeline_run_id}
    if out is not None:
        tags.update({"selfattn.stage_key": out.key, "selfattn.cached": str(out.cached).lower(), "selfattn.stage_dir": out.dir})
    return tags


def _finish_stage(run_id: str, ctx: RunContext, out: StageOutput, metrics: dict[str, float] | None = None) -> None:
    from mlflow import MlflowClient

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    tags = [RunTag(k, v) for k, v in _stage_tags(ctx, out).items()]
    values = [Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()]
    MlflowClient().log_batch(run_id, metrics=values, tags=tags, synchronous=True)  # one request


# --------------------------------------------------------------------------- tasks (thin wrappers)


@task(name="prepare-data", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_on_io, cache_policy=NO_CACHE)
def prepare_data_task(cfg: PipelineConfig, home: str) -> StageOutput:
    """Materialise the run's data files (downloads when SELFATTN_DATA_DIR is unset: I/O, retried)."""
    return stages.prepare_data(cfg, Path(home))


@task(name="check-data", cache_policy=NO_CACHE)
def validate_task(cfg: PipelineConfig, data: StageOutput, home: str) -> StageOutput:
    """Great Expectations checks on corpus, train and dev."""
    return stages.validate_data(cfg, data, Path(home))


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_task(cfg: PipelineConfig, data: StageOutput, home: str, run_id: str) -> StageOutput:
    """Causal-LM pretraining, metrics streamed to the stage's MLflow run."""
    cb = tracking.MlflowCallback(run_id=run_id, log_every=cfg.tracking.log_every)
    return stages.pretrain_stage(cfg, data, Path(home), [cb, ProgressBar()])


@task(name="optuna-search", cache_policy=NO_CACHE)
def search_task(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, ctx: RunContext, run_id: str) -> StageOutput:
    """Optuna trials (nested MLflow runs) on the shared study."""
    trials = tracking.TrialRuns(
        parent_run_id=run_id, experiment_id=ctx.experiment_id, log_every=cfg.tracking.log_every, tags=_stage_tags(ctx)
    )
    return stages.search_stage(cfg, data, pre, Path(ctx.home), trial_callbacks=trials.factory, study_callbacks=[trials])


@task(name="finetune", cache_policy=NO_CACHE)
def finetune_task(
    cfg: PipelineConfig, data: StageOutput, pre: StageOutput, search: StageOutput, home: str, run_id: str, parent_run_id: str = ""
) -> StageOutput:
    """The final fine-tune with the best parameters (its curves also on the parent run)."""
    cb = tracking.MlflowCallback(run_id=run_id, log_every=cfg.tracking.log_every, mirror_run_ids=[parent_run_id])
    return stages.finetune_stage(cfg, data, pre, search, Path(home), [cb, ProgressBar()])


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, data: StageOutput, ft: StageOutput, home: str) -> StageOutput:
    """Dev-set metrics and plots."""
    return stages.evaluate_stage(cfg, data, ft, Path(home))


@task(name="log-model", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def log_model_task(model_dir: str, run_id: str) -> str:
    """Log the evaluated model (``model_dir``) as a pyfunc on ``run_id`` (the parent run); returns its URI."""
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
    import mlflow

    with tracking.stage_run("validate", parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, tags=_stage_tags(ctx), params=cfg.data.model_dump()) as run:
        data = prepare_data_task(cfg, ctx.home)
        mlflow.set_tag(tracking.TAG_DATA_DIGEST, data.result["digest"])
        mlflow.set_tag("selfattn.data_key", data.key)
        for name, file, ctx_name in (("corpus", "corpus.txt", "pretrain"), ("sst2-train", "train.tsv", "training"), ("sst2-dev", "dev.tsv", "evaluation")):
            try:
                tracking.log_dataset(
                    Path(data.result["files"][file]), name=name, context=ctx_name,
                    targets=cfg.data.label_column if file.endswith(".tsv") else None, digest=data.result["digests"][file],
                    also_run_ids=[ctx.parent_run_id],
                )
            except Exception as exc:  # an unreadable file is the data gate's to report, not a crash here
                _log("could not log dataset %s: %s", name, exc)
        try:
            checked = validate_task(cfg, data, ctx.home)
        except UserError as exc:  # unusable file: no report, but recorded
            mlflow.set_tag("selfattn.validation", "unusable")
            mlflow.log_text(str(exc), "validation/error.txt")
            raise
        mlflow.log_artifact(checked.result["report"], "validation")
        for name, docs in checked.result.get("data_docs", {}).items():
            if Path(docs).is_dir():
                mlflow.log_artifacts(docs, f"validation/data_docs/{name}")
        mlflow.set_tag("selfattn.validation", "passed" if checked.result["passed"] else "failed")
        _finish_stage(run.info.run_id, ctx, checked)
        if not checked.result["passed"]:
            mlflow.MlflowClient().log_artifact(ctx.parent_run_id, checked.result["report"], "validation")
            stages.require_passed(checked)
    return data


@flow(name="pretrain", flow_run_name=prefect_ops.stage_run_name("pretrain"))
def pretrain_flow(cfg: PipelineConfig, data: StageOutput, ctx: RunContext) -> StageOutput:
    import mlflow

    with tracking.stage_run("pretrain", parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, tags=_stage_tags(ctx)) as run:
        out = pretrain_task(cfg, data, ctx.home, run.info.run_id)
        tracking.log_params(run.info.run_id, out.result["config"])  # the engine config the stage built
        _finish_stage(run.info.run_id, ctx, out, {f"final_{k}": v for k, v in out.result["metrics"].items()})
        tok = Path(out.result["best_dir"]) / "tokenizer"
        if tok.is_dir():
            mlflow.log_artifacts(str(tok), "tokenizer")
        mlflow.log_artifact(out.result["history"], "history")
    return out


@flow(name="search", flow_run_name=prefect_ops.stage_run_name("search"))
def search_flow(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, ctx: RunContext) -> StageOutput:
    import mlflow

    with tracking.stage_run("search", parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, tags=_stage_tags(ctx), params=cfg.search.model_dump(exclude={"storage"})) as run:
        out = search_task(cfg, data, pre, ctx, run.info.run_id)
        metrics = {"best_value": out.result["best_value"]} if "best_value" in out.result else {}
        _finish_stage(run.info.run_id, ctx, out, metrics)
        if out.result.get("best_params"):
            mlflow.log_dict(out.result["best_params"], "best_params.json")
        for p in out.result.get("plots", []):
            mlflow.log_artifact(p, "plots")
    return out


@flow(name="finetune", flow_run_name=prefect_ops.stage_run_name("finetune"))
def finetune_flow(cfg: PipelineConfig, data: StageOutput, pre: StageOutput, search: StageOutput, ctx: RunContext) -> StageOutput:
    import mlflow

    with tracking.stage_run("finetune", parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, tags=_stage_tags(ctx)) as run:
        out = finetune_task(cfg, data, pre, search, ctx.home, run.info.run_id, ctx.parent_run_id)
        tracking.log_params(run.info.run_id, out.result["config"])  # the engine config the stage built
        _finish_stage(run.info.run_id, ctx, out, {f"final_{k}": v for k, v in out.result["metrics"].items()})
        mlflow.log_artifact(out.result["history"], "history")
    return out


@flow(name="evaluate", flow_run_name=prefect_ops.stage_run_name("evaluate"))
def evaluate_flow(cfg: PipelineConfig, data: StageOutput, ft: StageOutput, ctx: RunContext) -> StageOutput:
    import mlflow

    with tracking.stage_run("evaluate", parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, tags=_stage_tags(ctx)) as run:
        out = evaluate_task(cfg, data, ft, ctx.home)
        _finish_stage(run.info.run_id, ctx, out, out.result["metrics"])
        mlflow.set_tag("eval.dataset_digest", out.result["dataset_digest"])
        mlflow.log_artifact(out.result["metrics_file"], "evaluation")
        for p in out.result["plots"]:
            mlflow.log_artifact(p, "plots")
        behaviour_stage.log_results(out.result)
    return out


@flow(name="register", flow_run_name=prefect_ops.stage_run_name("register"))
def register_flow(cfg: PipelineConfig, ft: StageOutput, ev: StageOutput, ctx: RunContext) -> dict[str, Any]:
    """Log the pyfunc, register a version (idempotent), then the champion gate."""
    import mlflow

    metric = cfg.promotion.metric
    score = pick_metric(ev.result["metrics"], metric)
    run_key = stages.digest({"finetune": ft.key, "evaluate": ev.key, "model": cfg.registry.model_name})[:24]
    with tracking.stage_run("register", parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, tags=_stage_tags(ctx)):
        existing = registry.find_version(cfg.registry.model_name, run_key)
        if existing is None:
            # on the parent run: its page lists the logged model and the registered version. The
            # evaluate stage's copy, with the temperature its metrics were computed with (the
            # fine-tune's own directory is never calibrated)
            model_uri = log_model_task(ev.result["model_dir"], ctx.parent_run_id)
        else:
            model_uri = existing.source
        tags = {
            tracking.TAG_PIPELINE_RUN_ID: ctx.pipeline_run_id,
            registry.TAG_METRIC: metric,
            registry.TAG_SCORE: "nan" if score is None else f"{score:.6f}",
            registry.TAG_EVAL_DIGEST: ev.result["dataset_digest"],
            "mlflow_run_id": ctx.parent_run_id,
            **{f"eval.{k}": f"{v:.6f}" for k, v in ev.result["metrics"].items()},
        }
        version = register_task(model_uri, cfg.registry.model_name, run_key, tags, ctx.home)
        decision = gate_task(cfg.registry.model_name, version, metric, cfg.promotion.margin, ctx.home, cfg.promotion.slices)
        mlflow.set_tags({"registry.model": cfg.registry.model_name, "registry.version": version, "promotion.decision": "promoted" if decision["promoted"] else "rejected", "promotion.reason": decision["reason"]})
        mlflow.log_dict(decision, "promotion.json")
    return {"model_uri": model_uri, "version": version, "decision": decision}


# --------------------------------------------------------------------------- the main flow


def _pipeline_run_id() -> str:
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    except Exception:
        pass
    return uuid.uuid4().hex


def _summary_markdown(cfg: PipelineConfig, result: PipelineResult, url: str) -> str:
    lines = [f"# selfattn pipeline `{cfg.name}`", "", f"MLflow run: {url}", "", "| stage | cached | key |", "| --- | --- | --- |"]
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


@contextlib.contextmanager
def _parent_run(cfg: PipelineConfig, kind: str) -> Iterator[RunContext]:
    """Stores configured, stale runs marked KILLED, then the MLflow parent run of a pipeline/tune run."""
    import mlflow

    home = selfattn_home()
    home.mkdir(parents=True, exist_ok=True)
    tracking.configure(home)
    experiment_id = tracking.ensure_experiment(cfg.tracking.experiment, home)
    stale = tracking.mark_stale_runs(experiment_id)
    if stale:
        _log("marked %d stale MLflow run(s) KILLED: %s", len(stale), ", ".join(stale))
    if crashed := prefect_ops.on_pipeline_start():
        _log("marked %d flow run(s) of killed pipelines Crashed: %s", len(crashed), ", ".join(crashed))
    pipeline_run_id = _pipeline_run_id()
    tags = {
        **tracking.process_tags(),
        tracking.TAG_PIPELINE_RUN_ID: pipeline_run_id,
        "selfattn.config": cfg.name,
        "selfattn.code_version": stages.code_version(),
    }
    if kind != "pipeline":
        tags[tracking.TAG_STAGE] = kind
    if commit := tracking.git_commit():
        tags[tracking.TAG_GIT] = commit
    name = f"{cfg.name}-{pipeline_run_id[:8]}" if kind == "pipeline" else f"tune-{cfg.search.study_name}"
    parent = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags, log_system_metrics=cfg.tracking.system_metrics)
    try:
        tracking.log_params(parent.info.run_id, cfg.model_dump(mode="json"))
        mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/resolved.yaml")
        yield RunContext(home=str(home), experiment_id=experiment_id, parent_run_id=parent.info.run_id, pipeline_run_id=pipeline_run_id)
    except BaseException as exc:
        tracking.end_failed_run(exc)
        if (clear := tracking.outage_error(exc)) is not None:
            raise clear from None  # one paragraph, not the client's retry traceback
        raise
    else:
        mlflow.end_run()


def _resolve(config: str | PipelineConfig, overrides: list[str] | None) -> PipelineConfig:
    if isinstance(config, PipelineConfig):
        if overrides:
            raise UserError("overrides apply to a preset or a file; pass an already-resolved PipelineConfig without them")
        return config
    return load_pipeline_config(config, overrides or [])


@flow(name=FLOW_NAME, log_prints=True, flow_run_name=prefect_ops.pipeline_run_name)
def pipeline(config: str | PipelineConfig = "demo", overrides: list[str] | None = None) -> PipelineResult:
    """Run the whole pipeline for a preset name, a YAML path or a ``PipelineConfig``."""
    import mlflow

    cfg = _resolve(config, overrides)
    with _parent_run(cfg, "pipeline") as ctx:
        out: dict[str, StageOutput] = {}
        data = validate_flow(cfg, ctx)
        out["data"] = data
        mlflow.set_tag(tracking.TAG_DATA_DIGEST, data.result["digest"])
        # init_from (an imported or existing checkpoint) stands in for pretraining
        out["pretrain"] = init_from.init_from_flow(cfg, ctx) if cfg.init_from else pretrain_flow(cfg, data, ctx)
        out["search"] = search_flow(cfg, data, out["pretrain"], ctx)
        out["finetune"] = finetune_flow(cfg, data, out["pretrain"], out["search"], ctx)
        out["evaluate"] = evaluate_flow(cfg, data, out["finetune"], ctx)
        metrics = out["evaluate"].result["metrics"]
        # the parent shows the headline figures; behaviour, slice and calibration details stay on the
        # evaluate run, so the parent's charts and compare view are not buried under forty keys
        mlflow.log_metrics({k: v for k, v in metrics.items() if not k.startswith(DETAIL_METRIC_PREFIXES)})
        result = PipelineResult(
            pipeline_run_id=ctx.pipeline_run_id, mlflow_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id,
            stages=out, metrics=metrics,
        )
        if cfg.registry.enabled:
            reg = register_flow(cfg, out["finetune"], out["evaluate"], ctx)
            result.model_name, result.model_version, result.decision = cfg.registry.model_name, reg["version"], reg["decision"]
        url = tracking.run_url(ctx.parent_run_id, ctx.experiment_id)
        summary = _summary_markdown(cfg, result, url)
        mlflow.log_text(summary, "summary.md")
        mlflow.log_dict(json.loads(result.model_dump_json()), "pipeline_result.json")
    run_dir = Path(ctx.home) / "runs" / f"pipeline-{ctx.pipeline_run_id}"
    atomic_write_text(run_dir / "result.json", result.model_dump_json(indent=2))
    atomic_write_text(run_dir / "summary.md", summary)
    _markdown_artifact(summary)
    return result


@flow(name="selfattn-tune", log_prints=True)
def tune_flow(config: str | PipelineConfig = "demo", overrides: list[str] | None = None, workers: int = 1) -> dict[str, Any]:
    """``selfattn tune``: the pipeline's gate and pretraining stages, then ``workers`` processes on the study."""
    cfg = _resolve(config, overrides)
    with _parent_run(cfg, "tune") as ctx:
        data = validate_flow(cfg, ctx)
        pre = init_from.init_from_flow(cfg, ctx) if cfg.init_from else pretrain_flow(cfg, data, ctx)
        return run_workers(cfg, data, pre, Path(ctx.home), parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, workers=workers)


def _markdown_artifact(markdown: str) -> None:
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key="selfattn-pipeline-summary", description="selfattn pipeline run")
    except Exception as exc:  # an artifact is a nicety; never fail a finished run for it
        _log("could not create the Prefect summary artifact: %s", exc)


def build_deployment(*, cron: str, config: str = "demo", overrides: list[str] | None = None, name: str = "nightly"):
    """The Prefect deployment object for ``pipeline`` on a cron schedule (what ``deploy`` serves)."""
    return pipeline.to_deployment(name=name, cron=cron, parameters={"config": config, "overrides": list(overrides or [])})
