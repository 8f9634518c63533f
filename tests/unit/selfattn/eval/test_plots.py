"""Plots write real PNG files and refuse inputs they cannot draw."""

from __future__ import annotations

import pytest

from selfattn.eval.plots import plot_confusion_matrix, plot_learning_curves, plot_reliability_diagram

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 5000


def test_plots_write_png(tmp_path):
    history = [
        {"step": 10, "train_loss": 2.0, "lr": 1e-3},
        {"step": 20, "train_loss": 1.5, "lr": 1e-3},
        {"step": 20, "val_loss": 1.6, "val_accuracy": 0.7},
        {"step": 30, "train_loss": 1.2, "lr": 1e-4},
        {"step": 30, "val_loss": 1.4, "val_accuracy": 0.8},
    ]
    assert _is_png(plot_learning_curves(history, tmp_path / "a" / "curves.png"))
    assert _is_png(plot_confusion_matrix([[5, 1], [2, 7]], ["neg", "pos"], tmp_path / "cm.png"))
    assert _is_png(plot_reliability_diagram([0.9, 0.6, 0.7, 0.95], [1, 0, 1, 1], tmp_path / "rel.png", n_bins=5))


def test_plots_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_learning_curves([], tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not match 3 labels"):
        plot_confusion_matrix([[1, 0], [0, 1]], [0, 1, 2], tmp_path / "x.png")


def test_reliability_title_shows_the_ece_of_metrics_json(tmp_path, monkeypatch):
    """The ECE in the diagram's title is the one evaluation writes to metrics.json (one definition, one bin count)."""
    import json

    import numpy as np

    from selfattn.eval import evaluate, plots

    titles = []
    save = plots._save

    def capture(fig, path):
        titles.extend(ax.get_title() for ax in fig.axes)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    rng = np.random.default_rng(2)
    probs = rng.dirichlet([5.0, 5.0], size=200)  # [N, C]; ECE 0.124 with 10 bins, 0.143 with 15
    y = rng.integers(0, 2, size=200)
    metrics = evaluate._classifier_report(probs, y, 0.5, [0, 1], tmp_path / "plots", texts=None)
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    shown = [t for t in titles if t.startswith("reliability diagram")]
    assert shown == [f"reliability diagram (ECE = {json.loads((tmp_path / 'metrics.json').read_text())['ece']:.3f})"]
    ten_bins = evaluate.expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == y, n_bins=10)
    assert f"{ten_bins:.3f}" != f"{metrics['ece']:.3f}"  # the data tell the bin counts apart
