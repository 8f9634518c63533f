"""The callback interface the engine reports through, and the progress bar.

The engine never imports tracking libraries; ``flows/`` passes callbacks that log to MLflow
and report to Optuna. An exception raised by a callback propagates (that is how a pruned
Optuna trial stops training), except :class:`StopTraining`, which ends training gracefully:
the engine saves a checkpoint and returns a normal result.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


class StopTraining(Exception):
    """Raise from a callback to end training early and cleanly (checkpoint, final eval, result)."""


class Callback:
    """Hooks called by the engine (on the main process only under DDP); all optional."""

    def on_train_start(self, info: dict[str, Any]) -> None:
        """``info``: task, config (dict), n_params, trainable, device, world_size, start_step, max_steps, out_dir."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Every ``train.log_every`` steps: train_loss (mean since last call), lr, grad_norm, tokens_per_s, tokens."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation: val_loss and the task's metrics (val_accuracy, ...)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After a training checkpoint was written atomically to ``path``."""

    def on_train_end(self, result: Any) -> None:
        """With the :class:`~selfattn.train.engine.TrainResult`."""


class ProgressBar(Callback):
    """A tqdm bar with loss, tokens/s and ETA (on stderr)."""

    def __init__(self, *, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None

    def on_train_start(self, info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=info["max_steps"], initial=info["start_step"], desc=info.get("task", "train"), unit="step", file=sys.stderr, dynamic_ncols=True)
        self._last = info["start_step"]

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._last)
        self._last = step
        self._bar.set_postfix(loss=f"{metrics['train_loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            self._bar.write(f"step {step}: {shown}")

    def on_train_end(self, result: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Timer:
    """Wall-clock seconds of training proper (evaluation and checkpointing excluded)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0: float | None = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is not None:
            self.total += time.perf_counter() - self._t0
            self._t0 = None
