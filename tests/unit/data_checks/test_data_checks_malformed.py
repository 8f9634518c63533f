"""Broken data sets built here, each rejected with a message that names the problem; good data in
CRLF / BOM / other formats passes.

Two ways to be rejected: unusable input raises ``UserError`` (exit 2); data that reads but breaks
the suite gives a failing report whose failing check names the problem (exit 1).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from .dc_data import corpus_text, make_rows, tsv_text
from data_checks import CheckThresholds, validate
from selfattn.errors import UserError


def assert_fails(report, check: str, *needles: str):
    """``check`` failed with an error severity and its detail mentions every needle."""
    assert not report.passed, report.summary_line()
    failed = {c.name: c for c in report.failures}
    assert check in failed, f"{check} did not fail; failures: {[(c.name, c.detail) for c in report.failures]}"
    for needle in needles:
        assert needle in failed[check].detail, failed[check].detail
    return failed[check]


# --------------------------------------------------------------------------------------------
# unusable input -> UserError (exit 2)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["empty.tsv", "empty.txt"])
def test_empty_file_is_unusable(write, name):
    path = write(name, b"")
    with pytest.raises(UserError, match="is empty"):
        validate(path)


def test_binary_file_is_unusable(write):
    path = write("model.tsv", bytes(range(256)) * 64)  # NUL bytes and every other byte value
    with pytest.raises(UserError, match=r"not a text file: NUL byte at byte offset 0") as info:
        validate(path)
    assert info.value.exit_code == 2


def test_binary_corpus_without_nul_is_unusable(write):
    control = bytes([1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16, 17, 27])
    path = write("corpus.txt", (control + b"abc") * 2000)
    with pytest.raises(UserError, match=r"not a text file: .* control characters"):
        validate(path)


def test_missing_file_and_directory_are_unusable(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        validate(tmp_path / "nope.tsv")
    with pytest.raises(UserError, match="not a regular file"):
        validate(tmp_path, kind="corpus")


def test_unknown_extension_needs_kind(write):
    path = write("data.xlsx", "whatever")
    with pytest.raises(UserError, match="--kind"):
        validate(path)


def test_unparseable_csv_and_jsonl_are_unusable(write):
    ragged = write("ragged.csv", 'sentence,label\n"an unclosed quote,1\nfine,0\n')
    with pytest.raises(UserError, match="cannot be parsed as comma-separated"):
        validate(ragged)
    bad_json = write("bad.jsonl", '{"sentence": "ok", "label": 1}\n{"sentence": "broken", \n')
    with pytest.raises(UserError, match="cannot be parsed as JSON lines"):
        validate(bad_json)


def test_train_file_without_columns_is_unusable(write, good_tsv):
    train = write("train.tsv", "text\ttarget\nsome text\t1\n")
    with pytest.raises(UserError, match=r"has no column\(s\) \['sentence', 'label'\]"):
        validate(good_tsv, against=train)


# --------------------------------------------------------------------------------------------
# labelled data that fails the suite (exit 1)
# --------------------------------------------------------------------------------------------


def test_header_only(write):
    report = validate(write("header.tsv", "sentence\tlabel\n"))
    check = assert_fails(report, "row_count", "header only")
    assert check.observed == 0


def test_wrong_delimiter(write):
    text = tsv_text(make_rows()).replace("\t", ",")
    report = validate(write("commas.tsv", text))
    assert_fails(report, "text_column", "no text column 'sentence'", "wrong delimiter")
    assert_fails(report, "label_column", "comma-separated")


def test_missing_label_column(write):
    text = tsv_text(make_rows(), header="sentence\tscore")
    report = validate(write("nolabel.tsv", text))
    assert_fails(report, "label_column", "no label column 'label'", "['sentence', 'score']")
    assert report["text_column"].passed


def test_null_labels(write):
    rows = make_rows()
    rows[3] = (rows[3][0], "")
    rows[7] = (rows[7][0], "  ")
    report = validate(write("nulls.tsv", tsv_text(rows)))
    check = assert_fails(report, "label_not_null", "2 of 60 rows", "missing or blank label")
    assert check.observed == 2
    assert any(e.startswith("line 5:") for e in check.examples)  # header is line 1, rows[3] is line 5


def test_labels_outside_the_set(write):
    rows = make_rows()
    rows[0] = (rows[0][0], 2)
    rows[1] = (rows[1][0], "pos")
    report = validate(write("labels.tsv", tsv_text(rows)))
    check = assert_fails(report, "labels_in_set", "'2'", "'pos'", "{0, 1}")
    assert check.observed == 2


def test_non_utf8_bytes(write):
    good = tsv_text(make_rows()).encode("utf-8")
    offset = good.index(b"take 5")
    data = good[:offset] + "café".encode("latin-1") + good[offset:]  # é as the single byte 0xe9
    report = validate(write("latin1.tsv", data))
    bad_at = offset + 3
    assert_fails(report, "utf8", f"byte offset {bad_at}", "line 7", "e9")
    assert data[bad_at] == 0xE9


def test_single_ten_megabyte_line_labelled(write):
    rows = make_rows()
    rows[10] = ("x" * 10_000_000, 0)
    report = validate(write("huge.tsv", tsv_text(rows)))
    check = assert_fails(report, "text_length", "1 of 60 texts", "1-10,000 chars")
    assert check.examples and check.examples[0].startswith("line 12:")


def test_every_row_duplicated(write):
    rows = make_rows(30)
    report = validate(write("dupes.tsv", tsv_text(rows + rows)))
    check = assert_fails(report, "duplicate_rows", "60 of 60 rows (100.0%)", "identical")
    assert check.observed == 1.0


def test_train_dev_leakage(write):
    train = write("train.tsv", tsv_text(make_rows(80)))
    dev_rows = make_rows(20, seed=1, prefix="dev ") + make_rows(80)[:20]  # half the dev set is train rows
    report = validate(write("dev.tsv", tsv_text(dev_rows)), against=train)
    check = assert_fails(report, "leakage_exact", "20 of 40 rows (50.0%) also in train.tsv")
    assert check.observed == 20
    assert_fails(report, "leakage_normalized", "20 of 40 rows")


def test_leakage_after_normalisation_only(write):
    train = write("train.tsv", tsv_text(make_rows(80)))
    copied = [(s.upper().replace(" , ", " ; ").replace(" . ", "!"), lab) for s, lab in make_rows(80)[:10]]
    report = validate(write("dev.tsv", tsv_text(make_rows(30, seed=2, prefix="dev ") + copied)), against=train)
    assert report["leakage_exact"].passed
    check = assert_fails(report, "leakage_normalized", "10 of 40 rows", "normalised")
    assert check.observed == 10


def test_label_distribution_shift(write):
    train = write("train.tsv", tsv_text(make_rows(80)))
    dev_rows = [(s, 1) for s, _ in make_rows(40, seed=3, prefix="dev ")]
    dev_rows[0] = (dev_rows[0][0], 0)
    report = validate(write("dev.tsv", tsv_text(dev_rows)), against=train)
    check = assert_fails(report, "label_distribution", "KL(eval||train)")
    # 39 of 40 labels are 1 while train is 50/50
    p1, p0 = 39 / 40, 1 / 40
    expected = p1 * math.log(p1 / 0.5) + p0 * math.log(p0 / 0.5)
    assert check.observed == pytest.approx(expected, abs=1e-5)


def test_single_class(write):
    rows = [(s, 1) for s, _ in make_rows()]
    report = validate(write("oneclass.tsv", tsv_text(rows)))
    check = assert_fails(report, "class_balance", "single class", "label 1")
    assert check.observed == 0.0


def test_conflicting_labels(write):
    rows = make_rows(40)
    rows += [(s, 1 - lab) for s, lab in rows[:8]]  # 8 texts also appear with the other label
    report = validate(write("conflicts.tsv", tsv_text(rows)))
    check = assert_fails(report, "conflicting_labels", "16 of 48 rows", "8 texts")
    assert check.observed == 16
    assert report["duplicate_rows"].passed  # (text, label) pairs are still unique


def test_texts_beyond_the_length_bound(write):
    rows = make_rows()
    for i in range(5):
        rows[i] = ("word " * 500, i % 2)  # 2,500 chars
    th = CheckThresholds(max_text_chars=1_000)
    report = validate(write("long.tsv", tsv_text(rows)), thresholds=th)
    check = assert_fails(report, "text_length", "5 of 60 texts", "1-1,000 chars")
    assert check.observed == f"{min(len(s) for s, _ in rows)}-2500"


def test_text_length_quantiles(write):
    rows = [(f"{i}", i % 2) for i in range(60)]  # median length 2 < bound 3
    report = validate(write("tiny.tsv", tsv_text(rows)))
    assert_fails(report, "text_length_quantiles", "q0.5=2 [3, 2000]")


# --------------------------------------------------------------------------------------------
# corpora that fail the suite
# --------------------------------------------------------------------------------------------


def test_whitespace_only_corpus(write):
    report = validate(write("blank.txt", "\n   \n\t\n\n"))
    check = assert_fails(report, "corpus_non_empty", "0 non-blank lines", "empty")
    assert check.observed == 0


def test_single_ten_megabyte_line_corpus(write):
    report = validate(write("oneline.txt", "abc " * 2_500_000 + "\n"))
    check = assert_fails(report, "line_length", "longest has 10,000,000 chars")
    assert check.observed == 10_000_000


def test_corpus_every_line_duplicated(write):
    lines = corpus_text(200).splitlines()
    report = validate(write("twice.txt", "\n".join(lines + lines) + "\n"))
    check = assert_fails(report, "duplicate_lines", "duplicate-line rate too high")
    n = len([x for x in lines if x.strip()])
    assert check.observed == pytest.approx(1 - len({x for x in lines if x.strip()}) / (2 * n), abs=1e-4)


def test_corpus_with_control_characters(write):
    text = corpus_text(200)
    dirty = "".join(ch + ("\x07" if i % 50 == 0 else "") for i, ch in enumerate(text))
    report = validate(write("bells.txt", dirty))
    check = assert_fails(report, "nonprintable_ratio", "non-printable")
    assert check.observed == pytest.approx(dirty.count("\x07") / len(dirty.replace("\n", "")), rel=0.05)
    assert check.examples


def test_corpus_too_short_for_the_context(write):
    report = validate(write("short.txt", "to be or not to be\n"), context_length=64)
    check = assert_fails(report, "enough_tokens", "4 x (context_length 64 + 1) = 260 needed")
    assert check.observed == len("to be or not to be\n")


# --------------------------------------------------------------------------------------------
# good data in other encodings and formats passes
# --------------------------------------------------------------------------------------------


def test_crlf_and_bom_pass(write):
    text = tsv_text(make_rows(), newline="\r\n")
    crlf = validate(write("crlf.tsv", text))
    bom = validate(write("bom.tsv", b"\xef\xbb\xbf" + text.encode()))
    corpus = validate(write("bom_crlf.txt", b"\xef\xbb\xbf" + corpus_text().replace("\n", "\r\n").encode()))
    for report in (crlf, bom, corpus):
        assert report.passed, [(c.name, c.detail) for c in report.failures]
    assert bom.n_rows == 60 and "BOM" in bom["utf8"].detail
    assert validate(write("plain.txt", corpus_text())).n_rows == corpus.n_rows


def test_csv_jsonl_parquet_pass(write, tmp_path):
    rows = make_rows()
    frame = pd.DataFrame(rows, columns=["sentence", "label"])
    csv_path = tmp_path / "good.csv"
    frame.to_csv(csv_path, index=False)
    jsonl = write("good.jsonl", "".join(json.dumps({"sentence": s, "label": lab}) + "\n" for s, lab in rows))
    parquet = tmp_path / "good.parquet"
    frame.to_parquet(parquet)
    for path in (csv_path, jsonl, parquet):
        report = validate(path)
        assert report.passed, (path.suffix, [(c.name, c.detail) for c in report.failures])
        assert report.n_rows == 60


def test_other_column_names_and_string_labels(write):
    rows = [(s, "pos" if lab else "neg") for s, lab in make_rows()]
    path = write("reviews.tsv", tsv_text(rows, header="review\tsentiment"))
    report = validate(path, text_column="review", label_column="sentiment", labels=("neg", "pos"))
    assert report.passed, [(c.name, c.detail) for c in report.failures]


def test_nulls_in_jsonl_are_missing(write):
    rows = [{"sentence": s, "label": lab} for s, lab in make_rows()]
    rows[2]["label"] = None
    rows[4]["sentence"] = None
    path = write("nulls.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    report = validate(path)
    assert_fails(report, "label_not_null", "1 of 60 rows")
    assert_fails(report, "text_not_null", "1 of 60 rows")


def test_all_failures_are_listed_in_one_report(write):
    """One broken file -> every problem in the same report (the user fixes them in one go)."""
    rows = [(s, 1) for s, _ in make_rows(30)]
    rows = rows + rows + [("x" * 20_000, 7)]
    report = validate(write("broken.tsv", tsv_text(rows)))
    names = {c.name for c in report.failures}
    assert {"class_balance", "duplicate_rows", "labels_in_set", "text_length"} <= names
