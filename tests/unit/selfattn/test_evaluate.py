"""Metrics: ECE against a hand-computed example and a loop reference; accuracy, macro-F1, confusion matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfattn.evaluate import classification_metrics, expected_calibration_error, perplexity, reliability_bins


def test_ece_hand_computed():
    conf = [0.9, 0.8, 0.6, 0.55, 0.95, 0.3]
    correct = [1, 0, 1, 1, 1, 0]
    # bins of width 0.2, (lo, hi]: (0.2,0.4]: {0.3: wrong} gap 0.3; (0.4,0.6]: {0.6, 0.55: right} gap 0.425;
    # (0.6,0.8]: {0.8: wrong} gap 0.8; (0.8,1]: {0.9, 0.95: right} gap 0.075
    expected = (1 * 0.3 + 2 * 0.425 + 1 * 0.8 + 2 * 0.075) / 6
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(expected, abs=1e-12)
    acc, mean_conf, counts, edges = reliability_bins(conf, correct, n_bins=5)
    assert counts.tolist() == [0, 1, 2, 1, 2]
    assert acc.tolist() == [0, 0, 1, 0, 1]
    assert mean_conf[2] == pytest.approx(0.575)


def _ece_loop(conf, correct, n_bins):
    total, n = 0.0, len(conf)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(conf) if (lo < c <= hi) or (b == 0 and c == 0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mc = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - mc)
    return total


def test_ece_matches_loop_reference():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.5, 1.0, 500).round(3).tolist()
    correct = (rng.uniform(size=500) < np.asarray(conf) - 0.1).astype(int).tolist()
    for n_bins in (1, 7, 15):
        assert expected_calibration_error(conf, correct, n_bins=n_bins) == pytest.approx(_ece_loop(conf, correct, n_bins), abs=1e-9)
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0


def test_classification_metrics_against_manual_counts():
    y = [0, 0, 1, 1, 2, 2, 2]
    pred = [0, 1, 1, 1, 2, 0, 2]
    probs = np.full((7, 3), 0.1)
    probs[np.arange(7), pred] = 0.8
    m = classification_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(5 / 7)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 2]]
    f1 = []
    for c in range(3):
        tp = sum(p == c and t == c for p, t in zip(pred, y))
        prec, rec = tp / sum(p == c for p in pred), tp / sum(t == c for t in y)
        f1.append(2 * prec * rec / (prec + rec))
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["ece"] == pytest.approx(abs(5 / 7 - 0.8))  # every confidence 0.8: one bin
    assert m["n"] == 7
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.zeros((3, 2)))


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(65)) == pytest.approx(65)
    assert perplexity(1e4) == float("inf")
