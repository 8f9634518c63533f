"""Prefect-side operations a user needs around the pipeline flows.

* Flow-run names: ``<config>-<run>`` for the pipeline, ``<stage>-<run>`` for each stage sub-flow
  (``<run>`` = the first 8 hex digits of the pipeline's flow-run id, the suffix of its MLflow run).
* Crashed runs: each pipeline flow run is tagged with the host, pid and process start time that run
  it. When a pipeline starts, runs of this host left RUNNING/PENDING whose process is gone (a
  SIGKILL, a preempted machine) are set to Crashed, with their stage sub-flows and task runs.
* Workers and late runs: :func:`pool_report` says whether a work pool has a live worker (and how
  to start one); :func:`recent_runs` lists recent flow runs, Late and Crashed ones included.
* ``selfattn ui``: :func:`serve_uis` runs the MLflow UI and a Prefect server on the same home.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil

from selfattn.errors import UserError

PIPELINE_TAG = "selfattn.pipeline"
PROC_TAG = "selfattn.proc:"  # selfattn.proc:<host>:<pid>:<process start time, ms>
ACTIVE_STATES = ["RUNNING", "PENDING"]


# --------------------------------------------------------------------------- flow-run names


def stage_run_name(stage: str) -> str:
    """``flow_run_name`` template of a stage sub-flow (formatted with the sub-flow's parameters)."""
    return stage + "-{ctx.pipeline_run_id:.8}"


def pipeline_run_name() -> str:
    """``flow_run_name`` of the pipeline flow: ``<config name>-<first 8 hex of the flow-run id>``."""
    from prefect.runtime import flow_run

    config = (flow_run.parameters or {}).get("config", "pipeline")
    name = getattr(config, "name", None) or Path(str(config)).stem
    return f"{name}-{str(flow_run.id)[:8]}"


def pipeline_run_id() -> str:
    """The id of the running flow run (the pipeline's), or a fresh one outside a flow run."""
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            return str(flow_run.id)
    except Exception:
        pass
    return uuid.uuid4().hex


def markdown_artifact(markdown: str) -> None:
    """The run's summary as the flow run's Prefect artifact (a nicety: never fails a finished run)."""
    try:
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=markdown, key="selfattn-pipeline-summary", description="selfattn pipeline run")
    except Exception as exc:
        logging.getLogger(__name__).info("could not create the Prefect summary artifact: %s", exc)


# --------------------------------------------------------------------------- crashed runs


def process_tag(pid: int | None = None) -> str:
    proc = psutil.Process(pid or os.getpid())
    return f"{PROC_TAG}{socket.gethostname()}:{proc.pid}:{int(proc.create_time() * 1000)}"


def _process_gone(tag: str) -> bool | None:
    """True if the process named by a :func:`process_tag` is gone; None if it ran on another host."""
    host, pid, started_ms = tag[len(PROC_TAG) :].rsplit(":", 2)
    if host != socket.gethostname():
        return None
    try:
        return int(psutil.Process(int(pid)).create_time() * 1000) != int(started_ms)  # a recycled pid
    except psutil.NoSuchProcess:
        return True


def claim_and_reap(client, flow_run_id: UUID | str) -> list[str]:
    """Tag flow run ``flow_run_id`` with this process, then crash runs whose process died.

    Returns the names of the flow runs set to Crashed.
    """
    run = client.read_flow_run(flow_run_id)
    tags = [t for t in run.tags if not t.startswith(PROC_TAG)]
    client.update_flow_run(run.id, tags=sorted({*tags, PIPELINE_TAG, process_tag()}))
    return reap_crashed(client, exclude={run.id})


def reap_crashed(client, exclude: set[UUID] = frozenset()) -> list[str]:
    """Set this host's pipeline runs left RUNNING/PENDING by a dead process (and their children) to Crashed."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )  # fmt: skip
    from prefect.states import Crashed

    active = FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES))
    dead = []
    for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[PIPELINE_TAG]), state=active)):
        procs = [t for t in run.tags if t.startswith(PROC_TAG)]
        if run.id not in exclude and procs and _process_gone(procs[0]):
            dead.append(run)
    if not dead:
        return []
    runs = list(dead)
    runs += client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[r.id for r in dead]), state=active)
    )
    message = "the process running this flow exited without reporting (killed?); found by the next pipeline start"
    tasks = client.read_task_runs(
        task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[r.id for r in runs]),
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=ACTIVE_STATES)),
        )
    )
    for task_run in tasks:
        client.set_task_run_state(task_run.id, Crashed(message=message), force=True)
    for run in reversed(runs):  # children first, so a parent never looks finished before them
        client.set_flow_run_state(run.id, Crashed(message=message), force=True)
    return [r.name for r in runs]


def on_pipeline_start() -> list[str]:
    """Inside the pipeline flow: claim this flow run, crash the dead ones; never fails the run."""
    from prefect import get_client
    from prefect.runtime import flow_run

    if not flow_run.id:
        return []
    try:
        with get_client(sync_client=True) as client:
            return claim_and_reap(client, flow_run.id)
    except Exception as exc:  # bookkeeping of other runs must not stop this one
        import logging

        logging.getLogger(__name__).warning("could not check for crashed flow runs: %s", exc)
        return []


# --------------------------------------------------------------------------- workers and late runs


@dataclass
class PoolReport:
    pool: str
    exists: bool
    online_workers: int
    message: str


def worker_command(pool: str) -> str:
    return f"prefect worker start --pool {pool} --type process   (or: infra/local.sh up, which starts one)"


def pool_report(client, pool: str) -> PoolReport:
    """Whether ``pool`` exists and has a worker heartbeating (``ONLINE``), with what to do if not."""
    from prefect.exceptions import ObjectNotFound

    try:
        client.read_work_pool(pool)
    except ObjectNotFound:
        msg = f"work pool {pool!r} does not exist: create it with `prefect work-pool create {pool} --type process`, then start a worker: {worker_command(pool)}"
        return PoolReport(pool, False, 0, msg)
    workers = client.read_workers_for_work_pool(pool)
    online = sum(1 for w in workers if str(getattr(w.status, "value", w.status)).upper() == "ONLINE")
    if online:
        return PoolReport(pool, True, online, f"work pool {pool!r}: {online} worker(s) online")
    msg = (
        f"work pool {pool!r} has no worker online ({len(workers)} known, none heartbeating): scheduled runs will "
        f"wait and turn Late. Start one with: {worker_command(pool)}"
    )
    return PoolReport(pool, True, 0, msg)


def state_names() -> list[str]:
    """The flow-run state names Prefect gives (``Late``, ``Crashed``, ``AwaitingRetry``, ...), from its state constructors."""
    import inspect

    import prefect.states
    from prefect.client.schemas.objects import State

    names = set()
    for attr, make in vars(prefect.states).items():
        if attr[:1].isupper() and inspect.isfunction(make):
            try:
                state = make()
            except TypeError:  # a constructor that needs arguments is not a plain state
                continue
            if isinstance(state, State):
                names.add(state.name)
    return sorted(names)


def check_states(states: list[str]) -> list[str]:
    """``--state`` values -> Prefect's spelling (case-insensitive), or a UserError listing the names."""
    known = {name.lower(): name for name in state_names()}
    unknown = [s for s in states if s.lower() not in known]
    if unknown:
        raise UserError(f"unknown flow-run state {', '.join(map(repr, unknown))}; Prefect's states: {', '.join(sorted(known.values()))}")
    return [known[s.lower()] for s in states]


def recent_runs(client, limit: int = 20, states: list[str] | None = None) -> list[dict[str, Any]]:
    """The latest flow runs (newest first): name, state, expected start, deployment id."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    flt = FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=states))) if states else None
    runs = client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=limit)
    return [
        {
            "id": str(r.id),
            "name": r.name,
            "state": r.state.name if r.state else "?",
            "expected_start": r.expected_start_time.isoformat(timespec="seconds") if r.expected_start_time else "",
            "deployment_id": str(r.deployment_id) if r.deployment_id else "",
            "work_pool": r.work_pool_name or "",
        }
        for r in runs
    ]


# the flow runs of the embedded API's SQLite database, newest first (Prefect's own ordering:
# expected start time, descending); the work pool through the run's work queue
_RECENT_SQL = """
SELECT fr.id, fr.name, fr.state_name, fr.expected_start_time, fr.deployment_id, wp.name
FROM flow_run AS fr
LEFT JOIN work_queue AS wq ON wq.id = fr.work_queue_id
LEFT JOIN work_pool AS wp ON wp.id = wq.work_pool_id
{where}
ORDER BY fr.expected_start_time DESC
LIMIT ?
"""


def recent_runs_from_database(database: Path, limit: int = 20, states: list[str] | None = None) -> list[dict[str, Any]]:
    """:func:`recent_runs` read straight from the embedded API's SQLite file, read-only.

    ``selfattn status`` on an embedded home would otherwise start Prefect's API (a subprocess
    server: ~10 s on two cores) to read a table. The rows are the ones the API returns (a test
    compares both on one database); a schema this query does not know raises ``sqlite3.Error``
    and the caller asks the API instead.
    """
    import datetime as dt
    import sqlite3

    where, args = "", []
    if states:
        where = f"WHERE fr.state_name IN ({', '.join('?' * len(states))})"
        args = list(states)
    with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=10)) as con:
        rows = con.execute(_RECENT_SQL.format(where=where), [*args, limit]).fetchall()

    def start(value: str | None) -> str:
        if not value:
            return ""
        when = dt.datetime.fromisoformat(value)
        return (when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)).isoformat(timespec="seconds")

    return [
        {
            "id": str(uuid.UUID(run_id)),
            "name": name,
            "state": state or "?",
            "expected_start": start(expected),
            "deployment_id": str(uuid.UUID(deployment)) if deployment else "",
            "work_pool": pool or "",
        }
        for run_id, name, state, expected, deployment, pool in rows
    ]


# --------------------------------------------------------------------------- selfattn ui


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM ``proc``'s whole tree, SIGKILL what is left after ``grace_s``."""
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def prefect_server_env(embedded: dict[str, str], host: str, port: int) -> dict[str, str]:
    """Environment of a ``prefect server start`` on the embedded runs' database.

    ``embedded`` is what the CLI sets for the embedded mode (``PREFECT_HOME``, database URL).
    """
    drop = ("PREFECT_API_URL", "PREFECT_SERVER_EPHEMERAL_ENABLED")
    env = {k: v for k, v in {**os.environ, **embedded}.items() if k not in drop}
    env["PREFECT_SERVER_UI_ENABLED"] = "true"
    # the browser calls this URL; without it the UI says "Can't connect to Server API"
    env["PREFECT_UI_API_URL"] = f"http://{host}:{port}/api"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    return env


def serve_uis(mlflow_cmd: list[str], mlflow_url: str, prefect_env_: dict[str, str] | None, host: str, prefect_port: int,
              timeout_s: float = 180.0, log_dir: Path | None = None) -> int:  # fmt: skip
    """Start the MLflow UI and (unless ``prefect_env_`` is None) a Prefect server; block until Ctrl-C.

    Both run as child processes; Ctrl-C (or SIGTERM) stops both process trees. With ``log_dir``
    their output (Prefect's banner and advice, the servers' request lines) goes to
    ``<log_dir>/<name>.log`` and the console shows only the addresses, or a log's tail when a
    server does not start.
    """
    import signal

    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        if log_dir is None:
            return subprocess.Popen(cmd, env=env)
        log_dir.mkdir(parents=True, exist_ok=True)
        logs[name] = log_dir / f"{name}-ui.log"
        with open(logs[name], "ab") as out:
            return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    procs: dict[str, subprocess.Popen] = {"mlflow": start("mlflow", mlflow_cmd)}
    checks = {"mlflow": (f"{mlflow_url}/health", mlflow_url)}
    if prefect_env_ is not None:
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(prefect_port)]
        procs["prefect"] = start("prefect", cmd, prefect_env_)
        base = f"http://{host}:{prefect_port}"
        checks["prefect"] = (f"{base}/api/health", base)
    def interrupt(*_):
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM both stop the two trees (a shell may start us with SIGINT ignored)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        deadline = time.monotonic() + timeout_s
        pending = dict(checks)
        while pending and time.monotonic() < deadline:
            for name, (health, _) in list(pending.items()):
                if procs[name].poll() is not None:
                    print(f"{name} exited during start-up (rc {procs[name].returncode})", file=sys.stderr, flush=True)
                    if name in logs:
                        tail = logs[name].read_text(encoding="utf-8", errors="replace").splitlines()[-20:]
                        print("\n".join([f"the end of {logs[name]}:", *tail]), file=sys.stderr, flush=True)
                    return 1
                if _answers(health):
                    pending.pop(name)
            time.sleep(0.5)
        if pending:
            print(f"not ready after {timeout_s:.0f}s: {', '.join(pending)}", file=sys.stderr, flush=True)
            return 1
        for name, (_, url) in checks.items():
            print(f"{name} UI: {url}", flush=True)
        print("Ctrl-C stops both." + (f" Their logs: {', '.join(map(str, logs.values()))}" if logs else ""), flush=True)
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        return next(p.returncode for p in procs.values() if p.poll() is not None) or 0
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in procs.values():
            _stop(proc)
