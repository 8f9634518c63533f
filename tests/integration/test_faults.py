"""Faults against a real ``mlflow server`` on PostgreSQL, started (and stopped) by these tests:
two hosts promoting at once, and the tracking server going away in the middle of a pipeline run."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from flows.tracking import registry

from .conftest import PG_URL, REPO, _clean_env, _pg_available, mlflow_get, mlflow_post, real_data_dir, selfattn_cmd, wait_for

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on PostgreSQL (a throwaway database) that a test can stop and restart."""

    def __init__(self, root: Path) -> None:
        import psycopg2

        self.root = root
        self.db = f"sa_ui_{uuid.uuid4().hex[:8]}"
        conn = psycopg2.connect(PG_URL.rstrip("/") + "/postgres")
        conn.autocommit = True
        conn.cursor().execute(f"create database {self.db}")
        conn.close()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"{PG_URL.rstrip('/')}/{self.db}", "--artifacts-destination", str(self.root / "artifacts"),
               "--workers", "1"]  # fmt: skip
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(cmd, env=_clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._healthy, timeout=300, what=f"mlflow server on {self.url}")

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"mlflow server exited {self.proc.returncode}: {(self.root / f'server-{self.starts}.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a crash, not a shutdown
            self.proc.wait()

    def drop(self) -> None:
        import psycopg2

        self.stop()
        conn = psycopg2.connect(PG_URL.rstrip("/") + "/postgres")
        conn.autocommit = True
        conn.cursor().execute(f"drop database if exists {self.db} with (force)")
        conn.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _pg_available()
    if reason:
        pytest.skip(reason)
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.drop()


def _host_env(server: MlflowServer, home: Path, *, data: bool = True) -> dict[str, str]:
    """A client process' environment; ``data``: it runs the pipeline, so it needs the real data (else skip)."""
    env = _clean_env()
    env.update(MLFLOW_TRACKING_URI=server.url, SELFATTN_HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    if data:
        env["SELFATTN_DATA_DIR"] = real_data_dir()
    return env


def _version_tags(server, model: str) -> dict[str, dict[str, str]]:
    versions = mlflow_get({"mlflow_url": server.url}, "model-versions/search", filter=f"name='{model}'", max_results=1000).get("model_versions", [])
    return {v["version"]: {t["key"]: t["value"] for t in v.get("tags", [])} for v in versions}


def test_two_hosts_promote_at_once_the_better_version_wins(server, tmp_path):
    model = f"race-{uuid.uuid4().hex[:6]}"
    rng = random.Random(0)
    scores = rng.sample([i / 100 for i in range(30, 99)], 16)  # distinct, interleaved between the hosts
    barrier = tmp_path / "barrier"  # both hosts imported and connected before either starts
    barrier.mkdir()
    procs = []
    for host, part in (("host-a", scores[0::2]), ("host-b", scores[1::2])):
        home = tmp_path / host
        cmd = [sys.executable, str(REPO / "tests" / "integration" / "scripts" / "promote_race.py"), str(barrier), model, host, *map(str, part)]
        procs.append(subprocess.Popen(cmd, env=_host_env(server, home, data=False), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    # the gates contended: both hosts gated all their versions, and at least once one found the
    # lock held by the other and waited for it
    waits = {line.split()[0]: int(line.split("=")[1]) for out, _ in outs for line in out.splitlines() if "lock-waits=" in line}
    gated = [line.split()[0] for out, _ in outs for line in out.splitlines() if " promoted=" in line]
    assert sorted(set(gated)) == ["host-a", "host-b"] and len(gated) == 16, gated
    assert set(waits) == {"host-a", "host-b"} and sum(waits.values()) >= 1, ("the gates never contended", waits)
    tags = _version_tags(server, model)
    assert len(tags) == 16
    score = {v: float(t["eval.score"]) for v, t in tags.items()}
    rm = mlflow_get({"mlflow_url": server.url}, "registered-models/get", name=model)["registered_model"]
    aliases = {a["alias"]: a["version"] for a in rm.get("aliases", [])}
    history = registry.parse_history(next(t["value"] for t in rm["tags"] if t["key"] == "champion_history"))
    best = max(score, key=score.get)
    assert aliases["champion"] == best, (aliases, score, "\n".join(o for o, _ in outs))
    # every move of the champion beat the one before it, each version at most once
    assert len(history) == len(set(history))
    assert [score[v] for v in history] == sorted(score[v] for v in history)
    assert history[-1] == best
    # and each decision recorded the champion it was compared with at the time
    for v in history[1:]:
        assert tags[v]["promotion.decision"] == "promoted"
        assert tags[v]["promotion.champion_version"] == history[history.index(v) - 1]
    # no lock model left behind
    assert not mlflow_get({"mlflow_url": server.url}, "registered-models/search", filter=f"name='{model}.selfattn-lock'").get("registered_models")


def _runs(server, experiment_id: str) -> list[dict]:
    return mlflow_post({"mlflow_url": server.url}, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1000}).get("runs", [])


def test_tracking_server_down_30s_mid_run_nothing_lost_or_doubled(server, tmp_path):
    """``selfattn run --config smoke`` while the server is killed 25 s in and back 30 s later."""
    home = tmp_path / "home"
    env = _host_env(server, home)
    experiment = f"outage-{uuid.uuid4().hex[:6]}"
    model = f"outage-{uuid.uuid4().hex[:6]}"
    cmd = [*selfattn_cmd(), "run", "--config", "smoke", "--set", f"tracking.experiment={experiment}", "--set", f"registry.model_name={model}"]
    log = open(tmp_path / "run.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: proc.poll() is not None or "> pretrain" in (tmp_path / "run.log").read_text(), timeout=600, what="the pretrain stage")
        server.stop()
        down_at = time.monotonic()
        time.sleep(30)
        server.start()
        outage_s = time.monotonic() - down_at
        rc = proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "run.log").read_text()
    print(f"outage {outage_s:.0f}s")
    assert rc == 0, text[-4000:]
    exp = mlflow_get({"mlflow_url": server.url}, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    runs = _runs(server, exp["experiment_id"])
    assert not [r["info"]["run_name"] for r in runs if r["info"]["status"] == "RUNNING"]
    stages = [r for r in runs if any(t["key"] == "selfattn.stage" and t["value"] != "trial" for t in r["data"].get("tags", []))]
    names = sorted(r["info"]["run_name"] for r in stages)
    assert names == sorted(set(names)) and {"validate", "pretrain", "search", "finetune", "evaluate", "register"} <= set(names), names
    for r in runs:  # no metric point doubled (a re-sent batch is skipped by the store)
        for m in r["data"].get("metrics", []):
            hist = mlflow_get({"mlflow_url": server.url}, "metrics/get-history", run_id=r["info"]["run_id"], metric_key=m["key"], max_results=25000)["metrics"]
            steps = [(h["step"], h["timestamp"]) for h in hist]
            assert len(steps) == len(set(steps)), (r["info"]["run_name"], m["key"])
    assert list(_version_tags(server, model)) == ["1"]
    ft = next(r for r in stages if r["info"]["run_name"] == "finetune")
    loss = mlflow_get({"mlflow_url": server.url}, "metrics/get-history", run_id=ft["info"]["run_id"], metric_key="train_loss")["metrics"]
    assert len(loss) == len({h["step"] for h in loss}) > 0
