"""The database behind every service restarts mid-run: a private PostgreSQL cluster (``initdb`` +
``pg_ctl`` on a free port, so the machine's shared cluster is never touched) holds the MLflow
server's, the Prefect server's and the Optuna study's databases (``infra/local.py up``), and
``pg_ctl restart -m fast`` (connections dropped, in-flight transactions rolled back) hits one
``selfattn run --config smoke`` three times:

    (a) pretraining, once a checkpoint is on disk
    (b) an Optuna trial, while it is RUNNING in the study's database
    (c) registration, as the run takes the registry lock (a row in the MLflow database)

The run finishes (or fails in one paragraph past the retry budget, and the same command then
finishes); no MLflow run is left RUNNING, the model has exactly one version, the study holds
``n_trials`` complete trials and no duplicate, no Prefect flow run is left Running.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.reliability.conftest import SMOKE_SETS

from .conftest import REPO, _clean_env, http_json, mlflow_get, real_data_dir, run_local, selfattn_cmd

pytestmark = [pytest.mark.integration]

PG_BIN = Path("/usr/lib/postgresql/15/bin")
MODEL = "selfattn-sst2-smoke"
N_TRIALS = 2  # the smoke preset's search.n_trials


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgres:
    """A throwaway PostgreSQL cluster owned by the ``postgres`` user, on its own port and directory."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="selfattn-pg-"))
        self.data, self.log, self.port = self.root / "data", self.root / "pg.log", _free_port()
        shutil.chown(self.root, "postgres", "postgres")
        self._as_postgres(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")
        self.restarts_s: list[float] = []

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _as_postgres(self, *argv, timeout: float = 120) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *map(str, argv)], capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {done.stdout}\n{done.stderr}")

    def _ctl(self, action: str, *extra: str) -> None:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.log, "-o", opts, "-w", "-t", "60", *extra, action)

    def start(self) -> None:
        self._ctl("start")

    def restart(self) -> float:
        """``pg_ctl restart -m fast``: every connection dropped, in-flight transactions rolled back."""
        t0 = time.monotonic()
        self._ctl("restart", "-m", "fast")
        self.restarts_s.append(time.monotonic() - t0)
        return self.restarts_s[-1]

    def stop(self) -> None:
        try:
            self._ctl("stop", "-m", "immediate")
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def query(self, db: str, sql: str, args: tuple = ()) -> list[tuple]:
        import psycopg2

        try:
            conn = psycopg2.connect(f"{self.url}/{db}", connect_timeout=5)
        except psycopg2.OperationalError:
            return []  # restarting
        try:
            with conn.cursor() as cur:
                cur.execute(sql, args)
                return cur.fetchall()
        except (psycopg2.errors.UndefinedTable, psycopg2.OperationalError):
            return []
        finally:
            conn.close()


@pytest.fixture(scope="module")
def private_pg():
    if not (PG_BIN / "initdb").is_file() or os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip(f"needs root, runuser and PostgreSQL 15's initdb/pg_ctl under {PG_BIN} to run a private cluster")
    pg = PrivatePostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()  # always: nothing of it outlives the test


@pytest.fixture(scope="module")
def stack_on_private_pg(private_pg, tmp_path_factory) -> dict:
    state = tmp_path_factory.mktemp("stack")
    prefix = f"sa_rs_{uuid.uuid4().hex[:6]}"
    args = ["--state-dir", str(state), "--pg-url", private_pg.url, "--db-prefix", prefix]
    up = run_local("up", *args, "--mlflow-port", "0", "--prefect-port", "0", "--no-prefect-ui", "--no-worker", "--timeout", "240")
    if up.returncode != 0:
        run_local("down", *args)
        pytest.fail(f"infra/local.py up failed:\n{up.stdout}\n{up.stderr}")
    import json

    info = json.loads((state / "stack.json").read_text())
    info["prefix"] = prefix
    try:
        yield info
    finally:
        run_local("down", *args)


def test_the_optuna_storage_waits_out_a_database_restart(private_pg, tmp_path):
    """Optuna's RDB storage (as ``flows.tuning`` opens it) across a restart between and during calls:
    the same study, the same trials, nothing doubled."""
    import threading

    import optuna

    from flows.tuning import open_storage

    db = f"optuna_{uuid.uuid4().hex[:6]}"
    import psycopg2

    conn = psycopg2.connect(f"{private_pg.url}/postgres")
    conn.autocommit = True
    conn.cursor().execute(f"create database {db}")
    conn.close()
    storage = open_storage(f"postgresql+psycopg2://postgres@127.0.0.1:{private_pg.port}/{db}", home=tmp_path)
    study = optuna.create_study(study_name="restart", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    private_pg.restart()  # between calls: the pool's connections are dead
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    restarting = threading.Thread(target=private_pg.restart)
    restarting.start()  # during calls: refused connections until it is back
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    restarting.join()
    trials = optuna.load_study(study_name="restart", storage=storage).trials
    assert [t.number for t in trials] == list(range(6)) and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["x"] for t in trials}) == 6


def _run(env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    argv = [*selfattn_cmd(), "run", "--config", "smoke"]
    for s in SMOKE_SETS:
        argv += ["--set", s]
    return subprocess.Popen(argv, env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True)


def _until(proc: subprocess.Popen, log: Path, what: str, check, timeout: float = 1200) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            pytest.fail(f"run exited {proc.returncode} before {what}:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.slow  # a smoke pipeline against its own stack: ~4-6 min on 2 loaded cores
def test_a_database_restart_at_pretraining_a_trial_and_registration_loses_nothing(private_pg, stack_on_private_pg, tmp_path):
    stack, pg = stack_on_private_pg, private_pg
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    env = _clean_env()
    env.update(
        MLFLOW_TRACKING_URI=stack["mlflow_url"], PREFECT_API_URL=stack["prefect_api_url"], SELFATTN_OPTUNA_STORAGE=stack["optuna_storage"],
        SELFATTN_HOME=str(home), SELFATTN_DATA_DIR=real_data_dir(), PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    mlflow_db, optuna_db = f"{stack['prefix']}_mlflow", f"{stack['prefix']}_optuna"
    log = tmp_path / "run-1.log"
    before = len(pg.restarts_s)  # the cluster is module-scoped: the Optuna test restarted it too
    proc = _run(env, work, log)

    _until(proc, log, "a pretraining checkpoint", lambda: any(home.glob("runs/pretrain-*/train/checkpoints/step-*/state.pt")))
    pg.restart()  # (a)
    _until(proc, log, "a RUNNING trial", lambda: pg.query(optuna_db, "select trial_id from trials where state = 'RUNNING'"))
    pg.restart()  # (b)
    lock = f"{MODEL}.selfattn-lock"
    _until(proc, log, "the registry lock", lambda: pg.query(mlflow_db, "select name from registered_models where name = %s", (lock,)))
    pg.restart()  # (c)
    rc = proc.wait(timeout=1800)
    print(f"restarts (pg_ctl restart -m fast, s): {[round(t, 2) for t in pg.restarts_s[before:]]}; run exit {rc}")
    text = log.read_text(errors="replace")
    if rc != 0:  # past the retry budget: one paragraph, and the same command finishes
        errors = [line for line in text.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in text, text[-4000:]
        log2 = tmp_path / "run-2.log"
        rerun = _run(env, work, log2)
        assert rerun.wait(timeout=1800) == 0, log2.read_text(errors="replace")[-4000:]
    assert len(pg.restarts_s) - before == 3

    # MLflow: no run left RUNNING, exactly one version
    exp = mlflow_get(stack, "experiments/get-by-name", experiment_name="selfattn-smoke")["experiment"]["experiment_id"]
    runs = http_json("POST", f"{stack['mlflow_url']}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp], "max_results": 1000}).get("runs", [])
    assert runs and not [r["info"]["run_id"] for r in runs if r["info"]["status"] == "RUNNING"]
    versions = mlflow_get(stack, "model-versions/search", filter=f"name='{MODEL}'").get("model_versions", [])
    assert len(versions) == 1, versions

    # Optuna: n_trials finished (complete or pruned), none RUNNING, none finished twice with the same parameters
    stages = [line.strip() for line in text.splitlines() if " done in " in line]
    print("stages:", "; ".join(stages))
    rows = pg.query(optuna_db, "select trial_id, state from trials")
    finished = [tid for tid, state in rows if state in ("COMPLETE", "PRUNED")]
    assert len(finished) == N_TRIALS and not [t for t, s in rows if s == "RUNNING"], rows
    params = pg.query(optuna_db, "select trial_id, param_name, param_value from trial_params order by trial_id, param_name")
    by_trial: dict[int, tuple] = {}
    for tid, name, value in params:
        by_trial[tid] = (*by_trial.get(tid, ()), (name, value))
    assert len({by_trial[t] for t in finished}) == N_TRIALS, by_trial  # no trial duplicated

    # Prefect: no flow run left Running
    running = http_json("POST", f"{stack['prefect_api_url']}/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}})
    assert running == [], [r["name"] for r in running]
