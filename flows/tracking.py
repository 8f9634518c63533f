"""MLflow helpers: the store, stage runs, batched step metrics, datasets, stale-run cleanup.

Everything is set up by the flow at run time (``configure``), never on import. Runs carry the
tags ``selfattn.host`` and ``selfattn.pid`` so the next start can mark runs whose process died
(SIGKILL, OOM, preemption) as ``KILLED`` instead of leaving them ``RUNNING`` forever.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

from selfattn.errors import UserError
from selfattn.train import Callback
from selfattn.utils import flatten

from flows.paths import mlflow_artifact_root, mlflow_tracking_uri, selfattn_home
from flows.console import STAGE_LOGGER
from flows.reliability import server_unreachable

TAG_PIPELINE_RUN_ID = "selfattn.pipeline_run_id"
TAG_STAGE = "selfattn.stage"
TAG_HOST = "selfattn.host"
TAG_PID = "selfattn.pid"
TAG_GIT = "mlflow.source.git.commit"
TAG_DATA_DIGEST = "selfattn.data_digest"
# The MLflow 3 UI picks its layout from this experiment tag (values in its JS bundle:
# genai_development, custom_model_development, finetuning, ...); without it an experiment
# whose runs have no logged model yet opens in GenAI mode (traces, "Detect issues").
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def configure(home: Path | None = None) -> str:
    """Point MLflow at the configured store; returns the tracking URI."""
    import mlflow

    home = home or selfattn_home()
    uri = mlflow_tracking_uri(home)
    if uri.startswith("sqlite:///"):
        home.mkdir(parents=True, exist_ok=True)
    user_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(user_env["MLFLOW_REGISTRY_URI"] or uri)
    # MLflow 3 also exports what it was given into os.environ; undo that, so "the user set
    # MLFLOW_TRACKING_URI" keeps meaning the user (artifact root, later configure() calls).
    for key, value in user_env.items():
        if value is None:
            os.environ.pop(key, None)
    return uri


def ensure_experiment(name: str, home: Path | None = None) -> str:
    """The id of experiment ``name``, created with artifacts under ``<home>/mlartifacts`` if new."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if TAG_EXPERIMENT_KIND not in exp.tags:  # a kind the user chose in the UI is kept
            client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        root = Path(mlflow_artifact_root(home))
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:  # created concurrently by another pipeline
        return client.get_experiment_by_name(name).experiment_id


def process_tags() -> dict[str, str]:
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_stale_runs(experiment_id: str) -> list[str]:
    """Runs left RUNNING by a dead process on this host -> ``KILLED``; returns their ids.

    Runs of live processes (a concurrent pipeline) and of other hosts are left alone.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    host = socket.gethostname()
    killed = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    for run in runs:
        tags = run.data.tags
        if tags.get(TAG_HOST) != host or not tags.get(TAG_PID, "").isdigit():
            continue
        if int(tags[TAG_PID]) == os.getpid() or _pid_alive(int(tags[TAG_PID])):
            continue
        client.set_tag(run.info.run_id, "selfattn.stale", "process died; marked KILLED on the next start")
        client.set_terminated(run.info.run_id, status="KILLED")
        killed.append(run.info.run_id)
    return killed


@contextlib.contextmanager
def no_retries() -> Iterator[None]:
    """MLflow requests in this block fail at once (no retry, 5 s timeout).

    For the bookkeeping after the server is already known to be gone (tagging and ending the
    runs of a failed pipeline): each such request would otherwise wait out the whole retry
    budget again (about 2 minutes by default), and the next start marks those runs anyway.
    MLflow reads these variables at each request.
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def end_failed_run(exc: BaseException) -> None:
    """Tag and end the active run after ``exc``; without waiting when the server is gone."""
    import mlflow

    unreachable = server_unreachable(exc)
    with no_retries() if unreachable else contextlib.nullcontext():
        try:
            mlflow.set_tag("selfattn.error", f"{type(exc).__name__}: {exc}"[:4000])
        except Exception:
            if not unreachable:
                raise
        try:
            # end_run leaves the active-run stack first, then tells the server: a failed request
            # leaves the run RUNNING on the server, and the next start marks it KILLED
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception:
            if not unreachable:
                raise


def outage_error(exc: BaseException) -> UserError | None:
    """The one-paragraph error for a tracking server that stayed down past the retry budget."""
    if not server_unreachable(exc):
        return None
    import mlflow

    return UserError(
        f"the MLflow tracking server at {mlflow.get_tracking_uri()} did not answer within the client's retry budget "
        f"(MLFLOW_HTTP_REQUEST_MAX_RETRIES={os.environ.get('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '7')}): {_short(exc)}. "
        "Finished stages are kept on disk and their runs in MLflow; the runs of this attempt are marked KILLED on "
        "the next start. Run the same command again once the server answers: it resumes and registers at most one version."
    )


def _short(exc: BaseException) -> str:
    """``API request to <url> failed with exception <urllib3's 400 characters>`` -> the url and the cause."""
    import re

    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if m := re.match(r"API request to (\S+) failed with exception .*?(NewConnectionError|ConnectTimeout|ReadTimeout|ConnectionReset|RemoteDisconnected|Timeout)", text):
        return f"{m.group(1)} failed ({m.group(2)})"
    return text if len(text) <= 300 else text[:300] + "..."


def git_commit(repo: Path | None = None) -> str | None:
    """HEAD commit of the source tree, when it is a git checkout."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def stage_run(
    name: str,
    *,
    parent_run_id: str | None,
    experiment_id: str,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    log_system_metrics: bool | None = None,
) -> Iterator[Any]:
    """A nested MLflow run (``mlflow.start_run``) under ``parent_run_id``; FAILED on an exception.

    Works whether or not the parent is the active run of this thread (Prefect may run a
    task in another thread).
    """
    import mlflow

    active = mlflow.active_run()
    all_tags = {**process_tags(), TAG_STAGE: name, **(tags or {})}
    kwargs: dict[str, Any] = {"run_name": name, "tags": all_tags, "log_system_metrics": log_system_metrics, "experiment_id": experiment_id}
    if active is not None:
        kwargs["nested"] = True  # under the active run (the parent, or the stage run of a trial)
    else:
        kwargs["parent_run_id"] = parent_run_id
    run = mlflow.start_run(**kwargs)
    stages_log = logging.getLogger(STAGE_LOGGER)
    stages_log.info("> %s", name)
    t0 = time.monotonic()
    try:
        if params:
            log_params(run.info.run_id, params)
        yield run
    except BaseException as exc:
        end_failed_run(exc)
        stages_log.info("x %s failed after %.1f s: %s", name, time.monotonic() - t0, type(exc).__name__)
        raise
    else:
        mlflow.end_run()
        stages_log.info("  %s done in %.1f s", name, time.monotonic() - t0)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    """Flattened params in batches of 100 (MLflow's limit), values cut to 6000 chars."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    flat = flatten(params, lists_as_json=True)
    items = [Param(k[:250], str(v)[:6000]) for k, v in flat.items()]
    client = MlflowClient()
    existing = client.get_run(run_id).data.params
    items = [p for p in items if p.key not in existing]  # a resumed run must not re-log different values
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)


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


def log_dataset(
    path: Path, *, name: str, context: str, targets: str | None = None, digest: str | None = None,
    also_run_ids: Sequence[str] = (),
) -> None:
    """``mlflow.log_input`` for a TSV/text file on the active run (digest + source), and on
    ``also_run_ids`` (the parent run, whose page and compare view list the datasets)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    path = Path(path)
    if path.suffix == ".tsv":
        df = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False)
    else:
        df = pd.DataFrame({"text": path.read_text(encoding="utf-8").splitlines()})
        targets = None
    ds = mlflow.data.from_pandas(df, source=str(path), name=name, targets=targets, digest=digest[:36] if digest else None)
    mlflow.log_input(ds, context=context)
    active = mlflow.active_run()
    for run_id in also_run_ids:
        if active is None or run_id != active.info.run_id:
            MlflowClient().log_inputs(
                run_id, [mlflow.entities.DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
            )


def run_url(run_id: str, experiment_id: str) -> str:
    """A link to the run: the MLflow UI for http stores, else the ``selfattn ui`` hint."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return ui_url(uri, f"experiments/{experiment_id}/runs/{run_id}")
    return f"runs:/{run_id} (open with `selfattn ui`, experiment {experiment_id})"


def ui_url(base: str, route: str, **query: str) -> str:
    """A link into the MLflow UI that opens in its "Model training" layout.

    MLflow 3.17's UI picks GenAI or Model training from a global toggle (saved in the browser),
    default GenAI, whatever the experiment's kind tag says; the ``workflowType`` query parameter
    sets that toggle, so links we print open on runs, models and charts, not traces.
    """
    from urllib.parse import urlencode

    params = urlencode({**query, "workflowType": "machine_learning"})
    return f"{base.rstrip('/')}/#/{route.lstrip('/')}?{params}"


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
