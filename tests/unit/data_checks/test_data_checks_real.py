"""The real data sets pass, and the numbers the report shows match an independent pandas computation."""

from __future__ import annotations

import csv
import json
import math

import pandas as pd
import pytest

from data_checks import validate


def _read_sst2(path):
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)


def test_sst2_train_passes(sst2_train_report, data_dir):
    report = sst2_train_report
    assert report.passed, report.summary_line() + str([c.detail for c in report.failures])
    assert report.warnings == []
    assert report.n_rows == 67_349
    names = {c.name for c in report.checks}
    assert {"utf8", "text_column", "label_column", "text_not_null", "labels_in_set", "class_balance", "text_length",
            "text_length_quantiles", "duplicate_rows", "conflicting_labels", "nonprintable_ratio"} <= names

    ref = _read_sst2(data_dir / "sst2" / "train.tsv")
    # exact duplicates: GX counts every row of a duplicated (text, label) group
    assert report["duplicate_rows"].observed == pytest.approx(ref.duplicated(keep=False).mean(), abs=1e-4)
    # conflicting labels: the README says 5 strings appear with both labels -> 10 rows
    per_text = ref.groupby("sentence")["label"].transform("nunique")
    assert report["conflicting_labels"].observed == int((per_text > 1).sum()) == 10
    lengths = ref["sentence"].str.len()
    assert report["text_length"].observed == f"{lengths.min()}-{lengths.max()}"
    q = report["text_length_quantiles"].observed
    assert q["q0.5"] == pytest.approx(lengths.quantile(0.5))
    assert report["class_balance"].observed == pytest.approx((ref["label"] == "0").mean(), abs=1e-4)
    assert report["utf8"].expectation == "pandas:strict_utf8_decode"
    assert report["labels_in_set"].expectation == "expect_column_values_to_be_in_set"


def test_sst2_dev_against_train_passes(data_dir, tmp_path):
    train, dev = data_dir / "sst2" / "train.tsv", data_dir / "sst2" / "dev.tsv"
    report = validate(dev, against=train, output_dir=tmp_path / "out")
    assert report.passed, [c.detail for c in report.failures]
    assert report["leakage_exact"].observed == 0  # README: no overlap between dev and train

    tr, dv = _read_sst2(train), _read_sst2(dev)
    p = dv["label"].value_counts(normalize=True)
    q = tr["label"].value_counts(normalize=True)
    kl = sum(p[k] * math.log(p[k] / q[k]) for k in p.index)
    assert report["label_distribution"].observed == pytest.approx(kl, abs=1e-5)
    assert report["label_distribution"].expectation == "expect_column_kl_divergence_to_be_less_than"

    # the GX Data Docs site and report.json are written
    assert (report.data_docs / "index.html").is_file()
    assert list((report.data_docs / "validations").rglob("*.html"))
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["passed"] is True and saved["n_rows"] == 872


def test_tinyshakespeare_passes(data_dir):
    path = data_dir / "tinyshakespeare" / "input.txt"
    report = validate(path)
    assert report.kind == "corpus"
    assert report.passed, [c.detail for c in report.failures]
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    assert report.n_rows == len(lines)
    assert report["duplicate_lines"].observed == pytest.approx(1 - len(set(lines)) / len(lines), abs=1e-4)
    assert report["line_length"].observed == max(map(len, lines))
    assert report["enough_tokens"].observed == 1_115_394  # characters, no tokenizer given
