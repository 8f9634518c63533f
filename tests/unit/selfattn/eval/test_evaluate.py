"""Metrics: ECE against a hand-computed example and a loop reference; accuracy, macro-F1, confusion matrix."""

from __future__ import annotations

import math

import numpy as np
import pytest

from selfattn.eval.evaluate import classification_metrics, expected_calibration_error, perplexity, reliability_bins


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
    assert m["majority_accuracy"] == pytest.approx(3 / 7)  # class 2 holds 3 of the 7 rows
    with pytest.raises(ValueError, match="probs must be"):
        classification_metrics([0, 1], np.zeros((3, 2)))


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(math.log(65)) == pytest.approx(65)
    assert perplexity(1e4) == float("inf")


@pytest.mark.parametrize("temperature", [None, 2.5])
def test_evaluate_ensemble_is_the_mean_of_member_probabilities(tmp_path, monkeypatch, temperature):
    import torch

    from selfattn.eval.calibration import save_temperature
    from selfattn.io.checkpoint import save_pretrained
    from selfattn.config import ModelConfig
    from selfattn.eval.evaluate import evaluate_ensemble
    from selfattn.nn.models import SequenceClassifier
    from selfattn.data.tokenization import CharTokenizer

    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    texts = ["good film", "bad film", "a fine cast", "dull", "great fun", "awful mess", "so so", "loved it"]
    labels = [1, 0, 1, 0, 1, 0, 0, 1]
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, labels)))
    tok = CharTokenizer.train("".join(texts))
    dirs, probs = [], []
    for seed, pooling in ((0, "mean"), (1, "first"), (2, "max")):
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=16, n_layers=1, d_model=16, n_heads=2, n_classes=2, pooling=pooling)
        clf = SequenceClassifier(cfg).eval()
        with torch.no_grad():
            probs.append(torch.cat([clf(torch.tensor([tok.encode(t)])).logits.softmax(-1) for t in texts]).double())
        dirs.append(save_pretrained(clf, tmp_path / f"m{seed}", tokenizer=tok, extra={"data": {"labels": [0, 1]}}))
    raw_mean = torch.stack(probs).mean(0)
    if temperature is not None:  # member 0 is served temperature-scaled: the ensemble averages that
        save_temperature(dirs[0], temperature)
        probs[0] = (probs[0].log() / temperature).softmax(-1)
    got = evaluate_ensemble(dirs, data, tmp_path / "out", device="cpu")
    mean = torch.stack(probs).mean(0)
    if temperature is not None:
        assert not torch.allclose(mean, raw_mean, atol=1e-3)  # the temperature moved the mean
        assert "ece_uncalibrated" in got
    else:
        assert "ece_uncalibrated" not in got
    y = torch.tensor(labels)
    assert got["n_members"] == 3 and got["n"] == len(texts)
    assert got["accuracy"] == pytest.approx((mean.argmax(-1) == y).double().mean().item())
    assert got["loss"] == pytest.approx(-mean[torch.arange(len(y)), y].log().mean().item(), rel=1e-4)
    for member, p in zip(got["members"], probs):
        assert member["accuracy"] == pytest.approx((p.argmax(-1) == y).double().mean().item())
    assert (tmp_path / "out" / "metrics.json").is_file() and (tmp_path / "out" / "plots" / "reliability.png").is_file()
    from selfattn.eval.evaluate import read_correct

    assert read_correct(tmp_path / "out" / "predictions.tsv").tolist() == (mean.argmax(-1) == y).long().tolist()
    from selfattn.errors import UserError

    with pytest.raises(UserError, match="at least one"):
        evaluate_ensemble([], data, tmp_path / "out")


def test_paired_bootstrap_against_exact_difference():
    from selfattn.eval.evaluate import paired_bootstrap

    rng = np.random.default_rng(1)
    a = (rng.uniform(size=800) < 0.78).astype(int)
    b = a.copy()
    flip = rng.choice(800, size=60, replace=False)
    b[flip[:45]] = 1  # b fixes up to 45 rows, breaks up to 15
    b[flip[45:]] = 0
    got = paired_bootstrap(a, b, n_resamples=4000)
    assert got["diff"] == pytest.approx((b - a).mean())
    assert got["ci_low"] < got["diff"] < got["ci_high"]
    # the interval is about 2 x 1.96 standard errors of the mean paired difference
    se = (b - a).std(ddof=1) / np.sqrt(len(a))
    assert got["ci_high"] - got["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)
    same = paired_bootstrap(a, a, n_resamples=500)
    assert same["diff"] == 0 and same["p_not_better"] == 1.0
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(a, b[:10])
