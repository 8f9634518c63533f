"""The trunk's encoder options against references written from torch primitives (float64), and the
encoder models' contracts. Parity with transformers' BERT / RoBERTa / DistilBERT is in
tests/unit/selfattn/io/test_hf_encoders.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfattn.config import ModelConfig
from selfattn.io.checkpoint import load_pretrained, save_pretrained
from selfattn.nn.layers import TransformerBlock
from selfattn.nn.models import DecoderLM, Encoder, MaskedLM, SequenceClassifier

BERT_LIKE = dict(vocab_size=50, context_length=16, n_layers=2, d_model=16, n_heads=2, d_ff=24, bias=True, position="learned",
                 norm="layernorm", norm_eps=1e-12, mlp="gelu", norm_position="post", embedding_norm=True, type_vocab_size=2)  # fmt: skip


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def test_post_norm_block_is_the_norm_of_each_residual_sum():
    torch.manual_seed(0)
    block = _perturbed(TransformerBlock(ModelConfig(**BERT_LIKE))).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    a = block.attn

    def heads(t):  # [B, T, D] -> [B, H, T, hd]
        return t.view(2, 5, 2, 8).transpose(1, 2)

    q, k, v = heads(F.linear(x, a.q_proj.weight, a.q_proj.bias)), heads(F.linear(x, a.k_proj.weight, a.k_proj.bias)), heads(F.linear(x, a.v_proj.weight, a.v_proj.bias))
    scores = (q @ k.transpose(-1, -2)) / 8**0.5
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))  # padded keys out, every query kept
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, 16)
    n1, n2 = block.norm1, block.norm2
    h = F.layer_norm(x + F.linear(attn, a.out_proj.weight, a.out_proj.bias), (16,), n1.weight, n1.bias, 1e-12)
    up = F.gelu(F.linear(h, block.mlp.up_proj.weight, block.mlp.up_proj.bias))  # exact erf GELU
    want = F.layer_norm(h + F.linear(up, block.mlp.down_proj.weight, block.mlp.down_proj.bias), (16,), n2.weight, n2.bias, 1e-12)
    with torch.no_grad():
        got = block(x, attention_mask=mask, is_causal=False)
    assert (got - want).abs().max().item() < 1e-12


def test_embeddings_sum_token_type_and_position_rows_then_normalise():
    model = _perturbed(Encoder(BERT_LIKE)).double()
    ids = torch.tensor([[3, 7, 9, 4]])
    types = torch.tensor([[0, 0, 1, 1]])
    raw = model.tok_emb.weight[ids] + model.type_emb.weight[types] + model.pos_emb.embedding.weight[:4]
    want = F.layer_norm(raw, (16,), model.emb_norm.weight, model.emb_norm.bias, 1e-12)
    with torch.no_grad():
        assert (model._embed(ids, types, 0) - want).abs().max().item() < 1e-12
        zeros = model(ids, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        assert torch.equal(model(ids).last_hidden_state, zeros)  # no ids = every id 0, row 0 still added


def test_roberta_positions_count_real_tokens_from_the_offset():
    cfg = {**BERT_LIKE, "pad_token_id": 1, "position_offset": 2, "type_vocab_size": 1}
    model = _perturbed(Encoder(cfg)).double()
    assert model.pos_emb.embedding.weight.shape[0] == 16 + 2
    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])  # <s> x y </s> <pad> <pad>
    rows = torch.tensor([2, 3, 4, 5, 1, 1])  # real tokens from pad+1, padding at pad
    raw = model.tok_emb.weight[ids] + model.type_emb.weight[0] + model.pos_emb.embedding.weight[rows]
    want = F.layer_norm(raw, (16,), model.emb_norm.weight, model.emb_norm.bias, 1e-12)
    with torch.no_grad():
        assert (model._embed(ids, None, 0) - want).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="position_offset .* needs position='learned'"):
        ModelConfig(**{**cfg, "position": "rope"})
    with pytest.raises(ValueError, match="DecoderLM takes no position_offset"):
        DecoderLM(cfg)


def test_padding_never_reaches_a_real_token():
    model = _perturbed(Encoder(BERT_LIKE))
    ids = torch.tensor([[3, 7, 9, 4, 0, 0], [3, 7, 9, 4, 11, 12]])
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 4 + [False] * 2])  # same real tokens, different padding
    with torch.no_grad():
        h = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[:1, :4]).last_hidden_state
    assert torch.allclose(h[0, :4], h[1, :4], atol=1e-6) and torch.allclose(h[0, :4], alone[0], atol=1e-6)


def test_masked_lm_head_on_labelled_rows_is_the_full_head_there():
    model = _perturbed(MaskedLM(BERT_LIKE))
    assert model.mlm_head.decoder.weight is model.tok_emb.weight and model.mlm_head.decoder.bias is not None
    ids = torch.randint(4, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[0, 2], labels[1, 5] = 9, 17
    with torch.no_grad():
        full = model(ids).logits  # [B, T, V]
        out = model(ids, labels=labels)
    assert full.shape == (2, 7, 50) and out.logits.shape == (2, 50)
    assert torch.allclose(out.logits, full[labels != -100], atol=1e-6)
    assert out.loss.item() == pytest.approx(F.cross_entropy(full[labels != -100], labels[labels != -100]).item(), abs=1e-6)
    nothing = model(ids, labels=torch.full_like(ids, -100))
    assert nothing.loss.item() == 0.0 and nothing.loss.requires_grad


def test_from_encoder_keeps_drops_or_starts_the_pooler():
    enc = _perturbed(Encoder({**BERT_LIKE, "pooler": "tanh"}))
    first = SequenceClassifier.from_encoder(enc, 3, pooling="first")
    assert torch.equal(first.pooler.weight, enc.pooler.weight) and first.cfg.pooler == "tanh"
    mean = SequenceClassifier.from_encoder(enc, 3, pooling="mean")
    assert mean.pooler is None and mean.cfg.pooler == "none"
    new = SequenceClassifier.from_encoder(Encoder(BERT_LIKE), 3, pooling="first", pooler="relu")
    assert new.cfg.pooler == "relu" and new.pooler is not None
    with pytest.raises(ValueError, match="no pooler"):
        SequenceClassifier.from_encoder(Encoder(BERT_LIKE), 3, pooler=True)
    with pytest.raises(ValueError, match="use from_decoder"):
        SequenceClassifier.from_encoder(DecoderLM({"vocab_size": 50, "d_model": 16, "n_heads": 2}), 2)
    ids = torch.tensor([[3, 7, 9]])
    with torch.no_grad():
        pooled = torch.tanh(enc.pooler(enc(ids).last_hidden_state[:, 0]))
        assert torch.allclose(enc(ids).pooler_output, pooled)
        assert torch.allclose(first(ids).logits, first.head(pooled), atol=1e-6)


@pytest.mark.parametrize("cls", [Encoder, MaskedLM])
def test_encoder_checkpoints_round_trip(cls, tmp_path):
    model = _perturbed(cls({**BERT_LIKE, "pooler": "tanh" if cls is Encoder else "none"}))
    save_pretrained(model, tmp_path / "m")
    pre = load_pretrained(tmp_path / "m")
    assert type(pre.model) is cls and pre.task == ("encoder" if cls is Encoder else "mlm")
    ids = torch.tensor([[3, 7, 9, 4]])
    with torch.no_grad():
        a, b = model(ids), pre.model(ids)
    assert torch.equal(a.logits, b.logits) if cls is MaskedLM else torch.equal(a.last_hidden_state, b.last_hidden_state)
    if cls is MaskedLM:
        assert pre.model.mlm_head.decoder.weight is pre.model.tok_emb.weight
