"""MLflow runs: the store, the pipeline's run and its stage runs, and :func:`log_stage`, the one
place a stage's declarations (``flows.stages.base.Logged``) are recorded.

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
from typing import Any, Iterator

import yaml
from pydantic import BaseModel, ConfigDict

from flows.config import PipelineConfig
from flows.console import STAGE_LOGGER
from flows.paths import mlflow_artifact_root, mlflow_tracking_uri, selfattn_home
from flows.reliability import pid_alive, server_unreachable
from flows.stages.base import Dataset, Logged, StageOutput, code_version
from selfattn.errors import DiskFull, UserError, is_disk_full
from selfattn.utils import flatten

TAG_PIPELINE_RUN_ID = "selfattn.pipeline_run_id"
TAG_STAGE = "selfattn.stage"
TAG_HOST = "selfattn.host"
TAG_PID = "selfattn.pid"
TAG_GIT = "mlflow.source.git.commit"
# The experiment's kind as MLflow 3 names it (values in its JS bundle: genai_development,
# custom_model_development, finetuning, ...): it marks our training experiments (`training_links`).
# MLflow 3.17's UI does not read it for its layout: a sidebar switch kept in the browser
# (`localStorage` `mlflow.workflowType_v1`, default GenAI) decides; the server app of
# flows/mlflow_app.py (`selfattn ui`, infra/) makes "Model training" a fresh browser's default.
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


def is_tracking_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (it chooses where artifacts go) rather than a store this
    process writes itself (``sqlite:``, ``file:``, a database URL: artifacts under the home)."""
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks", "databricks-uc")


def run_is_in(run_id: str, experiment: str) -> bool:
    """Whether MLflow run ``run_id`` exists, is not deleted, and belongs to experiment ``experiment``."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(run_id)
    return run.info.lifecycle_stage == "active" and client.get_experiment(run.info.experiment_id).name == experiment


def ensure_experiment(name: str, home: Path | None = None) -> str:
    """The id of experiment ``name``, created if new; with a local store (SQLite, a file store, a
    database URL) its artifacts go under ``<home>/mlartifacts``, never the working directory's ``./mlruns``."""
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
    if not is_tracking_server(mlflow_tracking_uri(home)):  # a server decides; a local store would use ./mlruns
        root = Path(mlflow_artifact_root(home))
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=location, tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
    except mlflow.exceptions.MlflowException:  # created concurrently by another pipeline
        return client.get_experiment_by_name(name).experiment_id


def process_tags() -> dict[str, str]:
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}


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
        if int(tags[TAG_PID]) == os.getpid() or pid_alive(int(tags[TAG_PID])):
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
        except Exception as again:
            if not (unreachable or is_disk_full(again)):
                raise
        try:
            # end_run leaves the active-run stack first, then tells the server: a failed request
            # leaves the run RUNNING on the server, and the next start marks it KILLED
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception as again:
            if not (unreachable or is_disk_full(again)):
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


class RunContext(BaseModel):
    """Where a stage logs: the pipeline's MLflow run (the parent of every stage run) and ids."""

    model_config = ConfigDict(extra="forbid")

    home: str
    experiment_id: str
    parent_run_id: str
    pipeline_run_id: str


@contextlib.contextmanager
def pipeline_run(cfg: PipelineConfig, *, kind: str, pipeline_run_id: str, home: Path) -> Iterator[RunContext]:
    """The MLflow run of a pipeline (``kind="pipeline"``) or tune run: stale runs marked KILLED
    first, the resolved config logged, FAILED (or one outage paragraph) on an exception."""
    import mlflow

    home.mkdir(parents=True, exist_ok=True)
    configure(home)
    experiment_id = ensure_experiment(cfg.tracking.experiment, home)
    if stale := mark_stale_runs(experiment_id):
        logging.getLogger(__name__).info("marked %d stale MLflow run(s) KILLED: %s", len(stale), ", ".join(stale))
    tags = {**process_tags(), TAG_PIPELINE_RUN_ID: pipeline_run_id, "selfattn.config": cfg.name, "selfattn.code_version": code_version()}
    if kind != "pipeline":
        tags[TAG_STAGE] = kind
    if commit := git_commit():
        tags[TAG_GIT] = commit
    name = f"{cfg.name}-{pipeline_run_id[:8]}" if kind == "pipeline" else f"tune-{cfg.search.study_name}"
    parent = mlflow.start_run(experiment_id=experiment_id, run_name=name, tags=tags, log_system_metrics=cfg.tracking.system_metrics)
    try:
        log_params(parent.info.run_id, cfg.model_dump(mode="json"))
        mlflow.log_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config/resolved.yaml")
        yield RunContext(home=str(home), experiment_id=experiment_id, parent_run_id=parent.info.run_id, pipeline_run_id=pipeline_run_id)
    except BaseException as exc:
        end_failed_run(exc)
        if (clear := outage_error(exc)) is not None:
            raise clear from None  # one paragraph, not the client's retry traceback
        if is_disk_full(exc) and not isinstance(exc, DiskFull):  # e.g. SQLite: "database or disk is full"
            raise DiskFull(home, what="the tracking store or a stage's files") from None
        raise
    else:
        mlflow.end_run()


@contextlib.contextmanager
def stage_run(name: str, ctx: RunContext, *, log_system_metrics: bool | None = None) -> Iterator[str]:
    """A nested MLflow run under the pipeline's run; yields its id; FAILED on an exception.

    Works whether or not the parent is the active run of this thread (Prefect may run a
    task in another thread).
    """
    import mlflow

    all_tags = {**process_tags(), TAG_STAGE: name, TAG_PIPELINE_RUN_ID: ctx.pipeline_run_id}
    kwargs: dict[str, Any] = {"run_name": name, "tags": all_tags, "log_system_metrics": log_system_metrics, "experiment_id": ctx.experiment_id}
    if mlflow.active_run() is not None:
        kwargs["nested"] = True  # under the active run (the parent, or the stage run of a trial)
    else:
        kwargs["parent_run_id"] = ctx.parent_run_id
    run = mlflow.start_run(**kwargs)
    stages_log = logging.getLogger(STAGE_LOGGER)
    stages_log.info("> %s", name)
    t0 = time.monotonic()
    try:
        yield run.info.run_id
    except BaseException as exc:
        end_failed_run(exc)
        stages_log.info("x %s failed after %.1f s: %s", name, time.monotonic() - t0, type(exc).__name__)
        raise
    else:
        mlflow.end_run()
        stages_log.info("  %s done in %.1f s", name, time.monotonic() - t0)


# --------------------------------------------------------------------------- recording what a stage declares


def log_stage(run_id: str, out: StageOutput, ctx: RunContext) -> None:
    """Record ``out.log`` on the stage's run (with the stage's key, cache state and directory as
    tags) and ``out.log.pipeline`` on the pipeline's run; datasets are listed on both."""
    stage_tags = {"selfattn.stage_key": out.key, "selfattn.cached": str(out.cached).lower(), "selfattn.stage_dir": out.dir}
    log(run_id, out.log, extra_tags={TAG_PIPELINE_RUN_ID: ctx.pipeline_run_id, **stage_tags})
    _log_datasets(ctx.parent_run_id, out.log.datasets)
    if out.log.pipeline is not None:
        log(ctx.parent_run_id, out.log.pipeline)


def log(run_id: str, logged: Logged, *, extra_tags: dict[str, str] | None = None) -> None:
    """Record ``logged`` on run ``run_id``: params, then tags and metrics in one request, then files."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    client = MlflowClient()
    if logged.params:
        log_params(run_id, logged.params)
    now = int(time.time() * 1000)
    tags = [RunTag(k, v) for k, v in {**(extra_tags or {}), **logged.tags}.items()]
    metrics = [Metric(k, float(v), now, 0) for k, v in logged.metrics.items()]
    if tags or metrics:
        client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)  # one request
    with artifacts_disk_full(run_id, need_bytes=sum(_bytes_under(Path(a.path)) for a in logged.artifacts)):
        for name, value in logged.dicts.items():
            client.log_dict(run_id, value, name)
        for name, text in logged.texts.items():
            client.log_text(run_id, text, name)
        for a in logged.artifacts:
            if Path(a.path).is_dir():
                client.log_artifacts(run_id, a.path, a.to or None)
            else:
                client.log_artifact(run_id, a.path, a.to or None)
        for t in logged.tables:
            import pandas as pd

            client.log_table(run_id, pd.read_csv(t.path, sep="\t", keep_default_na=False), t.artifact_file)
    _log_datasets(run_id, logged.datasets)


@contextlib.contextmanager
def artifacts_disk_full(run_id: str, *, need_bytes: int | None = None) -> Iterator[None]:
    """A full disk while files are copied to run ``run_id``'s artifacts (a local store under the
    home) -> :class:`~selfattn.errors.DiskFull` naming the run's artifact directory."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFull(_artifact_dir(run_id), need_bytes=need_bytes or None, what="the run's artifacts") from exc


def _artifact_dir(run_id: str) -> Path:
    from urllib.parse import unquote, urlparse

    from mlflow import MlflowClient

    try:
        uri = MlflowClient().get_run(run_id).info.artifact_uri
    except Exception:  # noqa: BLE001 - only for the message (the store may be on the full disk too)
        return Path(mlflow_artifact_root())
    return Path(unquote(urlparse(uri).path)) if uri.startswith("file:") else Path(uri)


def _bytes_under(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if p.is_dir() else 0


def _log_datasets(run_id: str, datasets: list[Dataset]) -> None:
    """Each file as a run input (digest + source); one the client cannot read is the data gate's to report."""
    for d in datasets:
        try:
            log_dataset(d, run_id)
        except Exception as exc:  # an unreadable file is the data gate's to report, not a crash here
            logging.getLogger(__name__).info("could not log dataset %s: %s", d.name, exc)


def log_dataset(d: Dataset, run_id: str) -> None:
    """``d`` as an input of run ``run_id``: a TSV with its target column, a text file one line per row."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    path = Path(d.path)
    if path.suffix == ".tsv":
        df, targets = pd.read_csv(path, sep="\t", quoting=3, keep_default_na=False), d.targets
    else:
        df, targets = pd.DataFrame({"text": path.read_text(encoding="utf-8").splitlines()}), None
    ds = mlflow.data.from_pandas(df, source=str(path), name=d.name, targets=targets, digest=d.digest[:36] if d.digest else None)
    MlflowClient().log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, d.context)])])


def download(uri: str) -> Path:
    """A ``models:/`` or ``runs:/`` URI (or any artifact URI) downloaded from the configured store."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))


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


def run_url(run_id: str, experiment_id: str) -> str:
    """A link to the run: the MLflow UI for http stores, else the ``selfattn ui`` hint."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        return ui_url(uri, f"experiments/{experiment_id}/runs/{run_id}")
    return f"runs:/{run_id} (open with `selfattn ui`, experiment {experiment_id})"


def training_links(base: str) -> list[tuple[str, str]]:
    """``(experiment name, link to its training runs)`` for every training experiment of the configured store.

    MLflow 3.17's UI does not read the experiment's ``mlflow.experimentKind`` tag: its sidebar
    switch (GenAI / Model training, kept in the browser's ``localStorage`` as
    ``mlflow.workflowType_v1``) decides. On the server ``selfattn ui`` runs (the ``selfattn`` app,
    flows/mlflow_app.py) a browser with no choice yet starts on Model training, so the home page's
    links open the runs too; these links open them also where the switch says GenAI.
    """
    from mlflow import MlflowClient

    experiments = MlflowClient().search_experiments(filter_string=f"tags.`{TAG_EXPERIMENT_KIND}` = '{EXPERIMENT_KIND}'")
    return [(e.name, ui_url(base, f"experiments/{e.experiment_id}/runs")) for e in experiments]


def ui_url(base: str, route: str, **query: str) -> str:
    """A link into the MLflow UI that opens in its "Model training" layout.

    MLflow 3.17's UI picks GenAI or Model training from a sidebar switch kept in the browser
    (``localStorage`` ``mlflow.workflowType_v1``; MLflow's default GenAI, Model training on the
    ``selfattn`` server app of flows/mlflow_app.py), whatever the experiment's kind tag says. The
    ``workflowType`` query parameter overrides the switch for the page it opens, so the links we
    print open on runs, models and charts, not traces, in a browser whose switch says GenAI and on
    a server started without the ``selfattn`` app.
    """
    from urllib.parse import urlencode

    params = urlencode({**query, "workflowType": "machine_learning"})
    return f"{base.rstrip('/')}/#/{route.lstrip('/')}?{params}"


