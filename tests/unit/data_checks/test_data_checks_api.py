"""Post-tokenization checks, severities and thresholds, the report's shape, and lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .dc_data import corpus_text, make_rows, tsv_text
from data_checks import CheckResult, CheckThresholds, Report, validate
from data_checks.config import DEFAULT_SEVERITY, resolve_severity
from selfattn.data.tokenization import CharTokenizer


def test_token_checks_match_a_direct_count(write):
    rows = make_rows()
    rows[0] = ("zzz " * 40, 0)  # 160 chars: longer than the context below
    path = write("tok.tsv", tsv_text(rows))
    # vocabulary without 'z' and 'q': every z becomes <unk>
    tok = CharTokenizer.train([s.replace("z", "") for s, _ in rows])
    report = validate(path, tokenizer=tok, context_length=100, thresholds=CheckThresholds(max_unknown_token_rate=0.01))
    texts = [s for s, _ in rows]
    n_tokens = sum(len(t) for t in texts)
    n_unk = sum(t.count("z") for t in texts)
    unk = report["unknown_token_rate"]
    assert unk.observed == pytest.approx(n_unk / n_tokens, abs=1e-5)
    assert not unk.passed and unk.severity == "error" and "unknown" in unk.detail
    assert unk.examples[0].startswith("line 2:")
    trunc = report["truncation_rate"]
    assert trunc.observed == pytest.approx(sum(len(t) > 100 for t in texts) / len(texts), abs=1e-4)
    # truncation is a warning by default: listed, but alone it does not fail the data
    assert trunc.passed is (trunc.observed <= 0.05)
    assert {c.name for c in report.failures} == {"unknown_token_rate"}


def test_truncation_warning_does_not_fail(write):
    rows = [(s + "long " * 30, lab) for s, lab in make_rows()]
    tok = CharTokenizer.train([s for s, _ in rows])
    report = validate(write("long.tsv", tsv_text(rows)), tokenizer=tok, context_length=64)
    assert report.passed
    assert [c.name for c in report.warnings] == ["truncation_rate"]
    assert report["truncation_rate"].observed == 1.0
    assert report["unknown_token_rate"].observed == 0.0


def test_corpus_tokens_counted_with_the_tokenizer(write, tmp_path):
    text = corpus_text(100)
    tok = CharTokenizer.train(text)
    tok_dir = tmp_path / "tok"
    tok.save(tok_dir)
    report = validate(write("c.txt", text), tokenizer=tok_dir, context_length=32)  # a saved tokenizer folder
    lines = [x for x in text.split("\n") if x.strip()]
    assert report["enough_tokens"].observed == sum(map(len, lines)) + len(lines)
    assert report["unknown_token_rate"].observed == 0.0
    assert report.passed


def test_severity_override_turns_a_failure_into_a_warning(write):
    rows = [(s, 1) for s, _ in make_rows()]
    path = write("oneclass.tsv", tsv_text(rows))
    assert not validate(path).passed
    report = validate(path, severity={"class_balance": "warning"})
    assert report.passed
    assert [c.name for c in report.warnings] == ["class_balance"]
    assert report.warnings[0].status == "warn"


def test_thresholds_are_configurable(write):
    rows = make_rows(30)
    path = write("dupes.tsv", tsv_text(rows + rows[:3]))  # 6 of 33 rows in duplicate pairs
    assert not validate(path).passed
    assert validate(path, thresholds=CheckThresholds(max_duplicate_rate=0.2)).passed


def test_bad_arguments_name_the_value(good_tsv):
    with pytest.raises(ValueError, match="unknown check 'class_balanse'"):
        validate(good_tsv, severity={"class_balanse": "warning"})
    with pytest.raises(ValueError, match="'fatal'"):
        resolve_severity({"utf8": "fatal"})
    with pytest.raises(ValueError, match="kind must be"):
        validate(good_tsv, kind="images")
    with pytest.raises(ValueError, match="min_text_chars"):
        CheckThresholds(min_text_chars=10, max_text_chars=5)
    assert set(resolve_severity(None)) == set(DEFAULT_SEVERITY)


def test_report_shape_and_json(good_tsv, tmp_path):
    report = validate(good_tsv, output_dir=tmp_path / "out")
    assert isinstance(report, Report) and all(isinstance(c, CheckResult) for c in report.checks)
    assert report.passed and report.failures == [] and report.warnings == []
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["checks"][0]["name"] == "utf8" and d["checks"][0]["status"] == "pass"
    assert report.report_json == tmp_path / "out" / "report.json"
    assert report.data_docs == tmp_path / "out" / "data_docs"
    assert "PASSED" in report.summary_line()
    from rich.console import Console

    console = Console(width=80, record=True)
    console.print(report.summary_table(show_observed=False))
    assert "duplicate_rows" in console.export_text()


def test_import_is_light():
    """``import data_checks`` and the CLI module load neither Great Expectations nor pandas."""
    code = (
        "import sys, data_checks, data_checks.cli, data_checks.config;"
        "print(sorted(m for m in ('great_expectations', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
