"""Temperature scaling: the fit on over-confident logits, identity at T = 1, storage and application."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfattn.eval.calibration import (
    fit_temperature,
    logits_from_probs,
    nll,
    save_temperature,
    scale_probs,
    temperature_of,
)
from selfattn.eval.evaluate import expected_calibration_error


def _overconfident(n: int = 4000, seed: int = 0, true_t: float = 3.0):
    """Labels drawn from softmax(z), logits reported as z * true_t: over-confident by true_t."""
    g = np.random.default_rng(seed)
    z = g.normal(0.0, 1.5, size=(n, 2))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = (g.random(n) < p[:, 1]).astype(np.int64)
    return z * true_t, y


def _ece(probs, y):
    return expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == y)


def test_fit_recovers_temperature_and_lowers_nll_and_ece():
    logits, y = _overconfident()
    t = fit_temperature(logits, y)
    assert t > 1.0 and t == pytest.approx(3.0, rel=0.15)
    assert nll(logits, y, t) < nll(logits, y)
    probs = torch.softmax(torch.as_tensor(logits), dim=-1).numpy()
    assert _ece(scale_probs(probs, t), y) < 0.5 * _ece(probs, y)
    # the fitted T is the NLL minimum: a grid of nearby temperatures is no better
    assert all(nll(logits, y, t) <= nll(logits, y, s) + 1e-9 for s in np.linspace(0.7 * t, 1.3 * t, 13))


def test_underconfident_logits_get_t_below_one():
    logits, y = _overconfident(true_t=0.4)
    assert fit_temperature(logits, y) < 1.0


def test_temperature_one_is_identity_and_argmax_is_kept():
    g = np.random.default_rng(1)
    probs = torch.softmax(torch.as_tensor(g.normal(size=(50, 3))), dim=-1).numpy()
    np.testing.assert_allclose(scale_probs(probs, 1.0), probs, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(scale_probs(probs, 2.5).argmax(axis=1), probs.argmax(axis=1))
    # log-probabilities are logits up to a per-row constant: scaling them equals scaling the logits
    z = torch.as_tensor(g.normal(size=(20, 2)))
    ref = torch.softmax(z / 1.7, dim=-1).numpy()
    np.testing.assert_allclose(scale_probs(torch.softmax(z, dim=-1).numpy(), 1.7), ref, atol=1e-12)
    assert logits_from_probs(np.array([[1.0, 0.0]]))[0, 1] < -100  # no -inf for a zero probability


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="temperature"):
        scale_probs(np.array([[0.5, 0.5]]), 0.0)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        fit_temperature(np.zeros(3), [0, 1, 0])
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((2, 2)), [0, 5])
    assert temperature_of({}) == 1.0 and temperature_of(None) == 1.0
    with pytest.raises(ValueError, match="temperature"):
        temperature_of({"calibration": {"temperature": -1}})


@pytest.fixture()
def tiny_dir(tmp_path):
    from selfattn.io.checkpoint import save_pretrained
    from selfattn.config import ModelConfig
    from selfattn.nn.models import build_classifier
    from selfattn.data.tokenization import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer.train(["a good film .", "a bad film ."])
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=2, n_classes=2, pad_token_id=tok.pad_id)
    return save_pretrained(build_classifier(cfg).eval(), tmp_path / "model", tokenizer=tok, extra={"labels": [0, 1]})


def test_temperature_survives_save_load_and_is_applied_by_predict(tiny_dir):
    from flows.serving import SelfattnClassifier
    from selfattn.io.checkpoint import load_pretrained

    texts = ["a good film .", "a bad film .", "good"]
    raw = SelfattnClassifier().load(str(tiny_dir)).predict_texts(texts)[["prob_0", "prob_1"]].to_numpy()
    save_temperature(tiny_dir, 2.0, {"fitted_on": "unit test"})
    pre = load_pretrained(tiny_dir)  # the layout check still accepts the checkpoint
    assert temperature_of(pre.extra) == 2.0 and pre.extra["labels"] == [0, 1]
    assert json.loads((tiny_dir / "config.json").read_text())["extra"]["calibration"]["fitted_on"] == "unit test"
    served = SelfattnClassifier().load(str(tiny_dir)).predict_texts(texts)[["prob_0", "prob_1"]].to_numpy()
    np.testing.assert_allclose(served, scale_probs(raw, 2.0), atol=1e-6)
    assert not np.allclose(served, raw, atol=1e-4)
    save_temperature(tiny_dir, None)
    assert temperature_of(load_pretrained(tiny_dir).extra) == 1.0


def test_calibrate_checkpoint_fits_on_the_given_rows_and_evaluate_applies_it(tiny_dir, tmp_path, selfattn_home):
    from selfattn.data.config import ClassificationDataConfig
    from selfattn.eval.evaluate import calibrate_checkpoint, evaluate_checkpoint

    rows = ["sentence\tlabel"] + [f"a {'good' if i % 2 else 'bad'} film number {i} .\t{i % 2}" for i in range(40)]
    (tmp_path / "held.tsv").write_text("\n".join(rows) + "\n")
    data = ClassificationDataConfig(train_path=str(tmp_path / "held.tsv"), val_path=str(tmp_path / "held.tsv"), max_length=32)
    report = calibrate_checkpoint(tiny_dir, data, device="cpu")
    assert report["n"] == 40 and report["nll_after"] <= report["nll_before"] + 1e-9
    assert report["fitted_on"] == str(tmp_path / "held.tsv")
    stored = temperature_of(json.loads((tiny_dir / "config.json").read_text())["extra"])
    assert stored == pytest.approx(report["temperature"])
    metrics = evaluate_checkpoint(tiny_dir, str(tmp_path / "held.tsv"), tmp_path / "eval", device="cpu", n_attention_examples=0)
    assert metrics["ece"] == pytest.approx(report["ece_after"]) and metrics["ece_uncalibrated"] == pytest.approx(report["ece_before"])
    assert metrics["loss"] == pytest.approx(report["nll_after"], abs=1e-6)
    assert (tmp_path / "eval" / "plots" / "reliability.png").is_file()
