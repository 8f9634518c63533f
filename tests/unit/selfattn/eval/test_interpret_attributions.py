"""Token attributions: completeness of integrated gradients (float64), stochastic rollout rows,
zeros on padding, batched == one at a time, clear refusals, bounded long and empty texts."""

from __future__ import annotations

import pytest
import torch

from selfattn.config import ModelConfig
from selfattn.data.tokenization import BPETokenizer, CharTokenizer
from selfattn.errors import UserError
from selfattn.eval.interpret import (
    METHODS,
    attention_rollout,
    attention_scores,
    explain,
    gradient_x_input,
    integrated_gradients,
    score_colour,
)
from selfattn.nn.models import DecoderLM, SequenceClassifier

TEXTS = ["a gripping , beautifully acted film .", "a dull , lifeless mess .", "not good", "fun"]


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train(TEXTS)


def _classifier(vocab_size: int, *, seed: int = 0, dtype=torch.float64, **kw) -> SequenceClassifier:
    cfg = dict(vocab_size=vocab_size, context_length=48, n_layers=2, d_model=32, n_heads=4, n_classes=2)
    cfg.update(kw)
    torch.manual_seed(seed)
    model = SequenceClassifier(ModelConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():  # a random head gives p ~ 0.5 everywhere; scale it so the outputs differ
        model.head.weight.mul_(60.0)
    return model


def _batch(tok, texts):
    ids = [tok.encode(t) for t in texts]
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), tok.pad_id)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = True
    return input_ids, mask


def _prob(model, input_ids, mask, target, temperature=1.0):
    with torch.no_grad():
        return (model(input_ids, mask).logits / temperature).softmax(-1)[torch.arange(len(target)), target]


def test_integrated_gradients_are_complete_in_float64(tok):
    model = _classifier(tok.vocab_size)
    input_ids, mask = _batch(tok, TEXTS)
    target = torch.tensor([1, 0, 1, 0])
    scores, delta = integrated_gradients(model, input_ids, mask, target, steps=64, baseline_id=tok.pad_id)
    # reference f(x) - f(baseline): the baseline is <pad> at every real position, mask unchanged
    baseline_ids = torch.where(mask, torch.full_like(input_ids, tok.pad_id), input_ids)
    gap = _prob(model, input_ids, mask, target) - _prob(model, baseline_ids, mask, target)
    assert torch.all(gap.abs() > 0.05)  # the check below is not trivially met
    total = scores.sum(-1)
    assert torch.all((total - gap).abs() <= 0.01 * gap.abs()), (total, gap)
    torch.testing.assert_close(delta, gap - total)
    # one quadrature node is a poor integral: completeness is a property of enough steps
    coarse, _ = integrated_gradients(model, input_ids, mask, target, steps=1, baseline_id=tok.pad_id)
    assert (coarse.sum(-1) - gap).abs().max() > 0.01 * gap.abs().min()


def test_a_calibrated_models_attributions_explain_its_served_probabilities(tok):
    """With the checkpoint's temperature, ``probs`` are softmax(logits / T) and integrated gradients sum
    to the change of that probability (what a calibrated model serves), not of the raw softmax."""
    model = _classifier(tok.vocab_size)
    input_ids, mask = _batch(tok, TEXTS)
    target = torch.tensor([1, 0, 1, 0])
    baseline_ids = torch.where(mask, torch.full_like(input_ids, tok.pad_id), input_ids)
    t = 2.5
    scores, delta = integrated_gradients(model, input_ids, mask, target, steps=64, baseline_id=tok.pad_id, temperature=t)
    gap_t = _prob(model, input_ids, mask, target, t) - _prob(model, baseline_ids, mask, target, t)
    gap_1 = _prob(model, input_ids, mask, target) - _prob(model, baseline_ids, mask, target)
    assert torch.all((gap_t - gap_1).abs() > 0.01)  # the two probabilities differ: the check can fail
    assert torch.all((scores.sum(-1) - gap_t).abs() <= 0.01 * gap_t.abs()), (scores.sum(-1), gap_t)
    torch.testing.assert_close(delta, gap_t - scores.sum(-1))

    [raw] = explain(model, tok, TEXTS[:1], method="gradient_x_input")
    [cal] = explain(model, tok, TEXTS[:1], method="gradient_x_input", temperature=t)
    with torch.no_grad():
        logits = model(*_batch(tok, TEXTS[:1])).logits[0]
    assert cal.probs == pytest.approx((logits / t).softmax(-1).tolist()) and raw.probs == pytest.approx(logits.softmax(-1).tolist())
    assert cal.target == raw.target and cal.scores != pytest.approx(raw.scores)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            explain(model, tok, TEXTS[:1], temperature=bad)


def test_integrated_gradients_chunking_and_unk_baseline(tok):
    model = _classifier(tok.vocab_size)
    input_ids, mask = _batch(tok, TEXTS[:2])
    target = torch.tensor([0, 1])
    whole, _ = integrated_gradients(model, input_ids, mask, target, steps=8, max_rows=512)
    rowwise, _ = integrated_gradients(model, input_ids, mask, target, steps=8, max_rows=3)  # chunks split texts
    torch.testing.assert_close(whole, rowwise)
    unk, delta = integrated_gradients(model, input_ids, mask, target, steps=64, baseline_id=tok.unk_id)
    assert not torch.allclose(unk, whole)
    base_ids = torch.where(mask, torch.full_like(input_ids, tok.unk_id), input_ids)
    gap = _prob(model, input_ids, mask, target) - _prob(model, base_ids, mask, target)
    assert torch.all((unk.sum(-1) - gap).abs() <= 0.01 * gap.abs())
    assert not any(p.grad is not None for p in model.parameters())  # attributions leave no .grad behind


def test_rollout_rows_are_distributions_and_match_a_hand_product(tok):
    torch.manual_seed(0)
    maps = [torch.rand(2, 4, 5, 5).softmax(-1) for _ in range(3)]  # 3 layers x [B, H, T, T]
    rollout = attention_rollout(maps)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 5, dtype=torch.float64))
    expected = torch.eye(5, dtype=torch.float64)
    for a in maps:  # Abnar & Zuidema: residual added, rows renormalised, layers multiplied (later on the left)
        a_hat = 0.5 * a[1].double().mean(0) + 0.5 * torch.eye(5, dtype=torch.float64)
        expected = (a_hat / a_hat.sum(-1, keepdim=True)) @ expected
    torch.testing.assert_close(rollout[1], expected)

    model = _classifier(tok.vocab_size, dtype=torch.float32)
    input_ids, mask = _batch(tok, TEXTS)
    with torch.no_grad():
        out = model(input_ids, mask, return_attention=True)
    real = attention_rollout(out.attentions, mask)
    torch.testing.assert_close(real.sum(-1), torch.ones(4, input_ids.shape[1], dtype=torch.float64))
    scores = attention_scores(model, input_ids, mask, "attention_rollout")
    torch.testing.assert_close(scores.sum(-1), torch.ones(4, dtype=torch.float64))  # mean pooling: a distribution


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_zero_on_padding_and_batched_equals_one_at_a_time(tok, method, pooling):
    model = _classifier(tok.vocab_size, pooling=pooling, position="learned")
    batched = explain(model, tok, TEXTS, method=method, steps=6, batch_size=4)
    single = [explain(model, tok, [t], method=method, steps=6)[0] for t in TEXTS]
    for b, s in zip(batched, single):
        assert b.target == s.target and len(b.scores) == len(s.text)
        assert b.scores == pytest.approx(s.scores, abs=1e-9)
    input_ids, mask = _batch(tok, TEXTS)
    target = torch.tensor([0, 1, 0, 1])
    if method == "integrated_gradients":
        scores = integrated_gradients(model, input_ids, mask, target, steps=8)[0]
    elif method == "gradient_x_input":
        scores = gradient_x_input(model, input_ids, mask, target)
    else:
        scores = attention_scores(model, input_ids, mask, method)
    assert mask.sum() < mask.numel()  # the batch really is padded
    assert torch.all(scores[~mask] == 0)
    assert torch.all(scores[mask].abs().sum() > 0)


def test_gradient_x_input_matches_finite_differences_direction(tok):
    """grad . x against a float64 central difference of p along each token's embedding."""
    model = _classifier(tok.vocab_size)
    input_ids, mask = _batch(tok, ["not good"])
    target = torch.tensor([1])
    scores = gradient_x_input(model, input_ids, mask, target)[0]
    emb = model.tok_emb(input_ids).detach()
    from selfattn.eval.interpret import _embeddings_replaced

    eps = 1e-6
    for t in (0, 4, 7):
        step = torch.zeros_like(emb)
        step[0, t] = emb[0, t] * eps
        with torch.no_grad():
            with _embeddings_replaced(model, emb + step):
                up = model(input_ids, mask).logits.softmax(-1)[0, 1]
            with _embeddings_replaced(model, emb - step):
                down = model(input_ids, mask).logits.softmax(-1)[0, 1]
        assert float(scores[t]) == pytest.approx(float((up - down) / (2 * eps)), rel=1e-4, abs=1e-10)


def test_methods_refuse_models_they_cannot_explain(tok):
    lm = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, context_length=16, n_layers=1, d_model=32, n_heads=2))
    with pytest.raises(UserError, match=r"integrated_gradients.*language model \(DecoderLM\)"):
        explain(lm, tok, ["fun"])
    clf = _classifier(tok.vocab_size)
    with pytest.raises(UserError, match=r"attention_rollout.*ensemble of 2 models"):
        explain([clf, clf], tok, ["fun"], method="attention_rollout")
    low_rank = _classifier(tok.vocab_size, attention="low_rank", low_rank_k=4, position="none")
    with pytest.raises(UserError, match=r"attention_last.*low_rank"):
        explain(low_rank, tok, ["fun"], method="attention_last")
    assert len(explain(low_rank, tok, ["fun"], method="gradient_x_input")[0].scores) == 3  # gradients still work
    with pytest.raises(UserError, match="'shap' is unknown"):
        explain(clf, tok, ["fun"], method="shap")
    with pytest.raises(UserError, match=r"steps \(0\)"):
        explain(clf, tok, ["fun"], steps=0)


def test_long_text_is_cut_with_a_note_and_empty_text_gets_none(tok):
    model = _classifier(tok.vocab_size)
    long_text = "fun " * 20_000  # 80k characters: bounded by the context, not the text
    empty, long, short = explain(model, tok, ["", long_text, "fun"], steps=4)
    assert empty.tokens == [] and empty.scores == [] and "empty" in empty.note
    assert len(long.scores) == 48 and "truncated from 80000 to 48 tokens" in long.note
    assert short.note == "" and len(short.scores) == 3
    assert len(explain(model, tok, [long_text], max_tokens=10, steps=4)[0].scores) == 10


def test_bpe_tokens_map_back_to_words():
    bpe = BPETokenizer.train(TEXTS * 5, vocab_size=270)
    model = _classifier(bpe.vocab_size, dtype=torch.float32)
    text = "a  gripping , beautifully acted filmé ."
    [a] = explain(model, bpe, [text], method="integrated_gradients", steps=8)
    assert "".join(a.tokens[i] for i in range(len(a.tokens)) if i == 0 or a.spans[i] != a.spans[i - 1]) == text
    words = a.words()
    assert [w for w, _ in words] == text.split()
    assert sum(s for _, s in words) == pytest.approx(sum(a.scores), abs=1e-9)  # every token lands in one word
    assert a.pairs("word") == [[w, s] for w, s in words]
    assert [t for t, _ in a.pairs()] == a.tokens


def test_char_tokens_group_into_words(tok):
    model = _classifier(tok.vocab_size)
    [a] = explain(model, tok, ["not good"], method="gradient_x_input")
    words = a.words()
    assert [w for w, _ in words] == ["not", "good"]
    # "not" gets its 3 characters; the space (no word of its own) goes to the next word
    assert words[0][1] == pytest.approx(sum(a.scores[:3]))
    assert words[1][1] == pytest.approx(sum(a.scores[3:]))


def test_score_colour():
    assert score_colour(1.0, 1.0) == "#00ff00" and score_colour(-2.0, 1.0) == "#ff0000"
    assert score_colour(0.0, 1.0) == "#ffffff" and score_colour(0.5, 0.0) == "#ffffff"


def test_gradients_work_after_an_inference_mode_forward(tok):
    """RoPE's cos/sin table built under inference_mode (a served prediction) must not break autograd."""
    model = _classifier(tok.vocab_size, position="rope")
    input_ids, mask = _batch(tok, TEXTS)
    with torch.inference_mode():
        before = model(input_ids, mask).logits
    [a] = explain(model, tok, ["not good"], method="integrated_gradients", steps=8)
    assert abs(a.delta) < 0.05 and len(a.scores) == 8
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids, mask).logits, before)


def test_explain_targets_the_predicted_class_unless_told(tok):
    """Default: the class the model predicts (argmax of its probabilities); ``targets`` overrides it per text."""
    model = _classifier(tok.vocab_size)
    input_ids, mask = _batch(tok, TEXTS)
    with torch.no_grad():
        predicted = model(input_ids, mask).logits.argmax(-1).tolist()
    assert len(set(predicted)) == 2  # both classes occur: a wrong default cannot pass by luck
    default = explain(model, tok, TEXTS, method="gradient_x_input", batch_size=3)
    assert [a.target for a in default] == predicted
    assert all(a.target == max(range(2), key=lambda c: a.probs[c]) for a in default)
    flipped = explain(model, tok, TEXTS, method="gradient_x_input", targets=[1 - p for p in predicted], batch_size=3)
    assert [a.target for a in flipped] == [1 - p for p in predicted]
    assert all(f.scores != pytest.approx(d.scores) for f, d in zip(flipped, default))
