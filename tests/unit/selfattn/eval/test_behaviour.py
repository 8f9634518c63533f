"""Behavioural tests against toy predictors whose answers are known, slices, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from selfattn.eval import behaviour as bh

DEV = [
    "a charming and often affecting journey .",
    "the acting is dull and the plot is predictable .",
    "david lynch made a film that is not boring at all .",
    "it 's a wonderful , funny story with mary at its heart .",
    "unflinchingly bleak and desperate",
    "this is the kind of movie that you do n't need to see twice .",
]


def _fix(word: str, vocab: set[str]) -> str:
    """The vocabulary word one adjacent-letter swap away from ``word`` (typo-robust lookup)."""
    if word in vocab:
        return word
    for j in range(len(word) - 1):
        cand = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
        if cand in vocab:
            return cand
    return word


def rule_predictor(*, negation: bool = True, contrast: bool = True):
    """Lexicon sentiment: the clause after the last "but", a negation within 4 words before flips a word."""
    vocab = set(bh.POSITIVE) | set(bh.NEGATIVE) | set(bh.NEGATION_WORDS) | {"but"}

    def predict(texts):
        out = []
        for t in texts:
            w = [_fix(x, vocab) for x in t.split()]
            if contrast and "but" in w:
                w = w[len(w) - w[::-1].index("but") :]
            score = 0
            for i, x in enumerate(w):
                pol = 1 if x in bh.POSITIVE else -1 if x in bh.NEGATIVE else 0
                if negation and any(y in bh.NEGATION_WORDS for y in w[max(0, i - 4) : i]):
                    pol = -pol
                score += pol
            p = 1 / (1 + np.exp(-3 * score))
            out.append([1 - p, p])
        return np.asarray(out)

    return predict


def _rates(report):
    return {k: r.failure_rate for k, r in report.results.items()}


def test_perfect_rule_predictor_passes_every_test():
    report = bh.run_suite(rule_predictor(), DEV, seed=0, n_per_test=60)
    assert set(report.results) == set(bh.TESTS)
    assert _rates(report) == {t: 0.0 for t in bh.TESTS}
    assert report.results["intensifier"].n > 60  # templates and dev sentences


def test_predictor_ignoring_negation_fails_negation_only():
    rates = _rates(bh.run_suite(rule_predictor(negation=False), DEV, seed=0, n_per_test=60))
    assert rates["negation"] == 1.0
    assert rates["intensifier"] == 0.0 and rates["contrast"] == 0.0 and rates["names"] == 0.0


def test_predictor_ignoring_but_fails_contrast():
    # both clauses count: "dull , but wonderful" sums to zero and ties to class 0 -> wrong on the
    # positive-ending half of the cases
    rates = _rates(bh.run_suite(rule_predictor(contrast=False), DEV, seed=0, n_per_test=80))
    assert 0.3 < rates["contrast"] < 0.7


def test_name_and_typo_sensitive_predictors_fail_invariance():
    def name_biased(texts):  # "mary" makes anything positive
        return np.asarray([[0.0, 1.0] if "mary" in t.split() else [1.0, 0.0] for t in texts])

    report = bh.run_suite(name_biased, DEV, seed=0, n_per_test=400)
    failed = [r for r in report.rows if r["test"] == "names" and r["failed"]]
    assert failed and all(("mary" in r["original"].split()) != ("mary" in r["perturbed"].split()) for r in failed)

    def spelling_bound(texts):  # positive only when every word is a dictionary word of the cases
        vocab = {w for t in DEV for w in t.split()} | {w for c in bh.build_cases(DEV, n_per_test=60) for w in c.original.split()}
        return np.asarray([[0.0, 1.0] if all(w in vocab for w in t.split()) else [1.0, 0.0] for t in texts])

    assert _rates(bh.run_suite(spelling_bound, DEV, seed=0, n_per_test=60))["typos"] == 1.0


def test_cases_are_seeded_and_deterministic():
    a = bh.build_cases(DEV, seed=3, n_per_test=40)
    assert a == bh.build_cases(DEV, seed=3, n_per_test=40)
    assert a != bh.build_cases(DEV, seed=4, n_per_test=40)
    for c in a:
        assert c.original != c.perturbed
        if c.test == "typos":
            assert sorted(c.original) == sorted(c.perturbed) and len(c.original.split()) == len(c.perturbed.split())
        if c.test == "negation":
            assert bh.has_negation(c.perturbed) and not bh.has_negation(c.original)
    assert "it is an excellent film ." in {c.original for c in bh.build_cases(n_per_test=10_000) if c.test == "negation"}
    with pytest.raises(ValueError, match="n_per_test"):
        bh.build_cases(DEV, n_per_test=0)


def test_slices_by_length_and_negation():
    texts = ["not good .", "good", "a b c d e f g h i j k l m n", "never a dull moment in this long film , or so they say ."]
    m = bh.slice_metrics(texts, [True, False, True, True], length_bins=[3, 12])
    assert m["slice.negation.accuracy"] == 1.0 and m["slice.negation.n"] == 2
    assert m["slice.no_negation.accuracy"] == 0.5 and m["slice.no_negation.n"] == 2
    assert m["slice.len_le3.n"] == 2 and m["slice.len_le3.accuracy"] == 0.5
    assert m["slice.len_gt12.n"] == 2 and "slice.len_4_12.n" not in m  # empty slices are left out
    assert bh.slice_names([12, 24]) == ["negation", "no_negation", "len_le12", "len_13_24", "len_gt24"]
    with pytest.raises(ValueError, match="length_bins"):
        bh.slice_names([24, 12])
    assert bh.has_negation("it does n't work") and bh.has_negation("isn't it") and not bh.has_negation("nothingness")


def test_checkpoint_predictor_applies_the_stored_temperature(tmp_path):
    import torch

    from selfattn.eval.calibration import save_temperature, scale_probs
    from selfattn.io.checkpoint import load_pretrained, save_pretrained
    from selfattn.config import ModelConfig
    from selfattn.nn.models import build_classifier
    from selfattn.data.tokenization import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer.train(DEV)
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=2, n_classes=2, pad_token_id=tok.pad_id)
    d = save_pretrained(build_classifier(cfg).eval(), tmp_path / "m", tokenizer=tok)
    raw = bh.checkpoint_predictor(load_pretrained(d))(DEV + [""])
    assert raw.shape == (len(DEV) + 1, 2) and np.allclose(raw.sum(axis=1), 1)
    save_temperature(d, 0.5)
    np.testing.assert_allclose(bh.checkpoint_predictor(load_pretrained(d))(DEV + [""]), scale_probs(raw, 0.5), atol=1e-6)
    report = bh.run_suite(bh.checkpoint_predictor(load_pretrained(d)), DEV, n_per_test=5)
    assert sum(r.n for r in report.results.values()) == len(report.rows) > 0
