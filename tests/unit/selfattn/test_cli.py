"""``selfattn pretrain / finetune / evaluate``: outputs on success; bad input -> one-paragraph error,
non-zero exit, no traceback."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from selfattn.cli import main


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared box: one thread
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question.\n" * 40)
    rows = "".join(f"{'a fine good film' if i % 2 else 'a dull bad film'} number {i}\t{i % 2}\n" for i in range(64))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (tmp_path / "bad_labels.tsv").write_text("sentence\tlabel\n" + rows + "so so\t2\n")
    (tmp_path / "empty.txt").write_text("")
    lm = tmp_path / "lm.yaml"
    lm.write_text(
        f"data: {{path: {corpus}, block_size: 16}}\n"
        "model: {n_layers: 1, d_model: 32, n_heads: 2}\n"
        "train: {max_steps: 4, batch_size: 4, eval_every: 4, eval_batches: 2, progress: false}\n"
    )
    cls = tmp_path / "cls.yaml"
    cls.write_text(
        f"data: {{train_path: {tmp_path / 'train.tsv'}, tokenizer: char, max_length: 12}}\n"
        "train: {max_steps: 4, batch_size: 8, eval_every: 4, progress: false}\n"
    )
    return tmp_path


def _fails(capsys, argv, pattern, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert pattern in err, err
    return err


def test_pretrain_finetune_evaluate_write_outputs(files, tmp_path, capsys, caplog):
    out = tmp_path / "lm_out"
    assert main(["pretrain", "--config", str(files / "lm.yaml"), "--set", "train.seed=3", "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 4 and (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["val_loss"] == pytest.approx(printed["val_loss"])
    assert (out / "plots" / "learning_curves.png").is_file() and any((out / "checkpoints").glob("step-*/state.pt"))

    # a checkpoint from a different config is refused, naming the key
    _fails(capsys, ["pretrain", "-c", str(files / "lm.yaml"), "--set", "model.d_model=64", "-o", str(out)], "model.d_model: 32 in the checkpoint, 64 now")

    ft = tmp_path / "ft_out"
    with caplog.at_level(logging.WARNING):
        assert main(["finetune", "-c", str(files / "cls.yaml"), "--set", f"init_from={out}", "-o", str(ft)]) == 0
    assert "sequences are longer than max_length (12 tokens) and were truncated" in caplog.text
    assert json.loads((ft / "metrics.json").read_text())["best_n"] > 0
    assert (ft / "eval" / "plots" / "confusion_matrix.png").is_file()
    capsys.readouterr()

    ev = tmp_path / "ev_out"
    assert main(["evaluate", "--model", str(ft), "--data", str(files / "train.tsv"), "--output", str(ev)]) == 0
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n"] == 64 and 0.0 <= metrics["accuracy"] <= 1.0
    assert (ev / "plots" / "reliability.png").is_file()
    _fails(capsys, ["evaluate", "-m", str(tmp_path), "-d", str(files / "train.tsv"), "-o", str(ev)], "is not a checkpoint")

    # two classifiers as an ensemble: the mean of their probabilities, each member's accuracy recorded
    ft2 = tmp_path / "ft2_out"
    assert main(["finetune", "-c", str(files / "cls.yaml"), "--set", "train.seed=5", "-o", str(ft2)]) == 0
    ens = tmp_path / "ens_out"
    assert main(["evaluate", "-m", str(ft), "-m", str(ft2), "-d", str(files / "train.tsv"), "-o", str(ens)]) == 0
    got = json.loads((ens / "metrics.json").read_text())
    assert got["n_members"] == 2 and [m["model_dir"] for m in got["members"]] == [str(ft / "best"), str(ft2 / "best")]
    assert got["members"][0]["accuracy"] == pytest.approx(metrics["accuracy"])
    assert (ens / "plots" / "confusion_matrix.png").is_file()
    _fails(capsys, ["evaluate", "-m", str(ft), "-m", str(out), "-d", str(files / "train.tsv"), "-o", str(ens)], "is not a classifier")


def test_bad_input_is_a_clear_error(files, capsys):
    out = str(files / "out")
    _fails(capsys, ["pretrain", "-c", str(files / "lm.yaml"), "--set", f"data.path={files / 'empty.txt'}", "-o", out], "is empty")
    _fails(capsys, ["pretrain", "-c", str(files / "lm.yaml"), "--set", "train.lrr=1", "-o", out], "unknown config key 'train.lrr'")
    _fails(capsys, ["finetune", "-c", str(files / "cls.yaml"), "--set", f"data.train_path={files / 'bad_labels.tsv'}", "-o", out], "outside the configured labels [0, 1]: '2' (1 rows)")
    _fails(capsys, ["finetune", "-c", str(files / "cls.yaml"), "--set", "data.text_column=text", "-o", out], "has no column 'text'")
    _fails(capsys, ["finetune", "-c", str(files / "cls.yaml"), "--set", "data.train_path=nope/missing.tsv", "-o", out], "data file not found")


def test_console_script_user_error_has_no_traceback(files, tmp_path):
    env = {**os.environ, "SELFATTN_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [sys.executable, "-m", "selfattn.cli", "pretrain", "-c", str(files / "lm.yaml"), "--set", f"data.path={files / 'empty.txt'}", "-o", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "is empty" in proc.stderr
