"""The worst moments of a tracking-server outage, against a real ``mlflow server`` on PostgreSQL.

One home, one model, two ``selfattn run --config smoke`` in a row:

    run 1  the server is SIGKILLed as the registration takes the registry lock and stays down
           until the run gives up (the client's retry budget shortened to ~3 s by MLflow's own
           variables): the run fails in one paragraph, non-zero exit
    run 2  the same command, default retry budget; the server is killed again as the model's
           artifacts start to arrive (upload) and as the registration takes the lock, each
           time restarted after 30 s: it finishes, and the registry, the runs and the metric
           histories hold no duplicate

Kill moments are detected by watching what the server writes (its artifact directory, its
registry table in PostgreSQL), never by sleeping. The registration's moment is also held open:
the test holds a PostgreSQL lock in the server's database (run 1: ``model_versions`` in EXCLUSIVE
mode; run 2: the registered model's row), so the run, registry lock taken, waits on its new
version until the server is killed, and that write, never committed, dies with the server's
connection. Without the hold, a run on a fast host registered its version in the milliseconds
between the lock showing and the kill (CI, 2026-12-05).
"""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .conftest import PG_URL, _pg_available, mlflow_get, selfattn_cmd, wait_for
from .test_faults import MlflowServer, _host_env, _runs, _version_tags

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SHORT_BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def _pg(server: MlflowServer, sql: str, args: tuple = ()) -> list[tuple]:
    import psycopg2

    conn = psycopg2.connect(f"{PG_URL.rstrip('/')}/{server.db}")
    try:
        with conn.cursor() as cur:
            try:
                cur.execute(sql, args)
            except psycopg2.errors.UndefinedTable:
                return []
            return cur.fetchall()
    finally:
        conn.close()


def _lock_taken(server: MlflowServer, model: str) -> bool:
    return bool(_pg(server, "select name from registered_models where name = %s", (f"{model}.selfattn-lock",)))


def _model_files(server: MlflowServer) -> set[Path]:
    # logged models' artifacts: <destination>/<experiment>/models/m-<id>/artifacts/...
    return {p for p in (server.root / "artifacts").rglob("*") if p.is_file() and "/models/m-" in p.as_posix()}


class Held:
    """A lock statement (``sql``) in an open transaction of the server's database, so that the
    server's writes it conflicts with wait until :meth:`release` (idempotent)."""

    def __init__(self, server: MlflowServer, sql: str, args: tuple = ()) -> None:
        import psycopg2

        self.server = server
        self.conn = psycopg2.connect(f"{PG_URL.rstrip('/')}/{server.db}")
        cur = self.conn.cursor()
        cur.execute(sql, args)  # psycopg2 opened the transaction
        self.rows = cur.fetchall() if cur.description else []
        self.pid = self.conn.get_backend_pid()

    def waited_on(self) -> list[str]:
        """The statements now waiting on a lock in the server's database (only the server and this test use it)."""
        rows = _pg(self.server, "select pid, query from pg_stat_activity where datname = %s and wait_event_type = 'Lock'", (self.server.db,))
        return [q for pid, q in rows if pid != self.pid]

    def release(self) -> None:
        if not self.conn.closed:
            self.conn.rollback()
            self.conn.close()


class Run:
    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT, text=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def until(self, what: str, check, timeout: float = 1200) -> None:
        wait_for(lambda: check() or (self.proc.poll() is not None and pytest.fail(f"run exited {self.proc.returncode} before {what}:\n{self.text()[-3000:]}")), timeout, what, interval=0.05)

    def wait(self, timeout: float = 1800) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._fh.close()


def _outage(server: MlflowServer, down_s: float) -> float:
    """Kill the server now (a no-op if the caller just did), start it again ``down_s`` later; returns kill-to-healthy seconds."""
    server.stop()
    t0 = time.monotonic()
    time.sleep(down_s)
    server.start()
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def outages(tmp_path_factory) -> dict:
    reason = _pg_available()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("outages")
    srv = MlflowServer(base / "server")
    (base / "server").mkdir(exist_ok=True)
    home = base / "home"
    experiment, model = f"outages-{uuid.uuid4().hex[:6]}", f"outages-{uuid.uuid4().hex[:6]}"
    cmd = [*selfattn_cmd(), "run", "--config", "smoke", "--set", f"tracking.experiment={experiment}", "--set", f"registry.model_name={model}"]
    obs: dict = {"server": srv, "model": model, "experiment": experiment, "base": base}
    hold: Held | None = None
    try:
        srv.start()
        env = _host_env(srv, home)

        # run 1: down from the registry lock until the run gives up
        hold = Held(srv, "lock table model_versions in exclusive mode")  # reads pass, writes wait
        r1 = Run(cmd, {**env, **SHORT_BUDGET}, base / "run1.log")
        r1.until("the registry lock", lambda: _lock_taken(srv, model))
        r1.until("the version insert to wait on the held table", lambda: any(q.lower().startswith("insert into model_versions") for q in hold.waited_on()))
        srv.stop()
        hold.release()  # the server's pending insert goes on, then finds its client gone: rolled back
        t0 = time.monotonic()
        obs["rc1"] = r1.wait(timeout=900)
        obs["gave_up_after_s"] = time.monotonic() - t0
        obs["log1"] = r1.text()
        time.sleep(5)  # still down a little after the run gave up
        srv.start()
        obs["outage1_s"] = time.monotonic() - t0
        obs["lock_after_1"] = _lock_taken(srv, model)
        obs["versions_after_1"] = list(_version_tags(srv, model)) if _pg(srv, "select name from registered_models where name = %s", (model,)) else []

        # run 2: the same command; outages during the model upload and during registration
        before = _model_files(srv)
        # run 1's lock, left behind, is taken over by renaming it aside (an update that cascades
        # to model_versions): this time only the model's own row is held, which its new version
        # (a row of model_versions pointing at it) must wait for
        hold = Held(srv, "select name from registered_models where name = %s for update", (model,))
        assert hold.rows, f"run 1 created the registered model {model!r} before its version"
        r2 = Run(cmd, env, base / "run2.log")
        r2.until("the model's artifacts to arrive", lambda: bool(_model_files(srv) - before))
        obs["upload_outage_s"] = _outage(srv, 30)
        r2.until("the new version to wait on the held model", lambda: bool(hold.waited_on()))
        obs["register_waited_on"] = hold.waited_on()
        srv.stop()
        hold.release()
        obs["register_outage_s"] = _outage(srv, 30)
        obs["rc2"] = r2.wait(timeout=1800)
        obs["log2"] = r2.text()
        print({k: round(v, 1) for k, v in obs.items() if k.endswith("_s")}, "registration held at:", obs["register_waited_on"])
        yield obs
    finally:
        if hold is not None:
            hold.release()
        srv.drop()


def test_an_outage_past_the_retry_budget_fails_in_one_paragraph(outages):
    log = outages["log1"]
    assert outages["rc1"] != 0, log[-3000:]
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "did not answer within the client's retry budget" in errors[0], log[-3000:]
    assert "Run the same command again" in errors[0]
    assert log.rstrip().splitlines()[-1] == errors[0], "the error paragraph is the last thing printed"
    print(f"run 1: {log.count('Traceback')} Prefect traceback(s) logged before the error paragraph")
    assert outages["versions_after_1"] == [], "nothing registered while the server was down"


def test_the_rerun_survives_outages_during_upload_and_registration(outages):
    assert outages["rc2"] == 0, outages["log2"][-4000:]


def test_no_duplicate_version_champion_or_lock(outages):
    srv, model = outages["server"], outages["model"]
    tags = _version_tags(srv, model)
    assert list(tags) == ["1"], tags
    rm = mlflow_get({"mlflow_url": srv.url}, "registered-models/get", name=model)["registered_model"]
    aliases = {a["alias"]: a["version"] for a in rm.get("aliases", [])}
    assert aliases == {"champion": "1", "challenger": "1"}, aliases
    assert next(t["value"] for t in rm["tags"] if t["key"] == "champion_history") == "v1"
    assert not _lock_taken(srv, model), "the registry lock was released"


def test_no_run_left_running_and_no_metric_point_doubled(outages):
    srv = outages["server"]
    exp = mlflow_get({"mlflow_url": srv.url}, "experiments/get-by-name", experiment_name=outages["experiment"])["experiment"]
    runs = _runs(srv, exp["experiment_id"])
    assert not [(r["info"]["run_name"], r["info"]["status"]) for r in runs if r["info"]["status"] == "RUNNING"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    parents = [r for r in runs if "mlflow.parentRunId" not in tags[r["info"]["run_id"]]]
    assert sorted(r["info"]["status"] for r in parents) == ["FINISHED", "KILLED"], [(r["info"]["run_name"], r["info"]["status"]) for r in parents]
    killed = [r for r in runs if r["info"]["status"] == "KILLED"]
    assert killed and all(tags[r["info"]["run_id"]].get("selfattn.stale") for r in killed)
    for r in runs:
        parent = "mlflow.parentRunId" not in tags[r["info"]["run_id"]]
        for m in r["data"].get("metrics", []):
            hist = mlflow_get({"mlflow_url": srv.url}, "metrics/get-history", run_id=r["info"]["run_id"], metric_key=m["key"], max_results=25000)["metrics"]
            # a stage run logs each step once; a parent run mirrors several stages' curves
            points = [(h["step"], h["timestamp"]) if parent else h["step"] for h in hist]
            assert len(points) == len(set(points)), (r["info"]["run_name"], m["key"], sorted(points))
