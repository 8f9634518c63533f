"""infra/local.py: the stack comes up healthy on PostgreSQL, and down stops every process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from .conftest import LOCAL, PG_URL, REPO, _pg_available, http_json, run_local

pytestmark = pytest.mark.integration


def _databases() -> set[str]:
    import psycopg2

    conn = psycopg2.connect(PG_URL.rstrip("/") + "/postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def _tables(db: str) -> set[str]:
    import psycopg2

    conn = psycopg2.connect(PG_URL.rstrip("/") + "/" + db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            return {r[0] for r in cur.fetchall()}
    finally:
        conn.close()


def test_stack_is_healthy_on_postgres(stack):
    status = run_local("status", "--state-dir", stack["state_dir"])
    assert status.returncode == 0, status.stdout + status.stderr
    info = json.loads(status.stdout)
    for service in ("mlflow", "prefect", "worker"):
        assert info[service]["alive"] and info[service]["healthy"], info

    # the health endpoints themselves
    assert http_json("GET", f"{stack['prefect_api_url']}/health") is True
    pool = http_json("GET", f"{stack['prefect_api_url']}/work_pools/{stack['pool']}")
    assert pool["type"] == "process" and pool["status"] == "READY", pool

    # the servers really keep their state in PostgreSQL, in the throwaway databases
    prefix = stack["db_prefix"]
    assert {f"{prefix}_mlflow", f"{prefix}_prefect", f"{prefix}_optuna"} <= _databases()
    assert {"experiments", "runs", "metrics", "registered_models", "model_versions"} <= _tables(f"{prefix}_mlflow")
    assert {"flow_run", "deployment", "work_pool", "worker"} <= _tables(f"{prefix}_prefect")


def _pids_alive(pids: list[int]) -> list[int]:
    import psutil

    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def _local():
    from importlib import util

    if "infra_local" not in sys.modules:
        spec = util.spec_from_file_location("infra_local", LOCAL)
        module = util.module_from_spec(spec)
        sys.modules["infra_local"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["infra_local"]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_down_leaves_no_processes_ports_or_databases(tmp_path):
    """A second, minimal stack (no worker): up, then down --drop-databases cleans up everything."""
    reason = _pg_available()
    if reason:
        pytest.skip(reason)
    prefix = f"sa_it_{uuid.uuid4().hex[:8]}"
    up = run_local(
        "up", "--state-dir", str(tmp_path), "--pg-url", PG_URL, "--db-prefix", prefix,
        "--mlflow-port", "0", "--prefect-port", "0", "--no-worker", "--no-prefect-ui",
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        stack = json.loads((tmp_path / "stack.json").read_text())
        env_lines = (tmp_path / "stack.env").read_text().splitlines()
        assert f"MLFLOW_TRACKING_URI={stack['mlflow_url']}" in env_lines
        assert f"PREFECT_API_URL={stack['prefect_api_url']}" in env_lines
        ports = [int(stack["mlflow_url"].rsplit(":", 1)[1]), int(stack["prefect_api_url"].split(":")[2].split("/")[0])]
        assert not any(_port_free(p) for p in ports)
        tree = set().union(*(_local().process_tree(pid) for pid in stack["pids"].values()))
        # `up` again is idempotent: same services, nothing new started
        again = run_local("up", "--state-dir", str(tmp_path), "--db-prefix", prefix, "--no-worker")
        assert again.returncode == 0 and json.loads((tmp_path / "stack.json").read_text())["pids"] == stack["pids"]
    finally:
        down = subprocess.run(
            [sys.executable, str(LOCAL), "down", "--state-dir", str(tmp_path), "--pg-url", PG_URL, "--db-prefix", prefix, "--drop-databases"],
            capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ),
        )  # fmt: skip
    assert down.returncode == 0, down.stdout + down.stderr
    # every process of every service's tree is gone, the ports are free, the databases dropped
    assert len(tree) > len(stack["pids"])  # the servers do run children (uvicorn, ...)
    assert not _pids_alive(sorted(tree)), f"processes left after down: {_pids_alive(sorted(tree))}"
    assert all(_port_free(p) for p in ports)
    assert not {f"{prefix}_mlflow", f"{prefix}_prefect", f"{prefix}_optuna"} & _databases()
    assert not (tmp_path / "stack.json").exists()
