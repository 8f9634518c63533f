"""A user's day in the Prefect UI, on the embedded store, in headless Chromium.

One home, in order:

    selfattn run --config smoke     SIGKILLed (whole process group) during pretraining
    selfattn run --config smoke     the resume: finishes, and marks the killed runs Crashed
    selfattn ui                     MLflow UI + `prefect server start` on that home's databases

then, against that Prefect server (its REST API and its UI in headless Chromium): run names,
crashed runs, a run's page with its stage sub-flows and their tasks, the UI connected to its API,
`selfattn deploy --pool` warning that no worker serves the pool, the cron schedules of
`infra/prefect.yaml` on their deployment pages, a Late run listed by `selfattn status`, and
Ctrl-C stopping both servers.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import re
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import psutil
import pytest

from .conftest import REPO, chromium, http_json, real_data_dir, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = ("validate", "pretrain", "search", "finetune", "evaluate", "register")
POOL = "selfattn-process"


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SELFATTN_", "OPTUNA_"))}
    return {**env, "SELFATTN_HOME": str(home), "SELFATTN_DATA_DIR": real_data_dir(), "PYTHONUNBUFFERED": "1"}


def _selfattn(*args: str) -> list[str]:
    return [sys.executable, "-m", "selfattn.cli", *args]


def _runs_in_db(home: Path, table: str = "flow_run") -> list[tuple[str, str]]:
    """(name, state type) of every flow or task run in the embedded Prefect database."""
    db = home / "prefect" / "prefect.db"
    if not db.is_file():
        return []
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(f"select name, state_type from {table}").fetchall()
    except sqlite3.OperationalError:  # not migrated yet, or locked for a moment
        return []


def _pretraining(home: Path) -> bool:
    """The pretrain sub-flow and its task are RUNNING in Prefect's records."""
    flows = {s for n, s in _runs_in_db(home) if n.startswith("pretrain-")}
    tasks = {s for n, s in _runs_in_db(home, "task_run") if n.startswith("pretrain-")}
    return "RUNNING" in flows and "RUNNING" in tasks


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browse(url: str, screenshot: Path | None = None, budget_ms: int = 20000) -> str:
    """The text Chromium renders for ``url`` (the UIs are single-page apps: run their JS first)."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1500,1100", f"--virtual-time-budget={budget_ms}"]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=240).stdout
    if screenshot is not None:
        subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=240)
    text = re.sub(r"<script.*?</script>|<style.*?</style>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", text)))


def browse_for(url: str, needle: str, screenshot: Path | None = None, tries: int = 3) -> str:
    """``browse`` until ``needle`` is rendered: list rows arrive after the page's own frame, later on
    a loaded machine (CI once dumped "10 runs" with no row yet). Each try doubles the time budget;
    the last text is returned either way, for the caller's assertion."""
    budget = 20000
    for _ in range(tries):
        text = browse(url, screenshot=screenshot, budget_ms=budget)
        if needle in text:
            break
        budget *= 2
    return text


@pytest.fixture(scope="module")
def day(tmp_path_factory, output_dir):
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    base = tmp_path_factory.mktemp("prefect_day")
    home, logs = base / "home", base / "logs"
    logs.mkdir()
    env = _env(home)

    # 1. a pipeline killed with SIGKILL while pretraining (its Prefect runs stay RUNNING)
    with open(logs / "killed.out", "wb") as out:
        killed = subprocess.Popen(_selfattn("run", "--config", "smoke"), env=env, cwd=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(
            lambda: killed.poll() is not None or _pretraining(home),
            timeout=600, what="the pretrain sub-flow and task to be RUNNING", interval=0.1,
        )  # fmt: skip
        assert killed.poll() is None, (logs / "killed.out").read_text()[-3000:]
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait(timeout=60)
    left_running = sorted(n for table in ("flow_run", "task_run") for n, s in _runs_in_db(home, table) if s == "RUNNING")

    # 2. the same command again: resumes, finishes
    resumed = subprocess.run(_selfattn("run", "--config", "smoke"), env=env, cwd=base, capture_output=True, text=True, timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    # 3. selfattn ui on the same home
    mlflow_port, prefect_port = _free_port(), _free_port()
    ui_log = logs / "ui.out"
    with open(ui_log, "wb") as out:
        ui = subprocess.Popen(
            _selfattn("ui", "--port", str(mlflow_port), "--prefect-port", str(prefect_port)),
            env=env, cwd=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: ui.poll() is not None or "Ctrl-C stops both" in ui_log.read_text(), 400, "selfattn ui to be ready")
        assert ui.poll() is None, ui_log.read_text()[-3000:]
        api = f"http://127.0.0.1:{prefect_port}/api"
        yield {
            "home": home, "env": env, "base": base, "ui": ui, "ui_log": ui_log, "left_running": left_running,
            "api": api, "prefect_url": f"http://127.0.0.1:{prefect_port}", "mlflow_url": f"http://127.0.0.1:{mlflow_port}",
            "ports": (mlflow_port, prefect_port), "shots": output_dir, "client_env": {**env, "PREFECT_API_URL": api},
        }  # fmt: skip
    finally:
        if ui.poll() is None:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait(timeout=60)


def _flow_runs(day) -> list[dict]:
    return http_json("POST", f"{day['api']}/flow_runs/filter", {"limit": 200})


def _pipeline_runs(day) -> list[dict]:
    flows = {f["id"]: f["name"] for f in http_json("POST", f"{day['api']}/flows/filter", {})}
    return sorted((r for r in _flow_runs(day) if flows[r["flow_id"]] == "selfattn-pipeline"), key=lambda r: r["created"])


def _children(day, parent_id: str) -> list[dict]:
    body = {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}}
    return http_json("POST", f"{day['api']}/flow_runs/filter", body)


def test_flow_runs_are_named_after_stage_and_pipeline_run(day):
    killed, resumed = _pipeline_runs(day)
    for run in (killed, resumed):
        short = run["id"][:8]
        assert run["name"] == f"smoke-{short}", run["name"]
        names = {c["name"] for c in _children(day, run["id"])}
        assert names <= {f"{s}-{short}" for s in STAGES}, names
    assert {c["name"] for c in _children(day, resumed["id"])} == {f"{s}-{resumed['id'][:8]}" for s in STAGES}


def test_runs_of_the_killed_pipeline_are_marked_crashed(day):
    killed, resumed = _pipeline_runs(day)
    short = killed["id"][:8]
    # the kill left them RUNNING (read from the database right after the SIGKILL) ...
    assert {f"smoke-{short}", f"pretrain-{short}"} <= set(day["left_running"]), day["left_running"]
    # ... and the next start set them Crashed, with the task that was running
    states = {c["name"]: c["state_type"] for c in _children(day, killed["id"])}
    assert killed["state_type"] == "CRASHED" and states[f"pretrain-{short}"] == "CRASHED", (killed["state_type"], states)
    assert states[f"validate-{short}"] == "COMPLETED", states
    # task runs too (the main flow's task run that stands for the pretrain sub-flow, at least)
    run_ids = [killed["id"], *(c["id"] for c in _children(day, killed["id"]))]
    tasks = http_json("POST", f"{day['api']}/task_runs/filter", {"flow_runs": {"id": {"any_": run_ids}}})
    assert not [t["name"] for t in tasks if t["state_type"] == "RUNNING"], tasks
    crashed_tasks = {t["name"] for t in tasks if t["state_type"] == "CRASHED"}
    assert crashed_tasks and crashed_tasks <= set(day["left_running"]), ([(t["name"], t["state_type"]) for t in tasks], day["left_running"])
    assert resumed["state_type"] == "COMPLETED"
    assert not [r["name"] for r in _flow_runs(day) if r["state_type"] in ("RUNNING", "PENDING")]


def test_run_page_shows_stage_subflows_and_their_tasks(day):
    _, resumed = _pipeline_runs(day)
    short = resumed["id"][:8]
    url = f"{day['prefect_url']}/v2/runs/flow-run/{resumed['id']}?tab=SubflowRuns"
    text = browse_for(url, f"register / register-{short}", screenshot=day["shots"] / "prefect_run_subflows.png")
    assert f"smoke-{short}" in text and "Completed" in text, text[:2000]
    for stage in STAGES:
        assert f"{stage} / {stage}-{short}" in text, text[:3000]  # "<flow> / <flow run>" rows
    register = next(c for c in _children(day, resumed["id"]) if c["name"] == f"register-{short}")
    text = browse_for(f"{day['prefect_url']}/v2/runs/flow-run/{register['id']}?tab=TaskRuns", "champion-gate-")
    for task in ("log-model", "register", "champion-gate"):
        assert re.search(rf"\b{task}-\w+", text), (task, text[:3000])


def test_ui_serves_both_and_prefect_ui_reaches_its_api(day):
    import urllib.request

    for url in (day["mlflow_url"], day["prefect_url"]):
        with urllib.request.urlopen(url, timeout=30) as resp:
            assert resp.status == 200, url
    log = day["ui_log"].read_text()
    assert f"mlflow UI: {day['mlflow_url']}" in log and f"prefect UI: {day['prefect_url']}" in log, log[-2000:]
    _, resumed = _pipeline_runs(day)
    text = browse_for(f"{day['prefect_url']}/runs", resumed["name"], screenshot=day["shots"] / "prefect_runs.png")
    assert "Can't connect to Server API" not in text, text[:2000]
    assert resumed["name"] in text, text[:3000]


def test_deploy_warns_without_worker_and_schedules_show(day):
    env = day["client_env"]
    cmd = _selfattn("deploy", "--pool", POOL, "--config", "smoke", "--name", "nightly-cli", "--cron", "0 3 * * *")
    first = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    # no pool yet: refused (one paragraph, no traceback), saying how to create it and start a worker
    assert first.returncode != 0 and "Traceback" not in first.stderr, first.stdout + first.stderr
    assert f"work pool {POOL!r} does not exist" in first.stderr and "prefect worker start --pool" in first.stderr, first.stderr
    made = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"], env=env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    second = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "has no worker online" in second.stdout and f"prefect worker start --pool {POOL}" in second.stdout, second.stdout

    shipped = _ship(env)
    assert shipped.returncode == 0, shipped.stdout[-3000:] + shipped.stderr[-3000:]
    deployments = {d["name"]: d for d in http_json("POST", f"{day['api']}/deployments/filter", {})}
    assert {"nightly-cli", "nightly", "weekly-search", "smoke"} <= set(deployments), sorted(deployments)
    for name, cron in (("nightly-cli", "0 3 * * *"), ("nightly", "0 3 * * *"), ("weekly-search", "0 4 * * 0")):
        assert [s["schedule"].get("cron") for s in deployments[name]["schedules"]] == [cron], deployments[name]["schedules"]
    shot = day["shots"] / "prefect_deployment_nightly.png"
    text = browse(f"{day['prefect_url']}/v2/deployments/deployment/{deployments['nightly']['id']}", screenshot=shot)
    assert "nightly" in text and ("At 03:00 AM" in text or "0 3 * * *" in text), text[:3000]


def _ship(env: dict[str, str]) -> subprocess.CompletedProcess:
    """``prefect deploy --all`` of infra/prefect.yaml (its deployments use the pool ``POOL``)."""
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _nightly_deployment_id(day) -> str:
    """infra/prefect.yaml's nightly deployment: shipped by the test above, or here when that one
    failed or did not run (this test does not depend on it)."""
    found = [d["id"] for d in http_json("POST", f"{day['api']}/deployments/filter", {}) if d["name"] == "nightly"]
    if found:
        return found[0]
    env = day["client_env"]
    if POOL not in {p["name"] for p in http_json("POST", f"{day['api']}/work_pools/filter", {})}:
        made = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", POOL, "--type", "process"], env=env, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stdout + made.stderr
    shipped = _ship(env)
    assert shipped.returncode == 0, shipped.stdout[-3000:] + shipped.stderr[-3000:]
    return next(d["id"] for d in http_json("POST", f"{day['api']}/deployments/filter", {}) if d["name"] == "nightly")


def test_late_runs_are_listed_by_status(day):
    deployment_id = _nightly_deployment_id(day)
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)).isoformat()
    body = {"name": "late-by-design", "state": {"type": "SCHEDULED", "name": "Scheduled", "state_details": {"scheduled_time": past}}}
    run = http_json("POST", f"{day['api']}/deployments/{deployment_id}/create_flow_run", body)
    # no worker serves the pool: the server's late-runs service marks it Late
    wait_for(lambda: http_json("GET", f"{day['api']}/flow_runs/{run['id']}")["state_name"] == "Late", 180, "the run to turn Late", interval=2)
    out = subprocess.run(_selfattn("status", "--state", "Late", "--pool", POOL), env=day["client_env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "late-by-design" in out.stdout and "Late" in out.stdout, out.stdout
    assert "no worker picked them up" in out.stdout and f"prefect worker start --pool {POOL}" in out.stdout, out.stdout
    everything = subprocess.run(_selfattn("status", "--limit", "50"), env=day["client_env"], capture_output=True, text=True, timeout=300)
    assert "Crashed" in everything.stdout and "Completed" in everything.stdout, everything.stdout


def test_ctrl_c_stops_both_servers(day):
    ui = day["ui"]
    tree = [psutil.Process(ui.pid), *psutil.Process(ui.pid).children(recursive=True)]
    assert len(tree) >= 3  # selfattn ui, mlflow ui, prefect server (and their workers)
    ui.send_signal(signal.SIGINT)
    assert ui.wait(timeout=120) == 0, day["ui_log"].read_text()[-2000:]
    _, alive = psutil.wait_procs(tree[1:], timeout=30)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive

    def port_free(port: int) -> bool:
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    assert all(port_free(p) for p in day["ports"]), day["ports"]
