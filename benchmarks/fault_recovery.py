"""Time lost to a corrupt newest checkpoint and to a full disk, against one checkpoint interval.

    python benchmarks/fault_recovery.py                 # 120 steps, a checkpoint every 40
    python benchmarks/fault_recovery.py --steps 300 --every 100

The same small causal LM (2 layers, 128 dims, 128-token blocks, a synthetic corpus) is trained three times with one seed:

* uninterrupted: the reference wall time and validation loss;
* corrupt: the process dies right after the checkpoint of step ``steps - every``, that newest
  checkpoint is zeroed, and the resume falls back to the previous one;
* disk full: the disk (a tmpfs, so root only; skipped otherwise) fills right after a checkpoint,
  the next checkpoint fails with DiskFull, space is freed, and the same call resumes.

A discarded first run takes first-call costs out of the reference. Time lost = (wall time of the
interrupted run's parts) - (uninterrupted wall time); printed with
the wall time of one checkpoint interval (``every`` steps) and the steps redone. The validation
loss of each recovered run is compared with the reference (records lost: 0 when equal).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from selfattn.errors import DiskFull
from selfattn.train import Callback, PretrainConfig, pretrain
from selfattn.train.checkpoints import STATE_FILE, step_dirs


def _corpus(d: Path) -> Path:
    rng = random.Random(0)
    words = "the a film plot actor scene good bad dull great long short story music".split()
    path = d / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(2000)))
    return path


def _cfg(corpus: Path, steps: int, every: int) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "data": {"path": str(corpus), "block_size": 128},
        "model": {"n_layers": 2, "d_model": 128, "n_heads": 4, "dropout": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"max_steps": steps, "batch_size": 16, "eval_every": steps, "eval_batches": 4, "log_every": 5, "checkpoint_every": every, "progress": False, "seed": 0},
    })  # fmt: skip


class _At(Callback):
    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_checkpoint(self, step, path):
        if step == self.step:
            self.action()


class PowerCut(Exception):
    """The process dies right after a checkpoint (no final evaluation, as after a crash)."""


def _cut():
    raise PowerCut


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--every", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="fault-recovery-"))
    corpus, cfg = None, None
    try:
        corpus = _corpus(tmp)
        cfg = _cfg(corpus, args.steps, args.every)
        pretrain(cfg, tmp / "warmup")  # first-call costs (imports, allocator) out of the reference
        ref, t_ref = _timed(lambda: pretrain(cfg, tmp / "ref"))
        interval_s = t_ref * args.every / args.steps  # training dominates; evaluation happens once at the end
        rows = []

        # corrupt newest checkpoint: the process dies after the checkpoint of step (steps - every), that
        # checkpoint is zeroed, the same call resumes
        last = args.steps - args.every
        t0 = time.perf_counter()
        try:
            pretrain(cfg, tmp / "corrupt", [_At(last, _cut)])
        except PowerCut:
            pass
        t1 = time.perf_counter() - t0
        newest = step_dirs(tmp / "corrupt" / "checkpoints")[0][1] / STATE_FILE
        newest.write_bytes(b"\0" * newest.stat().st_size)
        res, t2 = _timed(lambda: pretrain(cfg, tmp / "corrupt"))
        lost = t1 + t2 - t_ref  # the redone interval plus a second start (data, model, checkpoint check)
        rows.append({"fault": "corrupt newest checkpoint", "steps_redone": args.every, "lost_s": lost,
                     "val_loss_equal": abs(res.metrics["val_loss"] - ref.metrics["val_loss"]) < 1e-6})  # fmt: skip

        # disk full right after a checkpoint: the next one fails, space freed, the same call resumes
        mnt = tmp / "disk"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64M", "tmpfs", str(mnt)], capture_output=True, check=False).returncode == 0:
            try:
                filler = mnt / "filler"

                def fill():
                    with open(filler, "wb") as fh:
                        while (n := shutil.disk_usage(mnt).free - 64 * 1024) > 0:
                            fh.write(b"\0" * min(n, 1 << 20))

                t0 = time.perf_counter()
                try:
                    pretrain(cfg, mnt / "out", [_At(last - args.every, fill)])
                except DiskFull:
                    pass
                filler.unlink()
                res = pretrain(cfg, mnt / "out")
                lost = time.perf_counter() - t0 - t_ref
                rows.append({"fault": "disk full during a checkpoint", "steps_redone": args.every, "lost_s": lost,
                             "val_loss_equal": abs(res.metrics["val_loss"] - ref.metrics["val_loss"]) < 1e-6})  # fmt: skip
            finally:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
        else:
            print("disk full: skipped (cannot mount a tmpfs; needs root)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"cpu: {platform.processor() or platform.machine()}  steps: {args.steps}  checkpoint every {args.every}")
    print(f"uninterrupted: {t_ref:.1f} s; one checkpoint interval ~ {interval_s:.1f} s")
    for r in rows:
        print(f"{r['fault']:32s} redone {r['steps_redone']:4d} steps  lost {r['lost_s']:6.1f} s = {r['lost_s'] / interval_s:.2f} intervals  same val_loss: {r['val_loss_equal']}")
    print(json.dumps({"uninterrupted_s": t_ref, "interval_s": interval_s, "faults": rows}))


if __name__ == "__main__":
    main()
