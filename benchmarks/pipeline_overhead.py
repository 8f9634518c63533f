"""Orchestration overhead: ``selfattn run --config smoke`` vs the same stages called directly.

Both runs use separate SELFATTN_HOMEs with no cached stage and the same config. By default the
orchestrated home's Prefect and MLflow databases are created first, untimed (a nightly job runs
on an existing home); ``--cold`` times the very first run including that (reported either way). The direct
run calls ``flows.stages`` one after the other (data, checks, pretrain, Optuna search, fine-tune,
evaluate) without Prefect and without MLflow; the orchestrated run is the real command (Prefect
ephemeral API, MLflow SQLite store, nested runs, artifacts, model logging, registry, promotion).
Prints both times, the overhead and the ratio, then one JSON line.
Target: overhead <= max(10% of the orchestrated total, 15 s).

Then, on the orchestrated home (every stage now cached), the commands a user repeats: ``selfattn
run`` again (nothing to do: it reports the earlier run; target <= 10 s), the same through the
flows (``--new-run``: a new pipeline run from the cached stages, its peer), and ``selfattn status``
(the embedded API's SQLite file read directly; target <= 2 s) against the same listing through
Prefect's API (a subprocess server started for it, its peer). Each is timed ``--repeat`` times
(default 3); the median is printed.

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


def _timed(cmd: list[str], home: Path, repeat: int) -> float:
    env = {**os.environ, "SELFATTN_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


STATUS_VIA_API = """
import os, sys
from flows.cli import prefect_env, setup_home
from flows.prefect_ops import recent_runs
home = setup_home()
os.environ.update(prefect_env(home))
from prefect import get_client
with get_client(sync_client=True) as client:
    print(len(recent_runs(client, limit=20)))
"""


def repeats(config: str, overrides: list[str], home: Path, repeat: int) -> dict[str, float]:
    """The cached rerun, its through-the-flows peer, status, and its through-the-API peer (medians, s)."""
    run = [sys.executable, "-m", "selfattn.cli", "run", "--config", config]
    for o in overrides:
        run += ["--set", o]
    return {
        "rerun_up_to_date_s": _timed(run, home, repeat),
        "rerun_new_run_s": _timed([*run, "--new-run"], home, repeat),
        "status_s": _timed([sys.executable, "-m", "selfattn.cli", "status"], home, repeat),
        "status_via_api_s": _timed([sys.executable, "-c", STATUS_VIA_API], home, repeat),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="smoke")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--only", choices=["direct", "orchestrated"], default=None, help="run one side only")
    ap.add_argument("--cold", action="store_true", help="time the first run ever (Prefect/MLflow databases created inside the timing)")
    ap.add_argument("--repeat", type=int, default=3, help="timings of each repeated command (median printed); 0 skips them")
    args = ap.parse_args()
    again: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="selfattn-bench-") as tmp:
        # distinct study names are not needed: each side has its own home (own optuna.db)
        t_direct = direct(args.config, args.overrides, Path(tmp) / "direct") if args.only != "orchestrated" else float("nan")
        t_init = float("nan")
        if args.only != "direct":
            if not args.cold:  # a nightly job runs on a home whose stores exist: create them untimed
                t_init = init_stores(args.config, Path(tmp) / "orchestrated")
            t_orch = orchestrated(args.config, args.overrides, Path(tmp) / "orchestrated")
            if args.repeat > 0:
                again = repeats(args.config, args.overrides, Path(tmp) / "orchestrated", args.repeat)
        else:
            t_orch = float("nan")
    overhead = t_orch - t_direct
    target = max(0.10 * t_orch, 15.0)
    print(f"direct (stages only):          {t_direct:8.1f} s")
    print(f"selfattn run (Prefect+MLflow): {t_orch:8.1f} s")
    if t_init == t_init:
        print(f"(store creation on a fresh home, untimed above: {t_init:.1f} s; --cold includes it)")
    print(f"overhead:                      {overhead:8.1f} s  ({overhead / t_orch:.1%} of total, ratio {t_orch / t_direct:.2f}x; target <= {target:.1f} s)")
    if again:
        up, full, st, api = again["rerun_up_to_date_s"], again["rerun_new_run_s"], again["status_s"], again["status_via_api_s"]
        print(f"rerun, every stage cached:     {up:8.1f} s  (through the flows, --new-run: {full:.1f} s; {full / up:.1f}x; target <= 10 s)")
        print(f"selfattn status:               {st:8.2f} s  (through Prefect's API: {api:.1f} s; {api / st:.0f}x; target <= 2 s)")
    print(json.dumps({
        "benchmark": "pipeline_overhead", "config": args.config, "direct_s": round(t_direct, 2), "orchestrated_s": round(t_orch, 2),
        "overhead_s": round(overhead, 2), "overhead_fraction": round(overhead / t_orch, 4), "ratio": round(t_orch / t_direct, 3),
        "target_s": round(target, 2), "within_target": bool(overhead <= target),
        "warm_home": not args.cold, "store_init_s": None if t_init != t_init else round(t_init, 2),
        **{k: round(v, 2) for k, v in again.items()},
    }))


if __name__ == "__main__":
    main()
