"""DecoderLM and SequenceClassifier: KV-cache decoding, generation, pooling, init, param groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfattn.config import ModelConfig
from selfattn.nn.layers import RMSNorm
from selfattn.nn.models import (
    DecoderLM,
    ModelOutput,
    SequenceClassifier,
    build_classifier,
    build_decoder_lm,
    num_parameters,
    param_groups,
    pool,
    sample_next_token,
)

V = 61


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, context_length=32, n_layers=2, d_model=32, n_heads=4)
    base.update(kw)
    return ModelConfig(**base)


def _lm(seed: int = 0, **kw) -> DecoderLM:
    torch.manual_seed(seed)
    return DecoderLM(_cfg(**kw)).eval()


# --------------------------------------------------------------------------- KV cache & generation

CACHE_CASES = {
    "rope": dict(position="rope"),
    "learned": dict(position="learned"),
    "alibi": dict(position="alibi"),
    "gqa": dict(position="rope", n_kv_heads=2),
    "mqa-rmsnorm-swiglu": dict(position="rope", n_kv_heads=1, norm="rmsnorm", mlp="swiglu"),
    "sliding-window": dict(position="rope", attention="sliding_window", window=3),
    # Qwen3's shape: heads wider than d_model / n_heads, per-head q/k RMSNorm, GQA
    "wide-heads-qk-norm": dict(position="rope", n_kv_heads=2, head_size=16, qk_norm=True, norm="rmsnorm", mlp="swiglu"),
    "llama3-rope-scaling": dict(position="rope", rope_scaling=dict(kind="llama3", factor=8, low_freq_factor=1, high_freq_factor=4, original_context_length=8)),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_kv_cache_decoding_matches_full_forward(case):
    model = _lm(**CACHE_CASES[case])
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    full = model(ids).logits  # [2, 12, V]
    cache = model.new_kv_cache(batch_size=2)
    pieces = [model(ids[:, :5], kv_cache=cache).logits]  # prefill
    for t in range(5, 12):
        pieces.append(model(ids[:, t : t + 1], kv_cache=cache).logits)
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generate_matches_argmax_of_full_forward():
    model = _lm(position="learned", n_kv_heads=2)
    prompt = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(2))
    out = model.generate(prompt, max_new_tokens=10, top_k=1)
    assert out.shape == (2, 14)
    assert torch.equal(out[:, :4], prompt)
    logits = model(out[:, :-1]).logits  # [2, 13, V]
    assert torch.equal(logits[:, 3:].argmax(-1), out[:, 4:])
    assert torch.equal(model.generate(prompt, max_new_tokens=10, temperature=0.0), out)


def test_sampling_is_deterministic_with_a_seeded_generator():
    model = _lm()
    prompt = torch.zeros(3, 2, dtype=torch.long)
    kw = dict(max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.95)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(prompt, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_generate_restores_training_mode_and_stops_at_eos():
    model = _lm()
    model.train()
    prompt = torch.tensor([[5, 6, 7]])
    greedy = model.generate(prompt, max_new_tokens=6, top_k=1)
    assert model.training
    eos = int(greedy[0, 5])  # the third generated token
    first_eos = int((greedy[0, 3:] == eos).nonzero()[0])
    stopped = model.generate(prompt, max_new_tokens=6, top_k=1, eos_id=eos)
    assert torch.equal(stopped, greedy[:, : 3 + first_eos + 1])  # stops right after eos


def test_generate_refuses_past_context_length():
    model = _lm()
    with pytest.raises(ValueError, match=r"prompt length \(30\) \+ max_new_tokens \(5\) = 35 exceeds context_length \(32\)"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=5)
    with pytest.raises(ValueError, match=r"top_p \(1.5\)"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, top_p=1.5)
    with pytest.raises(ValueError, match="exceeds context_length"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_sample_next_token_top_k_top_p_and_temperature():
    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log().expand(2000, 4)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits[:3], temperature=0.0), torch.ones(3, dtype=torch.long))
    top2 = sample_next_token(logits, top_k=2, generator=gen)
    assert set(top2.tolist()) == {1, 2}
    nucleus = sample_next_token(logits, top_p=0.7, generator=gen)  # 0.5 + 0.3 reaches 0.7
    assert set(nucleus.tolist()) == {1, 2}
    assert set(sample_next_token(logits, top_p=0.5, generator=gen).tolist()) == {1}
    # plain sampling follows the distribution
    counts = torch.bincount(sample_next_token(logits, generator=gen), minlength=4).float() / 2000
    torch.testing.assert_close(counts, probs[0], atol=0.04, rtol=0)
    # a high temperature flattens it
    hot = torch.bincount(sample_next_token(logits, temperature=100.0, generator=gen), minlength=4).float() / 2000
    assert hot.min() > 0.18


# --------------------------------------------------------------------------- LM basics


def test_lm_loss_is_cross_entropy_with_ignore_index():
    model = _lm()
    ids = torch.randint(0, V, (2, 8))
    targets = torch.randint(0, V, (2, 8))
    targets[0, :3] = -100
    out = model(ids, targets=targets)
    assert isinstance(out, ModelOutput) and out.logits.shape == (2, 8, V) and out.attentions is None
    keep = targets != -100
    manual = -F.log_softmax(out.logits.double(), -1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(out.loss.double(), manual, atol=1e-6, rtol=1e-6)
    # at init the loss is close to uniform guessing
    assert abs(out.loss.item() - math.log(V)) < 0.3


def test_lm_is_causal():
    model = _lm()
    ids = torch.randint(0, V, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % V
    torch.testing.assert_close(model(ids).logits[:, :6], model(changed).logits[:, :6])


def test_gpt2_init_and_tied_embeddings():
    model = _lm(d_model=64, n_layers=2)
    assert model.lm_head.weight is model.tok_emb.weight
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.002
    residual = 0.02 / math.sqrt(2 * 2)
    assert abs(model.blocks[1].attn.out_proj.weight.std().item() - residual) < 0.1 * residual
    assert abs(model.blocks[1].mlp.down_proj.weight.std().item() - residual) < 0.1 * residual
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 0.002
    untied = _lm(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert num_parameters(untied) == num_parameters(_lm()) + V * 32


def test_lm_rejects_low_rank_attention():
    with pytest.raises(ValueError, match="low_rank"):
        DecoderLM(_cfg(attention="low_rank", low_rank_k=8))


def test_tiny_lm_learns_a_repeating_sequence():
    model = _lm(dropout=0.0)
    model.train()
    seq = torch.arange(10).repeat(4)[None, :33] % V  # 0..9 repeated
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)
    first = model(x, targets=y).loss.item()
    for _ in range(60):
        loss = model(x, targets=y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2 * first
    model.eval()
    out = model.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=6, top_k=1)
    assert out[0].tolist() == [3, 4, 5, 6, 7, 8, 9, 0, 1]


# --------------------------------------------------------------------------- classifier


def test_pool_modes():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[True, True, True, False], [False, True, True, False]])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.stack([h[0, :3].mean(0), h[1, 1:3].mean(0)]))
    torch.testing.assert_close(pool(h, mask, "last"), torch.stack([h[0, 2], h[1, 2]]))
    torch.testing.assert_close(pool(h, mask, "first"), torch.stack([h[0, 0], h[1, 1]]))
    torch.testing.assert_close(pool(-h, mask, "max"), torch.stack([-h[0, 0], -h[1, 1]]))  # padding never wins
    empty = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.equal(pool(h, empty, "mean"), torch.zeros(2, 3))
    assert torch.equal(pool(h, empty, "max"), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="pooling"):
        pool(h, mask, "sum")


@pytest.mark.parametrize("pooling", ["mean", "max", "last", "first"])
@pytest.mark.parametrize("causal", [False, True])
def test_classifier_ignores_right_padding(pooling, causal):
    torch.manual_seed(0)
    clf = SequenceClassifier(_cfg(n_classes=3, position="learned"), pooling=pooling, causal=causal).eval()
    assert clf.pooling == pooling and clf.causal == causal and clf.cfg.causal == causal
    short = torch.randint(4, V, (1, 5))
    padded = torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    alone = clf(short).logits
    batched = clf(torch.cat([padded, torch.randint(4, V, (1, 8))]), torch.cat([mask, torch.ones(1, 8, dtype=torch.bool)]))
    assert batched.logits.shape == (2, 3)
    torch.testing.assert_close(batched.logits[:1], alone, atol=1e-5, rtol=1e-5)


def test_classifier_is_bidirectional_by_default_and_has_a_loss():
    torch.manual_seed(0)
    clf = build_classifier(_cfg(n_classes=2))
    assert clf.cfg.causal is False and clf.pooling == "mean"
    ids = torch.randint(0, V, (2, 6))
    out = clf(ids, labels=torch.tensor([0, 1]), return_attention=True)
    assert len(out.attentions) == 2 and torch.all(out.attentions[0] > 0)  # no causal zeros
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="n_classes"):
        SequenceClassifier(_cfg())


def test_from_decoder_copies_the_trunk_and_adds_a_new_head():
    lm = _lm(seed=3)
    clf = SequenceClassifier.from_decoder(lm, n_classes=4)
    assert clf.cfg.n_classes == 4 and clf.pooling == "last" and clf.causal is True
    lm_state, clf_state = lm.state_dict(), clf.state_dict()
    trunk = [k for k in clf_state if not k.startswith("head")]
    assert trunk and all(torch.equal(clf_state[k], lm_state[k]) for k in trunk)
    assert {k for k in clf_state if k.startswith("head")} == {"head.weight", "head.bias"}
    assert not any(k.startswith("head") for k in lm_state)
    assert clf.tok_emb.weight.data_ptr() != lm.tok_emb.weight.data_ptr()  # a copy, not shared
    # with causal attention and last-token pooling, the pooled state is the LM's last hidden state
    ids = torch.randint(0, V, (2, 7))
    h_lm, _ = lm._hidden_states(ids, attention_mask=None, is_causal=True, kv_cache=None, return_attention=False)
    expected = clf.head(h_lm[:, -1])
    torch.testing.assert_close(clf.eval()(ids).logits, expected)
    bidir = SequenceClassifier.from_decoder(lm, n_classes=2, pooling="mean", causal=False, dropout=0.1)
    assert bidir.cfg.dropout == 0.1 and bidir.causal is False


def test_param_groups_split_decay_and_no_decay():
    model = build_decoder_lm(_cfg(bias=True, position="learned"))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(model.blocks[0].attn.q_proj.weight) in ids(decay)
    assert id(model.blocks[0].mlp.down_proj.weight) in ids(decay)
    for p in (model.tok_emb.weight, model.pos_emb.embedding.weight, model.norm_f.weight, model.blocks[0].attn.q_proj.bias):
        assert id(p) in ids(no_decay)
    assert not ids(decay) & ids(no_decay)
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == num_parameters(model)  # the tied lm_head counted once
    rms = build_decoder_lm(_cfg(norm="rmsnorm"))
    norms = [m.weight for m in rms.modules() if isinstance(m, RMSNorm)]
    assert norms and all(id(w) in ids(param_groups(rms, 0.1)[1]) for w in norms)
    torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3)  # usable as is
