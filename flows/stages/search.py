"""The search stage: an Optuna study of short fine-tunes from the pretrained checkpoint.

Trials are resumable (a retried trial resumes in the dead trial's directory) and the study
continues across runs (``search.n_trials`` finished trials in all). :func:`summarize` is the
summary, the plots and their declarations, shared with ``selfattn tune`` (:mod:`flows.tune`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from flows import tuning
from flows.config import PipelineConfig
from flows.stages.base import Artifact, Logged, Stage, StageOutput, engine_inputs
from flows.stages.finetune import finetune_config
from selfattn.errors import UserError
from selfattn.train import finetune

TrialCallbacks = Callable[[Any, dict[str, Any]], Sequence[Any]]


def search_plan(cfg: PipelineConfig, data: StageOutput, pretrained: StageOutput, home: Path) -> Stage:
    """The search stage, keyed by the space, the validated trial config, the pretrained model and the data."""
    inputs = {
        # trial_overrides and fixed are inside the validated trial config
        "search": cfg.search.model_dump(mode="json", exclude={"storage", "trial_overrides", "fixed"}),
        "pretrain": pretrained.key,
        "finetune": engine_inputs(finetune_config(cfg, data, pretrained, trial=True)),
        "data": data.result["digests"],
    }
    return Stage(home, "search", inputs)


def search_stage(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    home: Path,
    trial_callbacks: TrialCallbacks | None = None,
    study_callbacks: Sequence[Callable[[Any, Any], None]] = (),
) -> StageOutput:
    """Optuna search (resumable study); the result holds the best parameters.

    ``trial_callbacks(trial, params)`` returns extra engine callbacks for a trial (e.g. one that
    logs it as a nested tracking run). With ``search.enabled: false`` the best parameters are {}.
    """
    stage = search_plan(cfg, data, pretrained, home)
    with stage.claim() as (out, out_dir):
        if out is None and (not cfg.search.enabled or not cfg.search.space or cfg.search.n_trials == 0):
            out = stage.finish({"best_params": {}, "enabled": False})
        elif out is None:
            objective = make_objective(cfg, data, pretrained, out_dir, trial_callbacks)
            study = tuning.optimize(cfg, objective, home=home, callbacks=study_callbacks)
            out = stage.finish({**summarize(study, cfg, home, out_dir), "enabled": True})
    return out.declare(search_log(out.result, params=cfg.search.model_dump(exclude={"storage"})))


def summarize(study: Any, cfg: PipelineConfig, home: Path, out_dir: Path) -> dict[str, Any]:
    """The study's summary (best parameters and value, trial counts) and its plots under ``out_dir/plots``."""
    summary = tuning.summarize(study, cfg, home).to_dict()
    return {**summary, "plots": [str(p) for p in tuning.save_plots(study, out_dir / "plots")]}


def search_log(result: dict[str, Any], params: dict[str, Any] | None = None) -> Logged:
    """A study's declarations: the search section (``params``), best value and parameters, the summary, the plots."""
    if "best_value" not in result:  # search turned off
        return Logged(params=params or {})
    summary = {k: v for k, v in result.items() if k not in ("plots", "enabled")}
    best = {"best_params.json": result["best_params"]} if result["best_params"] else {}
    return Logged(
        params=params or {},
        metrics={"best_value": result["best_value"]},
        dicts={"search.json": summary, **best},
        artifacts=[Artifact(path=p, to="plots") for p in result.get("plots", [])],
    )


def make_objective(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    out_dir: Path,
    trial_callbacks: TrialCallbacks | None = None,
) -> Callable[[Any], float]:
    """Optuna objective: a short fine-tune from the pretrained checkpoint; returns the metric."""

    def objective(trial: Any) -> float:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        params = tuning.suggest(trial, cfg)
        engine_cfg = finetune_config(cfg, data, pretrained, params, trial=True)
        # a retried trial (its process died) resumes in the dead trial's directory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            number = RetryHeartbeatStaleTrialCallback.retried_trial_number(tuning.frozen(trial))
        trial_dir = out_dir / f"trial-{trial.number if number is None else number}"
        callbacks = [tuning.PruningCallback(trial=trial, metric=cfg.search.metric)]
        callbacks += list(trial_callbacks(trial, params) if trial_callbacks else [])
        result = finetune(engine_cfg, trial_dir, callbacks)
        value = tuning.pick_metric(result.metrics or {}, f"best_{cfg.search.metric}")  # the best model's score
        if value is None:
            raise UserError(f"trial {trial.number}: the engine reported no {cfg.search.metric!r} metric (got {sorted(result.metrics)})")
        trial.set_user_attr("out_dir", str(trial_dir))
        return value

    return objective
