"""Temperature scaling (Guo et al., 2017): one scalar ``T`` that divides a classifier's logits.

``softmax(z / T)`` keeps every prediction (the argmax does not move) and only changes how sure
the model says it is: ``T > 1`` softens an over-confident model, ``T < 1`` sharpens an
under-confident one. ``T`` is fitted by minimising the negative log-likelihood on held-out rows
(never the set the model is finally scored on) with L-BFGS on ``log T``, so ``T`` stays positive.

The fitted temperature is stored in the checkpoint's ``config.json`` under
``extra.calibration`` (:func:`save_temperature`), so it travels with the weights: the pyfunc and
the evaluation read it back with :func:`temperature_of`. No temperature means ``T = 1``.
This module is plain math and JSON; scoring a checkpoint lives in :mod:`selfattn.eval.evaluate`
(:func:`selfattn.eval.evaluate.calibrate_checkpoint`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

CALIBRATION_KEY = "calibration"
# probabilities below this are clipped before taking logs (float32 softmax underflows near 1e-45)
_MIN_PROB = 1e-45


def logits_from_probs(probs: "np.ndarray") -> "np.ndarray":
    """``log p`` [N, C]: logits up to a per-row constant, which softmax ignores."""
    import numpy as np

    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _MIN_PROB, None))


def scale_probs(probs: "np.ndarray", temperature: float) -> "np.ndarray":
    """``softmax(log p / T)`` [N, C] for class probabilities ``probs`` [N, C]."""
    import numpy as np

    check_temperature(temperature)
    z = logits_from_probs(probs) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: "np.ndarray", labels: Sequence[int], temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` [N] under ``softmax(logits / T)`` (logits [N, C])."""
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(torch.nn.functional.cross_entropy(z, torch.as_tensor(labels, dtype=torch.int64)))


def fit_temperature(logits: "np.ndarray", labels: Sequence[int], *, max_iter: int = 200) -> float:
    """The ``T`` minimising the NLL of ``labels`` [N] under ``softmax(logits [N, C] / T)``.

    L-BFGS on ``log T`` (start ``T = 1``), in float64. The NLL is convex in ``1 / T``, so the
    minimum is unique; with separable data it lies at ``T -> 0`` and ``T`` is clipped to [0.05, 20].
    """
    import torch

    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.int64)
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"logits must be [N, C] with N = len(labels) ({len(y)}) > 0, got {tuple(z.shape)}")
    if (y < 0).any() or (y >= z.shape[1]).any():
        raise ValueError(f"labels must lie in [0, {z.shape[1]}), got values {sorted(set(y.tolist()))[:5]}")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, 0.05), 20.0) if math.isfinite(t) else 1.0


def check_temperature(temperature: float) -> float:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def temperature_of(extra: Mapping[str, Any] | None) -> float:
    """The temperature stored in a checkpoint's ``extra`` (``Pretrained.extra``); 1.0 when none."""
    block = (extra or {}).get(CALIBRATION_KEY) or {}
    if not isinstance(block, Mapping) or "temperature" not in block:
        return 1.0
    return check_temperature(block["temperature"])


def save_temperature(model_dir: str | Path, temperature: float | None, info: Mapping[str, Any] | None = None) -> Path:
    """Store ``temperature`` (and ``info``: where it was fitted, NLL/ECE before and after) in
    ``model_dir/config.json`` under ``extra.calibration``; ``None`` removes it. Atomic rewrite."""
    from selfattn.io.checkpoint import CONFIG_FILE
    from selfattn.utils import atomic_write_text, read_json_object

    path = Path(model_dir) / CONFIG_FILE
    meta = read_json_object(path, missing=f"{model_dir} is not a checkpoint: {CONFIG_FILE} is missing")
    extra = meta.setdefault("extra", {}) or {}
    if temperature is None:
        if CALIBRATION_KEY not in extra:
            return path
        extra.pop(CALIBRATION_KEY)
    else:
        extra[CALIBRATION_KEY] = {"method": "temperature", "temperature": check_temperature(temperature), **dict(info or {})}
    meta["extra"] = extra
    return atomic_write_text(path, json.dumps(meta, indent=2) + "\n")
