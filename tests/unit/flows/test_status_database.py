"""``selfattn status`` on an embedded home reads Prefect's SQLite file directly (no API server to
start): the rows must be the ones Prefect's API returns for the same database, state filter and
limit included, and the command must not import Prefect to list them.

One real embedded Prefect API (a subprocess server, as ``selfattn run`` starts it) records: a
completed and a failed flow run, and a run of a deployment on a work pool scheduled in the past
(so the work-pool join and the deployment id are exercised).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.prefect_ops import recent_runs_from_database

REPO = Path(__file__).resolve().parents[3]

RECORD = r"""
import datetime as dt, json, os, sys
from pathlib import Path
from flows.cli import prefect_env
home = Path(sys.argv[1]); (home / "prefect").mkdir(parents=True, exist_ok=True)
os.environ.update(prefect_env(home))
from prefect import flow, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.states import Scheduled
from flows.prefect_ops import recent_runs

@flow(name="probe")
def probe(fail: bool = False):
    if fail:
        raise ValueError("a failed run")

probe()
try:
    probe(fail=True)
except ValueError:
    pass
with get_client(sync_client=True) as client:
    client.create_work_pool(WorkPoolCreate(name="pool-a", type="process"))
    flow_id = client.create_flow_from_name("probe")
    deployment_id = client.create_deployment(flow_id=flow_id, name="nightly", work_pool_name="pool-a")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)
    client.create_flow_run_from_deployment(deployment_id, state=Scheduled(scheduled_time=past), name="scheduled-by-design")
    answers = {
        "all": recent_runs(client, limit=20),
        "two": recent_runs(client, limit=2),
        "failed": recent_runs(client, limit=20, states=["Failed"]),
        "scheduled_or_completed": recent_runs(client, limit=20, states=["Scheduled", "Completed"]),
    }
print("ANSWERS " + json.dumps(answers))
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    return {**env, "SELFATTN_HOME": str(home), "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    home = tmp_path_factory.mktemp("status") / "home"
    done = subprocess.run([sys.executable, "-c", RECORD, str(home)], capture_output=True, text=True, env=_env(home), timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ANSWERS "))
    return home, json.loads(line.removeprefix("ANSWERS "))


def test_the_database_gives_the_rows_the_api_gives(recorded):
    home, api = recorded
    database = home / "prefect" / "prefect.db"
    assert len(api["all"]) == 3 and {r["state"] for r in api["all"]} == {"Completed", "Failed", "Scheduled"}
    scheduled = next(r for r in api["all"] if r["name"] == "scheduled-by-design")
    assert scheduled["work_pool"] == "pool-a" and scheduled["deployment_id"]
    assert recent_runs_from_database(database, limit=20) == api["all"]
    assert recent_runs_from_database(database, limit=2) == api["two"]
    assert recent_runs_from_database(database, limit=20, states=["Failed"]) == api["failed"]
    assert recent_runs_from_database(database, limit=20, states=["Scheduled", "Completed"]) == api["scheduled_or_completed"]


def test_status_lists_them_without_importing_prefect(recorded):
    home, api = recorded
    code = "import sys; from selfattn.cli import main; rc = main(['status']); print('exit', rc, 'prefect' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(home), timeout=120)
    assert done.stdout.rstrip().endswith("exit 0 False"), done.stdout + done.stderr
    for run in api["all"]:
        assert run["name"] in done.stdout and run["expected_start"] in done.stdout
    assert "pool-a" in done.stdout


def test_a_schema_it_does_not_know_is_an_error_not_an_empty_list(tmp_path):
    import sqlite3

    database = tmp_path / "prefect.db"
    with sqlite3.connect(database) as con:
        con.execute("CREATE TABLE flow_run (id TEXT, name TEXT)")
    with pytest.raises(sqlite3.OperationalError):
        recent_runs_from_database(database)
