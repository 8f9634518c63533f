"""Distributed training launched from a Prefect task: ``infra/distributed.py`` runs
``torchrun --nproc_per_node 2`` (gloo, CPU) of ``selfattn pretrain``; the stack's Prefect server
records the flow run, and the 2-process run reproduces a 1-process run at equal global batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, http_json

pytestmark = pytest.mark.integration


def _cfg(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data: {{path: {corpus}, block_size: 16}}\n"
        "model: {n_layers: 2, d_model: 32, n_heads: 2}\n"
        "optim: {lr: 3.0e-3, warmup_steps: 2}\n"
        "train: {max_steps: 6, batch_size: 8, eval_every: 6, eval_batches: 2, log_every: 1, progress: false, device: cpu}\n"
    )
    return cfg


def test_torchrun_two_ranks_from_a_prefect_task(stack, stack_env, tmp_path):
    cfg = _cfg(tmp_path)
    env = dict(stack_env, OMP_NUM_THREADS="1")
    ddp = subprocess.run(
        [sys.executable, str(REPO / "infra" / "distributed.py"), "pretrain", "--config", str(cfg),
         "--output", str(tmp_path / "ddp"), "--nproc-per-node", "2"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    result = json.loads(ddp.stdout[ddp.stdout.index("{\n") :])
    assert result["world_size"] == 2 and len(result["rank_logs"]) == 2  # one log per rank

    # the flow and its task are recorded in the stack's Prefect server
    runs = http_json("POST", f"{stack['prefect_api_url']}/flow_runs/filter", {"flows": {"name": {"any_": ["selfattn-torchrun"]}}})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]
    tasks = http_json("POST", f"{stack['prefect_api_url']}/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    assert len(tasks) == 1 and tasks[0]["name"].startswith("torchrun-stage"), [t["name"] for t in tasks]
    assert tasks[0]["state_type"] == "COMPLETED"

    # the same stage in one process gives the same losses (DDP splits the same global batch)
    single = subprocess.run(
        [sys.executable, "-m", "selfattn.cli", "pretrain", "--config", str(cfg), "--output", str(tmp_path / "single")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    two = [h["train_loss"] for h in json.loads((tmp_path / "ddp" / "history.json").read_text()) if "train_loss" in h]
    one = [h["train_loss"] for h in json.loads((tmp_path / "single" / "history.json").read_text()) if "train_loss" in h]
    assert len(two) == len(one) == 6
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    assert result["metrics"]["train_loss"] == pytest.approx(two[-1], rel=1e-6)
