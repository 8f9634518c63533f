"""DDP: ``torchrun --nproc_per_node 2`` (gloo, CPU) gives the losses of one process at equal global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from selfattn.config import load_config
from selfattn.train import PretrainConfig, pretrain


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200)))
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(
        f"data: {{path: {corpus}, block_size: 16}}\n"
        "model: {n_layers: 2, d_model: 32, n_heads: 2}\n"
        "optim: {lr: 3.0e-3, warmup_steps: 2}\n"
        "train: {max_steps: 6, batch_size: 8, grad_accum: 2, eval_every: 6, eval_batches: 2, log_every: 1, progress: false}\n"
    )
    env = {**os.environ, "SELFATTN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(  # start the 2-process run first; the 1-process reference runs meanwhile
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "selfattn.cli",
         "pretrain", "--config", str(cfg_file), "--output", str(tmp_path / "ddp")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = pretrain(load_config(PretrainConfig, cfg_file), tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("torchrun did not finish in 180 s")
    assert proc.returncode == 0, err[-3000:]
    ddp_history = json.loads((tmp_path / "ddp" / "history.json").read_text())
    one = [h["train_loss"] for h in single.history if "train_loss" in h]
    two = [h["train_loss"] for h in ddp_history if "train_loss" in h]
    assert len(one) == len(two) == 6
    assert two == pytest.approx(one, rel=1e-4, abs=1e-5)
    assert one[-1] < one[0]  # and it learns
    val = [h["val_loss"] for h in ddp_history if "val_loss" in h]
    assert val == pytest.approx([h["val_loss"] for h in single.history if "val_loss" in h], rel=1e-4)
