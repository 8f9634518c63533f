"""Plots written next to metrics: learning curves, confusion matrix, reliability diagram.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no global backend
change, nothing on import) and saved as PNG; each function returns the path it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from selfattn.eval.metrics import ECE_BINS, expected_calibration_error, reliability_bins


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(p)
    return p


def plot_learning_curves(history: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Train and val loss against step (log-scale y); val accuracy/F1 on a second axis when present."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        pts = [(h["step"], h[key]) for h in history if key in h and h[key] is not None]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if any("train_loss" in h or "val_loss" in h for h in history):
        ax.set_yscale("log")
    handles, labels = ax.get_legend_handles_labels()
    score_keys = [k for k in ("val_accuracy", "val_f1") if any(k in h for h in history)]
    if score_keys:
        ax2 = ax.twinx()
        for key, color in zip(score_keys, ("tab:green", "tab:red")):
            xs, ys = zip(*[(h["step"], h[key]) for h in history if key in h])
            ax2.plot(xs, ys, "s--", color=color, label=key, markersize=3)
        ax2.set_ylabel("score")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best")
    ax.set_title("learning curves")
    return _save(fig, path)


def plot_confusion_matrix(cm: Sequence[Sequence[int]], labels: Sequence[Any], path: str | Path) -> Path:
    """Counts with true labels on rows and predictions on columns."""
    import numpy as np

    m = np.asarray(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(labels):
        raise ValueError(f"confusion matrix shape {m.shape} does not match {len(labels)} labels")
    fig = _figure(4 + 0.3 * len(labels), 3.5 + 0.3 * len(labels))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(m, cmap="Blues")
    fig.colorbar(im, ax=ax)
    ax.set_xticks(range(len(labels)), [str(x) for x in labels])
    ax.set_yticks(range(len(labels)), [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = m.max() if m.size else 0
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", color="white" if m[i, j] > top / 2 else "black")
    ax.set_title("confusion matrix")
    return _save(fig, path)


def plot_reliability_diagram(confidences: Sequence[float], correct: Sequence[bool], path: str | Path, *, n_bins: int = ECE_BINS, uncalibrated: Sequence[float] | None = None) -> Path:
    """Accuracy per confidence bin against the diagonal, with the bin counts below.

    ``uncalibrated``: the confidences before temperature scaling (same predictions, so the same
    ``correct``), drawn as a line over the calibrated bars, with both ECEs in the title.
    """

    acc, conf, counts, edges = reliability_bins(confidences, correct, n_bins=n_bins)
    ece = expected_calibration_error(confidences, correct, n_bins=n_bins)
    fig = _figure(5, 6)
    ax = fig.add_subplot(2, 1, 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    filled = counts > 0
    ax.bar(centers[filled], acc[filled], width=width * 0.9, edgecolor="black", label="accuracy" if uncalibrated is None else "accuracy after scaling")
    ax.bar(centers[filled], (conf - acc)[filled], bottom=acc[filled], width=width * 0.9, color="red", alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (ECE = {ece:.3f})")
    if uncalibrated is not None:
        acc0, conf0, counts0, _ = reliability_bins(uncalibrated, correct, n_bins=n_bins)
        ece0 = expected_calibration_error(uncalibrated, correct, n_bins=n_bins)
        seen = counts0 > 0
        ax.plot(conf0[seen], acc0[seen], "s-", color="tab:orange", label=f"before scaling (ECE = {ece0:.3f})")
        ax.set_title(f"reliability diagram (ECE {ece0:.3f} -> {ece:.3f} after temperature scaling)", fontsize=9)
    ax.legend(loc="upper left")
    ax2 = fig.add_subplot(2, 1, 2)
    ax2.bar(centers, counts, width=width * 0.9, color="gray")
    if uncalibrated is not None:
        ax2.step(edges[1:], counts0, where="pre", color="tab:orange", label="before scaling")
        ax2.legend(loc="upper left")
    ax2.set_xlim(0, 1)
    ax2.set_xlabel("confidence")
    ax2.set_ylabel("examples")
    return _save(fig, path)
