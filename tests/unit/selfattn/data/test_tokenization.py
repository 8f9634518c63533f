"""Tokenizers: special ids, round trips, JSON-only save/load, real corpus sizes."""

from __future__ import annotations

import json

import pytest

from selfattn.errors import UserError
from selfattn.data.tokenization import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

TEXTS = [
    "hello world, hello there\n",
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld — unicode ✓ and\ttabs",
] * 4


@pytest.fixture(scope="module")
def shakespeare(data_dir) -> str:
    return (data_dir / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


def test_char_specials_and_sorted_vocab():
    tok = CharTokenizer.train(["cab", "ba!"])
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.chars == ["!", "a", "b", "c"]
    assert tok.vocab_size == 8
    assert tok.encode("abc!") == [5, 6, 7, 4]
    assert tok.encode("a", add_bos=True, add_eos=True) == [2, 5, 3]
    assert tok.encode("az") == [5, tok.unk_id]  # unseen char -> <unk>
    assert tok.decode([2, 5, 6, 3, 0]) == "ab"
    assert tok.decode([2, 5, 3], skip_special_tokens=False) == "<bos>a<eos>"
    assert isinstance(tok, Tokenizer)


def test_char_round_trip_and_save_load(tmp_path):
    tok = CharTokenizer.train(TEXTS)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "tok")
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert files == ["vocab.json"]
    json.loads((tmp_path / "tok" / "vocab.json").read_text(encoding="utf-8"))  # plain JSON
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, CharTokenizer)
    assert loaded.kind == "char"
    assert loaded.encode_batch(TEXTS) == tok.encode_batch(TEXTS)


def test_char_tiny_shakespeare_has_65_chars(shakespeare):
    tok = CharTokenizer.train([shakespeare])
    assert len(tok.chars) == 65
    assert tok.vocab_size == 65 + 4
    sample = shakespeare[:2000]
    assert tok.decode(tok.encode(sample)) == sample


def test_bpe_round_trip_specials_and_save_load(tmp_path):
    tok = BPETokenizer.train(TEXTS, vocab_size=300, min_frequency=2)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert 260 <= tok.vocab_size <= 300
    unseen = "never seen: 日本語 ∑ emoji 🙂  double  spaces\n"
    for text in TEXTS + [unseen]:
        ids = tok.encode(text)
        assert tok.unk_id not in ids  # byte-level: every byte has a token
        assert tok.decode(ids) == text
    assert len(tok.encode("hello world")) < len("hello world")  # merges were learned
    with_specials = tok.encode("hello", add_bos=True, add_eos=True)
    assert with_specials[0] == tok.bos_id and with_specials[-1] == tok.eos_id
    assert tok.decode(with_specials) == "hello"
    assert tok.encode_batch(["hello", "fox"]) == [tok.encode("hello"), tok.encode("fox")]

    tok.save(tmp_path / "bpe")
    assert sorted(p.name for p in (tmp_path / "bpe").iterdir()) == ["tokenizer.json"]
    loaded = load_tokenizer(tmp_path / "bpe")
    assert isinstance(loaded, BPETokenizer) and loaded.kind == "bpe"
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode_batch(TEXTS + [unseen]) == tok.encode_batch(TEXTS + [unseen])


def test_bpe_on_real_corpus_compresses(shakespeare):
    text = shakespeare[:100_000]
    tok = BPETokenizer.train(text.splitlines(keepends=True), vocab_size=512)
    assert tok.vocab_size == 512
    held_out = shakespeare[200_000:205_000]
    ids = tok.encode(held_out)
    assert tok.decode(ids) == held_out
    assert len(ids) < 0.6 * len(held_out)  # 512 byte-level tokens give a real compression


def test_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match=r"vocab_size \(100\)"):
        BPETokenizer.train(TEXTS, vocab_size=100)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "vocab.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(tmp_path / "bad")


def test_decode_rejects_out_of_range_ids():
    tok = CharTokenizer.train(["ab"])
    with pytest.raises(ValueError, match="token id 99"):
        tok.decode([99])
