"""Metrics of plain arrays: perplexity, classification accuracy / macro-F1 / confusion matrix, and
calibration (reliability bins, ECE).

The bottom of the evaluation stack: numpy and scikit-learn only, no models, no plots, so that the
evaluation, the plots and the training engine all compute a number the same way. ``ECE_BINS`` is
the one bin count behind every ECE a user sees (``metrics.json``, the reliability diagram, the
training history).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = ["ECE_BINS", "perplexity", "reliability_bins", "expected_calibration_error", "classification_metrics"]

ECE_BINS = 15  # equal-width confidence bins (Guo et al., 2017 use 15)


def perplexity(loss: float) -> float:
    """``exp(loss)`` (inf when it overflows)."""
    return math.exp(loss) if loss < 700 else float("inf")


def reliability_bins(confidences: Sequence[float], correct: Sequence[bool], *, n_bins: int = ECE_BINS) -> tuple["np.ndarray", "np.ndarray", "np.ndarray", "np.ndarray"]:
    """Per equal-width confidence bin ``(lo, hi]``: accuracy, mean confidence, count, and the edges [n_bins+1]."""
    import numpy as np

    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = np.asarray(confidences, dtype=np.float64)
    ok = np.asarray(correct, dtype=np.float64)
    if conf.shape != ok.shape:
        raise ValueError(f"confidences {conf.shape} and correct {ok.shape} must have the same shape")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bin b holds edges[b] < c <= edges[b+1]; a confidence of exactly 0 goes to the first bin
    which = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(which, minlength=n_bins).astype(np.float64)
    safe = np.maximum(counts, 1)
    acc = np.bincount(which, weights=ok, minlength=n_bins) / safe
    mean_conf = np.bincount(which, weights=conf, minlength=n_bins) / safe
    return acc, mean_conf, counts, edges


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], *, n_bins: int = ECE_BINS) -> float:
    """ECE = sum over bins of ``(n_b / N) * |accuracy_b - confidence_b|`` (Guo et al., 2017)."""
    acc, conf, counts, _ = reliability_bins(confidences, correct, n_bins=n_bins)
    n = counts.sum()
    return float((counts / n * abs(acc - conf)).sum()) if n else 0.0


def classification_metrics(y_true: Sequence[int], probs: "np.ndarray", *, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """accuracy, macro_f1, confusion_matrix (rows = true), ece, n, and majority_accuracy (the accuracy of
    always predicting the most frequent true class: the floor a useful model must beat) from true class
    indices and probs [N, C]."""
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true)
    if p.ndim != 2 or len(p) != len(y):
        raise ValueError(f"probs must be [N, C] with N = len(y_true) ({len(y)}), got {p.shape}")
    pred = p.argmax(axis=1)
    classes = list(range(p.shape[1]))
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        "confusion_matrix": confusion_matrix(y, pred, labels=classes).tolist(),
        "ece": expected_calibration_error(p.max(axis=1), pred == y, n_bins=n_bins),
        "n": int(len(y)),
        "majority_accuracy": float(np.bincount(y, minlength=len(classes)).max() / len(y)) if len(y) else 0.0,
    }
