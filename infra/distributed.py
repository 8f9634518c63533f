"""Launch ``selfattn pretrain|finetune`` under ``torchrun`` from a Prefect task.

The training engine is DDP-ready (``selfattn/train/distributed.py``): the same entry point runs under
``torchrun --nproc_per_node N`` (NCCL on GPUs, gloo on CPU). This module wraps that launch in a
Prefect task, so a deployment on a GPU work pool (``infra/k8s/``) or a process worker on a multi-GPU
machine can run a stage data-parallel and the Prefect server records it:

    python infra/distributed.py pretrain --config cfg.yaml --output out/ddp --nproc-per-node 2
    # several nodes: the same command on each node, with --nnodes 2 --node-rank R --rdzv-endpoint HOST:29400

``torchrun_stage`` is the task (one subprocess: torchrun, which starts the ranks); ``torchrun_flow`` is
a flow around it. The task fails (so Prefect marks the run Failed) when any rank fails; the ranks'
output is kept per rank under ``<output>/torchrun_logs`` and returned with rank 0's metrics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task

Stage = Literal["pretrain", "finetune"]


def torchrun_command(
    *,
    stage: Stage,
    config: str,
    output: str,
    overrides: list[str] | None = None,
    nproc_per_node: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "selfattn",
    log_dir: str | None = None,
) -> list[str]:
    """The ``torchrun`` command line for one node (``--standalone`` when there is one node)."""
    if stage not in ("pretrain", "finetune"):
        raise ValueError(f"stage ({stage!r}) must be 'pretrain' or 'finetune'")
    if nproc_per_node < 1 or nnodes < 1:
        raise ValueError(f"nproc_per_node ({nproc_per_node}) and nnodes ({nnodes}) must be >= 1")
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError(f"nnodes ({nnodes}) > 1 needs rdzv_endpoint (HOST:PORT of the rendezvous, e.g. node 0:29400)")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc_per_node)]
    if nnodes == 1 and not rdzv_endpoint:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(nnodes), "--node_rank", str(node_rank), "--rdzv_backend", "c10d",
                "--rdzv_endpoint", rdzv_endpoint, "--rdzv_id", rdzv_id]  # fmt: skip
    if log_dir:
        cmd += ["--log_dir", log_dir, "--tee", "3"]  # each rank's stdout/stderr kept in its own file
    cmd += ["-m", "selfattn.cli", stage, "--config", config, "--output", output]
    for item in overrides or []:
        cmd += ["--set", item]
    return cmd


@task(name="torchrun-stage", retries=0)
def torchrun_stage(
    stage: Stage,
    config: str,
    output: str,
    overrides: list[str] | None = None,
    nproc_per_node: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    timeout_s: float | None = None,
) -> dict:
    """Run one training stage under torchrun; returns rank 0's metrics and where each rank's log is."""
    logger = get_run_logger()
    out = Path(output).resolve()
    log_dir = out / "torchrun_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = torchrun_command(
        stage=stage, config=config, output=str(out), overrides=overrides, nproc_per_node=nproc_per_node,
        nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, log_dir=str(log_dir),
    )  # fmt: skip
    logger.info("launching: %s", " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default too; say it so CPU ranks do not oversubscribe
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines()[-20:]:
        logger.info("%s", line)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {stage} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    rank_logs = sorted(str(p) for p in log_dir.rglob("stdout.log"))
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    return {"stage": stage, "output": str(out), "world_size": nproc_per_node * nnodes, "rank_logs": rank_logs, "metrics": metrics}


@flow(name="selfattn-torchrun", log_prints=True)
def torchrun_flow(
    stage: Stage = "pretrain",
    config: str = "",
    output: str = "",
    overrides: list[str] | None = None,
    nproc_per_node: int = 2,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
) -> dict:
    """A flow around :func:`torchrun_stage` (deploy it on a GPU pool to train data-parallel there)."""
    if not config or not output:
        raise ValueError(f"config ({config!r}) and output ({output!r}) are required")
    return torchrun_stage(
        stage, config, output, overrides=overrides, nproc_per_node=nproc_per_node, nnodes=nnodes,
        node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infra/distributed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=["pretrain", "finetune"])
    p.add_argument("--config", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--nproc-per-node", type=int, default=2)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--rdzv-endpoint", default=None)
    args = p.parse_args(argv)
    result = torchrun_flow(
        stage=args.stage, config=args.config, output=args.output, overrides=args.overrides,
        nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint,
    )  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
