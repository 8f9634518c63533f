"""Engine and Optuna callbacks that stream to MLflow: batched step metrics, and one nested run per trial.

The training engine reports through ``selfattn.train.Callback`` and never imports MLflow; the
flows pass these callbacks in (``flows.pipeline``'s tasks, ``selfattn tune``'s workers).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from flows.tracking.runs import TAG_STAGE, log_params, process_tags
from selfattn.train import Callback


class MlflowCallback(Callback):
    """Training callback that logs to MLflow: step metrics batched, eval metrics, checkpoints.

    Step metrics are buffered and sent with one ``log_batch`` call every ``log_every`` steps
    (not one request per step); eval metrics go out at each eval, prefixed ``val_`` unless the
    engine already named them so.
    """

    def __init__(self, *, run_id: str, log_every: int = 20, prefix: str = "", mirror_run_ids: Sequence[str] = ()) -> None:
        from mlflow import MlflowClient

        if log_every <= 0:
            raise ValueError(f"log_every ({log_every}) must be > 0")
        self.run_id = run_id
        # runs that get the same metric batches (not params or tags): the pipeline's parent run,
        # so the compare view of two pipeline runs draws their learning curves on one chart
        self.mirror_run_ids = [r for r in mirror_run_ids if r and r != run_id]
        self.log_every = log_every
        self.prefix = prefix
        self._client = MlflowClient()
        self._buffer: list[Any] = []
        self._since_flush = 0

    def _metric(self, key: str, value: Any, step: int):
        from mlflow.entities import Metric

        return Metric(f"{self.prefix}{key}", float(value), int(time.time() * 1000), int(step))

    def _add(self, metrics: dict[str, Any], step: int, name=lambda k: k) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self._buffer.append(self._metric(name(k), v, step))

    def flush(self) -> None:
        # a batch re-sent after a lost response is not doubled: the store skips identical
        # (key, value, timestamp, step) rows
        for run_id in (self.run_id, *self.mirror_run_ids):
            for i in range(0, len(self._buffer), 1000):
                self._client.log_batch(run_id, metrics=self._buffer[i : i + 1000], synchronous=True)
        self._buffer = []
        self._since_flush = 0

    def on_train_start(self, info: dict) -> None:
        params = {k: v for k, v in (info or {}).items() if isinstance(v, (int, float, str, bool))}
        if params:
            log_params(self.run_id, {f"{self.prefix}info.{k}": v for k, v in params.items()})
        if corrupt := (info or {}).get("corrupt_checkpoints"):  # skipped on resume: named on the run
            self._client.set_tag(self.run_id, f"{self.prefix}corrupt_checkpoints", "; ".join(corrupt)[:5000])

    def on_step(self, step: int, metrics: dict) -> None:
        self._add(metrics, step)
        self._since_flush += 1
        if self._since_flush >= self.log_every:
            self.flush()

    def on_eval(self, step: int, metrics: dict) -> None:
        self._add(metrics, step, name=lambda k: k if k.startswith(("val", "eval")) else f"val_{k}")
        self.flush()

    def on_checkpoint(self, step: int, path: Path) -> None:
        self._client.set_tag(self.run_id, f"{self.prefix}last_checkpoint", f"{path} (step {step})")

    def on_train_end(self, result: Any) -> None:
        self.flush()




class TrialRuns:
    """Logs each Optuna trial as a nested MLflow run under ``parent_run_id``.

    ``factory(trial, params)`` (passed as the search stage's ``trial_callbacks``) opens the run,
    logs the sampled params and returns the engine callback that streams the trial's metrics;
    the instance itself is an Optuna study callback that closes the run with the trial's state
    and value once the trial is over (complete, pruned or failed).
    """

    def __init__(self, *, parent_run_id: str, experiment_id: str, log_every: int = 20, tags: dict[str, str] | None = None) -> None:
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self.log_every = log_every
        self.tags = tags or {}
        self.runs: dict[int, str] = {}

    def factory(self, trial: Any, params: dict[str, Any]) -> list[Callback]:
        from mlflow import MlflowClient

        client = MlflowClient()
        run = client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial.number}",
            tags={"mlflow.parentRunId": self.parent_run_id, TAG_STAGE: "trial", "optuna.trial": str(trial.number), **process_tags(), **self.tags},
        )
        self.runs[trial.number] = run.info.run_id
        log_params(run.info.run_id, params)
        return [MlflowCallback(run_id=run.info.run_id, log_every=self.log_every)]

    def __call__(self, study: Any, frozen: Any) -> None:
        from mlflow import MlflowClient

        run_id = self.runs.pop(frozen.number, None)
        if run_id is None:
            return
        client = MlflowClient()
        client.set_tag(run_id, "optuna.state", frozen.state.name)
        if frozen.value is not None:
            client.log_metric(run_id, "objective", float(frozen.value))
        client.set_terminated(run_id, status="FAILED" if frozen.state.name == "FAIL" else "FINISHED")
