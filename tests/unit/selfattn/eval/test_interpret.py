"""Attention maps: recomputed by hand for layer 0, normalised rows, causal zeros, PNG heatmaps."""

from __future__ import annotations

import pytest
import torch

from selfattn.config import ModelConfig
from selfattn.eval.interpret import attention_maps, plot_attention
from selfattn.nn.models import DecoderLM, SequenceClassifier
from selfattn.data.tokenization import BPETokenizer, CharTokenizer

TEXT = "to be or not to be"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tok() -> CharTokenizer:
    return CharTokenizer.train([TEXT])


def _cfg(tok, **kw) -> ModelConfig:
    base = dict(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=4, position="learned")
    base.update(kw)
    return ModelConfig(**base)


def test_lm_maps_match_a_hand_computation(tok):
    torch.manual_seed(0)
    model = DecoderLM(_cfg(tok, n_kv_heads=2))
    model.train()  # attention_maps must switch to eval and back
    tokens, weights = attention_maps(model, tok, TEXT)
    assert model.training
    T = len(TEXT)
    assert tokens == list(TEXT)
    assert weights.shape == (2, 4, T, T)
    # rows are distributions over the allowed keys; nothing above the diagonal for a causal LM
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, T))
    assert torch.all(weights.triu(diagonal=1) == 0)
    lower = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.all(weights[..., lower] > 0)  # every earlier key gets some weight

    # layer 0 recomputed in float64 from the model's own parameters
    m = model.double().eval()
    ids = torch.tensor(tok.encode(TEXT))
    with torch.no_grad():
        x = m.tok_emb(ids) + m.pos_emb(T)  # [T, D]
        h = m.blocks[0].norm1(x)
        attn = m.blocks[0].attn
        q = attn.q_proj(h).view(T, 4, 8).transpose(0, 1)  # [H, T, hd]
        k = attn.k_proj(h).view(T, 2, 8).transpose(0, 1).repeat_interleave(2, dim=0)  # GQA: 2 q heads per kv head
        scores = q @ k.transpose(-1, -2) / 8**0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        expected = scores.softmax(-1)
    torch.testing.assert_close(weights[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_classifier_maps_are_bidirectional_and_bpe_tokens_read_back(tok):
    bpe = BPETokenizer.train([TEXT] * 5, vocab_size=270)
    torch.manual_seed(0)
    clf = SequenceClassifier(_cfg(bpe, n_classes=2, position="rope"))
    tokens, weights = attention_maps(clf, bpe, TEXT)
    assert "".join(tokens) == TEXT
    assert weights.shape == (2, 4, len(tokens), len(tokens))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert torch.all(weights > 0)  # every key visible


def test_long_text_is_cut_to_context_and_low_rank_is_refused(tok):
    model = DecoderLM(_cfg(tok, context_length=8))
    tokens, weights = attention_maps(model, tok, TEXT)
    assert len(tokens) == 8 and weights.shape[-1] == 8
    clf = SequenceClassifier(_cfg(tok, n_classes=2, attention="low_rank", low_rank_k=4, position="none"))
    with pytest.raises(ValueError, match="low_rank"):
        attention_maps(clf, tok, TEXT)


def test_plot_attention_writes_pngs(tmp_path, tok):
    import matplotlib

    backend = matplotlib.get_backend()
    torch.manual_seed(0)
    model = DecoderLM(_cfg(tok))
    tokens, weights = attention_maps(model, tok, "to be\nor")
    grid = plot_attention(tokens, weights, tmp_path / "grid.png")
    single = plot_attention(tokens, weights, tmp_path / "sub" / "l0h1.png", layer=0, head=1)
    for path in (grid, single):
        assert path.read_bytes()[:8] == PNG_MAGIC
    assert single.parent.name == "sub"
    plot_attention(tokens, weights[0, 0], tmp_path / "one.png")  # a single [T, T] map works too
    assert matplotlib.get_backend() == backend  # drawn on an Agg canvas, pyplot's backend untouched
    with pytest.raises(ValueError, match=r"head \(9\)"):
        plot_attention(tokens, weights, tmp_path / "x.png", head=9)
    with pytest.raises(ValueError, match=r"len\(tokens\) \(2\)"):
        plot_attention(tokens[:2], weights, tmp_path / "x.png")
