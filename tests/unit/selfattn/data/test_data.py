"""Data loading, path resolution, tokenization cache, LM windows and classification batches."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from selfattn.data.classification import (
    ClassificationBatcher,
    classification_eval_batches,
    encode_labelled,
    prepare_classification_data,
    read_labelled,
    sentence_holdout,
)
from selfattn.data.config import ClassificationDataConfig, LMDataConfig
from selfattn.data.lm import LMBatcher, lm_eval_batches, load_corpus, prepare_lm_data
from selfattn.data.paths import cache_dir, resolve_path
from selfattn.data.tables import load_table
from selfattn.data.tokenization import train_tokenizer
from selfattn.errors import UserError


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _write_tsv(path, rows, header=("sentence", "label")):
    path.write_text("\t".join(header) + "\n" + "".join(f"{s}\t{y}\n" for s, y in rows), encoding="utf-8")
    return path


def test_resolve_path_env_var_and_data_dir(tmp_path, monkeypatch):
    (tmp_path / "sst2").mkdir()
    f = _write_tsv(tmp_path / "sst2" / "train.tsv", [("a", 0)])
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path / "sst2")
    assert resolve_path("${SELFATTN_DATA_DIR}/sst2/train.tsv") == f
    assert resolve_path("sst2/train.tsv") == tmp_path / "sst2" / "train.tsv"  # data_dir-relative
    assert resolve_path("train.tsv").resolve() == f  # cwd-relative
    assert resolve_path("glue") is None  # a hub id
    with pytest.raises(UserError, match="data file not found: 'sst2/nope.tsv'"):
        resolve_path("sst2/nope.tsv")
    monkeypatch.delenv("SELFATTN_DATA_DIR")
    with pytest.raises(UserError, match="environment variable that is not set"):
        resolve_path("${SELFATTN_DATA_DIR}/sst2/train.tsv")


def test_load_table_formats(tmp_path, home):
    rows = [("it 's \"great\"", 1), ("bad , bad", 0)]
    tsv = _write_tsv(tmp_path / "d.tsv", rows)
    csv = tmp_path / "d.csv"
    csv.write_text('sentence,label\n"it \'s ""great""",1\n"bad , bad",0\n')
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in rows))
    import pandas as pd

    pq = tmp_path / "d.parquet"
    pd.DataFrame(rows, columns=["sentence", "label"]).to_parquet(pq)
    for f in (tsv, csv, jsonl, pq):
        ds = load_table(str(f), columns=["sentence", "label"])
        assert ds["sentence"] == [s for s, _ in rows], f
        # delimited files are text cell by cell; JSON and parquet keep their types
        assert list(ds["label"]) == (["1", "0"] if f in (tsv, csv) else [1, 0]), f
    txt = tmp_path / "corpus.txt"
    txt.write_text("line one\nline two\n")
    assert load_table(str(txt))["text"] == ["line one\nline two\n"]  # line breaks kept
    with pytest.raises(UserError, match=r"no column 'text'.*columns are sentence, label"):
        load_table(str(tsv), columns=["text"])


def test_empty_corpus_and_label_errors(tmp_path, home):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UserError, match="empty"):
        load_corpus(LMDataConfig(path=str(empty)))
    f = _write_tsv(tmp_path / "d.tsv", [("good", 1), ("meh", 2), ("bad", 0), ("so so", 2)])
    with pytest.raises(UserError, match=r"outside the configured labels \[0, 1\]: '2' \(2 rows\)"):
        read_labelled(str(f), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    texts, labels = read_labelled(str(f), split="train", text_column="sentence", label_column="label", labels=["0", "1", "2"])
    assert labels == [1, 2, 0, 2]


def test_lm_data_split_cache_and_windows(tmp_path, home):
    txt = tmp_path / "c.txt"
    txt.write_text("abcdefghij" * 50)
    cfg = LMDataConfig(path=str(txt), block_size=8, val_fraction=0.2)
    tok = train_tokenizer("char", [txt.read_text()], 0)
    data = prepare_lm_data(cfg, tok)
    ids = torch.tensor(tok.encode(txt.read_text()))
    assert torch.equal(torch.cat([data.train_ids, data.val_ids]), ids)
    assert len(data.val_ids) == 100
    assert len(list((cache_dir() / "tokens").glob("*.npz"))) == 1
    txt.write_text("zzz" * 10)  # the cache is keyed by file content: a changed file is re-read
    with pytest.raises(UserError, match="too small"):
        prepare_lm_data(cfg, tok)

    b = LMBatcher(ids=data.train_ids, block_size=8, batch_size=4, seed=3)
    x, y = b.get(5)
    assert x.shape == y.shape == (4, 8)
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert torch.equal(b.get(5)[0], LMBatcher(ids=data.train_ids, block_size=8, batch_size=4, seed=3).get(5)[0])
    assert not torch.equal(b.get(5)[0], b.get(6)[0])
    packed = LMBatcher(ids=data.train_ids, block_size=8, batch_size=5, seed=0, sampling="packed")
    starts = torch.cat([packed.offsets(p) for p in range(packed.n_blocks // 5)])
    assert len(set(starts.tolist())) == len(starts) == 45  # 49 blocks, 9 batches of 5: no block twice per epoch
    assert all(s % 8 == 0 for s in starts.tolist())
    full = list(lm_eval_batches(data.val_ids, block_size=8, batch_size=4, n_batches=None))
    assert sum(x.shape[0] for x, _ in full) == (len(data.val_ids) - 1) // 8


def test_classification_batches_pad_mask_and_truncation(tmp_path, home, caplog):
    rows = [("a " * n, n % 2) for n in range(1, 41)]
    f = _write_tsv(tmp_path / "d.tsv", rows)
    tok = train_tokenizer("char", ["a "], 0)
    texts, labels = read_labelled(str(f), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    with caplog.at_level(logging.WARNING):
        data = encode_labelled(texts, labels, tok, max_length=20)
    assert data.n_truncated == sum(len(t) > 20 for t in texts)
    assert f"{data.n_truncated} of 40 sequences are longer than max_length (20 tokens)" in caplog.text
    b = ClassificationBatcher(data=data, batch_size=8, seed=0, pad_id=tok.pad_id, bucket_factor=2)
    seen = []
    for p in range(b.per_epoch):
        batch = b.get(p)
        mask, ids = batch["attention_mask"], batch["input_ids"]
        assert mask.dtype == torch.bool and ids.shape == mask.shape
        assert torch.all(ids[~mask] == tok.pad_id) and torch.all(ids[mask] != tok.pad_id)
        assert mask[:, 0].all() and torch.all(mask.sum(1) == mask.cumprod(1).sum(1))  # right padding
        lengths = mask.sum(1).tolist()
        seen += lengths
        for row, n in zip(ids.tolist(), lengths):
            assert tok.decode(row[:n]) == texts[[len(t) if len(t) <= 20 else 20 for t in texts].index(n)][:n]
    assert sorted(seen) == sorted(data.lengths.tolist())  # 40 / 8 = 5 batches: every example once
    order = [i.tolist() for i, _ in classification_eval_batches(data, batch_size=16, pad_id=0)]
    assert sorted(sum(order, [])) == list(range(40))


def test_prepare_classification_cached_and_val_split(tmp_path, home):
    f = _write_tsv(tmp_path / "d.tsv", [(f"word{i} x", i % 2) for i in range(50)])
    cfg = ClassificationDataConfig(train_path=str(f), val_fraction=0.2, max_length=16)
    tok = train_tokenizer("char", ["word0123456789 x"], 0)
    train, val = prepare_classification_data(cfg, tok)
    assert (len(train), len(val)) == (40, 10)
    train2, val2 = prepare_classification_data(cfg, tok)  # from the cache
    assert torch.equal(train.flat, train2.flat) and torch.equal(val.labels, val2.labels)
    with pytest.raises(UserError, match="no column 'text'"):
        prepare_classification_data(cfg.model_copy(update={"text_column": "text"}), tok)


def test_sentence_holdout_drops_phrases_found_only_in_held_out_sentences():
    # two SST-style trees: each sentence with its sub-phrases (and a duplicate row); "film" is in both
    tree_a = ["a truly great film", "truly great film", "great film", "great", "truly great", "great film"]
    tree_b = ["a dull , tired film", "dull , tired film", "tired film", "dull", "film"]
    texts = tree_a + tree_b
    for seed in range(4):
        train_idx, val_idx = sentence_holdout(texts, val_fraction=0.5, seed=seed)
        assert len(val_idx) == 1
        held = texts[val_idx[0]]
        held_tree, other_tree = (tree_a, tree_b) if held == tree_a[0] else (tree_b, tree_a)
        train = [texts[i] for i in train_idx]
        # everything of the other tree stays; of the held tree only what the other sentence contains too
        assert sorted(train) == sorted(other_tree + [t for t in held_tree if f" {t} " in f" {other_tree[0]} " and t != held])
        assert ("film" in train) and held not in train
    # rows without nested phrases: a plain hold-out of whole rows
    flat = [f"row {i} text" for i in range(20)]
    tr, va = sentence_holdout(flat, val_fraction=0.25)
    assert (len(tr), len(va)) == (15, 5) and not set(tr) & set(va)
    # long documents are refused before any work, naming the alternative
    with pytest.raises(UserError, match="val_holdout='random'"):
        sentence_holdout(["word " * 4000] * 7, val_fraction=0.5)


def test_prepare_classification_sentence_holdout(tmp_path, home):
    rows = [("the best movie of the year", 1), ("best movie", 1), ("the year", 1), ("movie", 1),
            ("worst plot ever written", 0), ("worst plot", 0), ("plot", 0), ("ever written", 0)]
    f = _write_tsv(tmp_path / "p.tsv", [(s + " ", y) for s, y in rows])  # GLUE's trailing space
    cfg = ClassificationDataConfig(train_path=str(f), val_fraction=0.5, val_holdout="sentences", max_length=16)
    tok = train_tokenizer("char", ["".join(s for s, _ in rows)], 0)
    train, val = prepare_classification_data(cfg, tok)
    assert len(val) == 1 and len(train) == 4  # the other sentence and its 3 phrases
    assert val.labels.tolist() in ([1], [0]) and set(train.labels.tolist()) == {1 - val.labels.item()}


def test_token_dropout_replaces_only_real_tokens_and_is_a_function_of_position():
    data = encode_labelled([f"some words {i}" for i in range(40)], [i % 2 for i in range(40)], train_tokenizer("char", ["some words 0123456789"], 0), 64)
    plain = ClassificationBatcher(data=data, batch_size=8, seed=0, pad_id=0)
    noisy = ClassificationBatcher(data=data, batch_size=8, seed=0, pad_id=0, token_dropout=0.3, unk_id=1)
    dropped = kept = 0
    for pos in range(10):
        a, b = plain.get(pos), noisy.get(pos)
        assert torch.equal(a["attention_mask"], b["attention_mask"]) and torch.equal(a["labels"], b["labels"])
        changed = a["input_ids"] != b["input_ids"]
        assert not (changed & ~a["attention_mask"]).any()  # padding untouched
        assert (b["input_ids"][changed] == 1).all()  # dropped tokens become <unk>
        dropped, kept = dropped + int(changed.sum()), kept + int(a["attention_mask"].sum())
    assert 0.2 < dropped / kept < 0.4
    again = ClassificationBatcher(data=data, batch_size=8, seed=0, pad_id=0, token_dropout=0.3, unk_id=1)
    assert torch.equal(again.get(7)["input_ids"], noisy.get(7)["input_ids"])  # a resumed run sees the same noise
    with pytest.raises(ValueError, match="token_dropout"):
        ClassificationBatcher(data=data, batch_size=8, seed=0, pad_id=0, token_dropout=1.0)


NA_SPELLINGS = ["NA", "null", "None", "nan", "N/A", "NaN", "NULL", "n/a"]


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_missing_value_spellings_are_texts(tmp_path, home, suffix):
    """Sentences spelled like pandas' / datasets' missing values are read as those strings."""
    rows = [(t, i % 2) for i, t in enumerate(NA_SPELLINGS)]
    f = tmp_path / f"d{suffix}"
    if suffix == ".tsv":
        _write_tsv(f, rows)
    elif suffix == ".csv":
        f.write_text("sentence,label\n" + "".join(f"{t},{y}\n" for t, y in rows))
    else:
        f.write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in rows))
    texts, labels = read_labelled(str(f), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    assert texts == NA_SPELLINGS
    assert labels == [i % 2 for i in range(len(NA_SPELLINGS))]
    assert list(load_table(str(f))["sentence"]) == NA_SPELLINGS


def test_blank_and_json_null_texts_are_refused(tmp_path, home):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"sentence": "fine", "label": 1}) + "\n" + json.dumps({"sentence": None, "label": 0}) + "\n")
    with pytest.raises(UserError, match=r"1 missing/blank/non-text values \(first at row 1\)"):
        read_labelled(str(f), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    g = _write_tsv(tmp_path / "b.tsv", [("fine", 1), ("   ", 0)])
    with pytest.raises(UserError, match="missing/blank"):
        read_labelled(str(g), split="train", text_column="sentence", label_column="label", labels=[0, 1])
