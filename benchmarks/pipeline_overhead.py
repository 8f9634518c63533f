"""Orchestration overhead: ``selfattn run --config smoke`` vs the same stages called directly.

Both runs use separate SELFATTN_HOMEs with no cached stage and the same config. By default the
orchestrated home's Prefect and MLflow databases are created first, untimed (a nightly job runs
on an existing home); ``--cold`` times the very first run including that (reported either way). The direct
run calls ``flows.stages`` one after the other (data, checks, pretrain, Optuna search, fine-tune,
evaluate) without Prefect and without MLflow; the orchestrated run is the real command (Prefect
ephemeral API, MLflow SQLite store, nested runs, artifacts, model logging, registry, promotion).
Prints both times, the overhead and the ratio, then one JSON line.
Target: overhead <= max(10% of the orchestrated total, 15 s).

    python benchmarks/pipeline_overhead.py [--config smoke] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def direct(config: str, overrides: list[str], home: Path) -> float:
    """The stages as plain function calls, in a fresh process (same imports as the CLI pays)."""
    code = f"""
import os, time, json
t0 = time.perf_counter()
from pathlib import Path
from flows.config import load_pipeline_config
from flows.stages import data as data_stage
from flows.stages import evaluate, finetune, pretrain, search
cfg = load_pipeline_config({config!r}, {overrides!r})
home = Path(os.environ["SELFATTN_HOME"])
data = data_stage.prepare_data(cfg, home)
checked = data_stage.validate_data(cfg, data, home)
assert checked.result["passed"], checked.result["failures"]
pre = pretrain.pretrain_stage(cfg, data, home)
sr = search.search_stage(cfg, data, pre, home)
ft = finetune.finetune_stage(cfg, data, pre, sr, home)
ev = evaluate.evaluate_stage(cfg, data, ft, home)
print(json.dumps({{"metrics": ev.result["metrics"]}}))
"""
    env = {**os.environ, "SELFATTN_HOME": str(home)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t0


def init_stores(config: str, home: Path) -> float:
    """Create the Prefect and MLflow databases of a fresh home (what the first run ever pays)."""
    code = f"""
from flows.cli import setup_home, warm_start
from flows.config import load_pipeline_config
warm_start(setup_home(), load_pipeline_config({config!r}).tracking.experiment)
"""
    env = {**os.environ, "SELFATTN_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    return time.perf_counter() - t0


def orchestrated(config: str, overrides: list[str], home: Path) -> float:
    env = {**os.environ, "SELFATTN_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "selfattn.cli", "run", "--config", config]
    for o in overrides:
        cmd += ["--set", o]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--only", choices=["direct", "orchestrated"], default=None, help="run one side only")
    ap.add_argument("--cold", action="store_true", help="time the first run ever (Prefect/MLflow databases created inside the timing)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="selfattn-bench-") as tmp:
        # distinct study names are not needed: each side has its own home (own optuna.db)
        t_direct = direct(args.config, args.overrides, Path(tmp) / "direct") if args.only != "orchestrated" else float("nan")
        t_init = float("nan")
        if args.only != "direct":
            if not args.cold:  # a nightly job runs on a home whose stores exist: create them untimed
                t_init = init_stores(args.config, Path(tmp) / "orchestrated")
            t_orch = orchestrated(args.config, args.overrides, Path(tmp) / "orchestrated")
        else:
            t_orch = float("nan")
    overhead = t_orch - t_direct
    target = max(0.10 * t_orch, 15.0)
    print(f"direct (stages only):          {t_direct:8.1f} s")
    print(f"selfattn run (Prefect+MLflow): {t_orch:8.1f} s")
    if t_init == t_init:
        print(f"(store creation on a fresh home, untimed above: {t_init:.1f} s; --cold includes it)")
    print(f"overhead:                      {overhead:8.1f} s  ({overhead / t_orch:.1%} of total, ratio {t_orch / t_direct:.2f}x; target <= {target:.1f} s)")
    print(json.dumps({
        "benchmark": "pipeline_overhead", "config": args.config, "direct_s": round(t_direct, 2), "orchestrated_s": round(t_orch, 2),
        "overhead_s": round(overhead, 2), "overhead_fraction": round(overhead / t_orch, 4), "ratio": round(t_orch / t_direct, 3),
        "target_s": round(target, 2), "within_target": bool(overhead <= target),
        "warm_home": not args.cold, "store_init_s": None if t_init != t_init else round(t_init, 2),
    }))


if __name__ == "__main__":
    main()
