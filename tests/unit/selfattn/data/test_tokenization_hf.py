"""The tokenizers over HF ``tokenizers`` share one base: special ids, encode (with the post-processor's
template for encoders), decode, save/load keeping the ids and the template."""

from __future__ import annotations

import json

import pytest

from selfattn.data.tokenization import (
    BPETokenizer,
    HFBackedTokenizer,
    HFTokenizer,
    load_tokenizer,
)


@pytest.fixture()
def bert_dir(tmp_path):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "film", "##s", "not"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(tokens[:5])
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_padding(length=12)
    tok.save(str(tmp_path / "tokenizer.json"))
    conf = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(conf))
    return tmp_path


def test_encoder_tokenizer_adds_its_template_and_keeps_it_through_save_and_load(bert_dir, tmp_path):
    tok = HFTokenizer.from_pretrained_dir(bert_dir, template=True)
    assert isinstance(tok, HFBackedTokenizer)
    assert tok.encode("A good films") == [2, 5, 6, 7, 8, 3]  # [CLS] ... [SEP]; the stored padding is off
    assert tok.encode_batch(["not good", "a"]) == [[2, 9, 6, 3], [2, 5, 3]]
    assert tok.encode_with_offsets("a good")[1][0] == (0, 0)  # [CLS] covers no text
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)  # [CLS] / [SEP] stand in
    assert tok.decode(tok.encode("a good films")) == "a good films"
    loaded = load_tokenizer(tok.save(tmp_path / "saved"))
    assert isinstance(loaded, HFTokenizer) and loaded.template and loaded.mask_id == 4
    assert loaded.encode("not a film") == tok.encode("not a film")
    plain = HFTokenizer.from_pretrained_dir(bert_dir)  # decoders never add their template unless asked
    assert plain.encode("a good") == [5, 6] and plain.encode("a", add_bos=True, add_eos=True) == [2, 5, 3]


def test_tokenizers_saved_before_the_template_load_without_it(bert_dir, tmp_path):
    d = HFTokenizer.from_pretrained_dir(bert_dir, template=True).save(tmp_path / "old")
    special = json.loads((d / "special_tokens.json").read_text())
    for k in ("template", "mask_id", "cls_id", "sep_id", "mask_token", "cls_token", "sep_token"):
        special.pop(k)
    (d / "special_tokens.json").write_text(json.dumps(special))
    old = load_tokenizer(d)
    assert not old.template and old.mask_id is None and old.encode("a good") == [5, 6]


def test_bpe_and_imported_tokenizers_share_the_base():
    bpe = BPETokenizer.train(["a good film, a bad film"] * 10, vocab_size=270)
    assert isinstance(bpe, HFBackedTokenizer) and not bpe.template and bpe.mask_id is None
    assert bpe.decode(bpe.encode("a good film")) == "a good film"
    assert bpe.encode_batch(["a", "good"]) == [bpe.encode("a"), bpe.encode("good")]


def test_truncated_training_text_keeps_the_final_sep(bert_dir):
    from selfattn.data.classification import encode_labelled

    tok = HFTokenizer.from_pretrained_dir(bert_dir, template=True)
    data = encode_labelled(["a good film not a good film", "a film"], [1, 0], tok, max_length=5)
    rows = [data.flat[data.offsets[i] : data.offsets[i + 1]].tolist() for i in range(2)]
    assert rows == [[2, 5, 6, 7, 3], [2, 5, 7, 3]]  # [CLS] a good film [SEP], as transformers truncates
    plain = HFTokenizer.from_pretrained_dir(bert_dir)
    cut = encode_labelled(["a good film not a good film"], [1], plain, max_length=3)
    assert cut.flat.tolist() == [5, 6, 7]
