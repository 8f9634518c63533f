"""``selfattn validate``: exit 0 pass, 1 fail, 2 unusable; a table, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from .dc_data import make_rows, tsv_text
from selfattn.cli import main


def test_exit_codes(write, good_tsv, capsys):
    assert main(["validate", str(good_tsv)]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "labels_in_set" in out

    bad = write("bad.tsv", tsv_text([(s, 3) for s, _ in make_rows()]))
    assert main(["validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "'3'" in out

    empty = write("empty.tsv", b"")
    assert main(["validate", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err


def test_options(write, tmp_path, capsys):
    rows = [(s, "pos" if lab else "neg") for s, lab in make_rows()]
    train = write("train.csv", "review,sentiment\n" + "".join(f'"{s}",{lab}\n' for s, lab in rows))
    dev_rows = [(s, "pos" if lab else "neg") for s, lab in make_rows(40, seed=5, prefix="dev ")]
    dev = write("dev.csv", "review,sentiment\n" + "".join(f'"{s}",{lab}\n' for s, lab in dev_rows))
    out_dir = tmp_path / "out"
    argv = ["validate", str(dev), "--kind", "labelled", "--text-column", "review", "--label-column", "sentiment",
            "--labels", "neg,pos", "--against", str(train), "--output", str(out_dir)]
    assert main(argv) == 0, capsys.readouterr()
    assert "Data Docs:" in capsys.readouterr().out
    assert (out_dir / "data_docs" / "index.html").is_file()
    saved = json.loads((out_dir / "report.json").read_text())
    assert {c["name"] for c in saved["checks"]} >= {"leakage_exact", "leakage_normalized", "label_distribution"}

    assert main(["validate", str(dev), "--text-column", "review", "--label-column", "sentiment",
                 "--labels", "neg,pos", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["passed"] is True

    # a failing check downgraded to a warning from the command line
    one = write("one.tsv", tsv_text([(s, 1) for s, _ in make_rows()]))
    assert main(["validate", str(one)]) == 1
    assert main(["validate", str(one), "--severity", "class_balance=warning"]) == 0
    assert main(["validate", str(one), "--severity", "class_balance"]) == 2
    assert main(["validate", str(one), "--kind", "images"]) == 2


def test_subprocess_unusable_input_has_no_traceback(write):
    binary = write("weights.tsv", bytes(range(256)) * 16)
    proc = subprocess.run(
        [sys.executable, "-m", "selfattn.cli", "validate", str(binary)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "not a text file" in proc.stderr


def test_texts_spelled_like_missing_values_pass_the_gate(write, capsys):
    """``NA``, ``null``, ``None``, ``nan``, ``N/A`` are sentences, read by the reader the trainer uses."""
    spellings = ["NA", "null", "None", "nan", "N/A"]
    rows = make_rows() + [(s, i % 2) for i, s in enumerate(spellings)]
    path = write("na.tsv", tsv_text(rows))
    capsys.readouterr()
    assert main(["validate", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    nulls = [c for c in report["checks"] if "null" in c["name"]]
    assert nulls and all(c["passed"] for c in nulls), nulls
