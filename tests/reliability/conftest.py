"""Helpers for the reliability tests: the real ``selfattn run`` in a subprocess (its own process
group, so a SIGKILL takes the Prefect ephemeral server with it, as a preempted machine would),
file watchers that detect a kill point, and read-only views of the MLflow and Optuna stores.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[2]
SMOKE_SETS = [
    # the shipped smoke preset, with the step counts the kill points rely on pinned here (a
    # checkpoint lands mid-stage, and enough steps follow it to be killed in between)
    "pretrain.train.max_steps=80",
    "pretrain.train.checkpoint_every=20",
    "finetune.train.max_steps=30",
    "finetune.train.checkpoint_every=10",
    "finetune.train.eval_every=10",
    "finetune.train.log_every=5",
    "search.trial_overrides.train.max_steps=8",
    # a dead trial's heartbeat goes stale quickly, so the next start fails and retries it
    "search.heartbeat_interval_s=1",
    "search.grace_period_s=3",
]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)


def pipeline_env(home: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "SELFATTN_", "OPTUNA_"))}
    env.update(SELFATTN_HOME=str(home), SELFATTN_DATA_DIR=str(data_dir), PYTHONUNBUFFERED="1", **extra)
    return env


class Pipeline:
    """One ``selfattn run`` process (own session / process group); logs to ``log_dir``."""

    def __init__(self, *, env: dict[str, str], cwd: Path, log_dir: Path, name: str, sets: list[str], config: str = "smoke") -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        argv = [sys.executable, "-m", "selfattn.cli", "run", "--config", config]
        for s in sets:
            argv += ["--set", s]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=out, stderr=err, start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(encoding="utf-8", errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(encoding="utf-8", errors="replace")

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"pipeline did not finish in {timeout} s; stderr tail:\n{self.stderr[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL the whole process group (pipeline, Prefect server, any worker)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 600, poll_s: float = 0.05) -> None:
        """Poll ``predicate`` until true; fail if the process ends first (the kill point was missed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"pipeline exited (rc {self.proc.returncode}) before {what}; stderr tail:\n{self.stderr[-4000:]}")
            time.sleep(poll_s)
        self.kill()
        raise AssertionError(f"timed out waiting for {what}; stderr tail:\n{self.stderr[-4000:]}")


def query(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Read-only query of a SQLite store (the pipeline may be writing: retry on a lock)."""
    if not db.is_file():
        return []
    for _ in range(50):
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
                return con.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            time.sleep(0.1)
    raise AssertionError(f"could not read {db}")


def runs(home: Path) -> list[dict]:
    """Every MLflow run of the home's store: id, name, status, tags, params."""
    db = home / "mlflow.db"
    out = []
    for run_uuid, name, status in query(db, "select run_uuid, name, status from runs"):
        tags = dict(query(db, "select key, value from tags where run_uuid = ?", (run_uuid,)))
        params = dict(query(db, "select key, value from params where run_uuid = ?", (run_uuid,)))
        out.append({"id": run_uuid, "name": name, "status": status, "tags": tags, "params": params})
    return out


def study_trials(home: Path) -> list:
    """Every trial (``FrozenTrial``) of the home's embedded Optuna journal, read with Optuna itself."""
    from flows import tuning

    path = home / "optuna.journal"
    if not path.is_file():
        return []
    storage = tuning.open_storage(f"journal:///{path}")
    return sorted((t for s in storage.get_all_studies() for t in storage.get_all_trials(s._study_id, deepcopy=False)), key=lambda t: t.number)


def trials(home: Path) -> list[tuple[int, str]]:
    return [(t.number, t.state.name) for t in study_trials(home)]


def model_versions(home: Path) -> list[tuple[str, int]]:
    return query(home / "mlflow.db", "select name, version from model_versions order by version")


def checkpoint_step(path: Path) -> int:
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def stage_dirs(home: Path, stage: str) -> list[Path]:
    return sorted((home / "runs").glob(f"{stage}-*"))
