"""The pipeline's pretrain -> fine-tune handoff: the fine-tune stage starts from the pretraining's weights."""

from __future__ import annotations

import random

import torch

from flows.config import load_pipeline_config
from flows.stages.base import StageOutput
from flows.stages.finetune import finetune_stage
from flows.stages.pretrain import pretrain_stage
from tests.unit.selfattn.train.test_train import assert_trunk_is_the_pretrained_one

# the smoke preset, shorter; the fine-tune takes one step at a learning rate of 1e-30 (far below
# float32's resolution of any weight): the fine-tune of no steps that the config does not allow
TINY = [
    "pretrain.train.max_steps=4", "pretrain.train.eval_every=4", "pretrain.train.checkpoint_every=0", "pretrain.train.progress=false",
    "finetune.train.max_steps=1", "finetune.train.eval_every=1", "finetune.train.device=cpu", "finetune.train.progress=false",
    "finetune.optim.lr=1e-30", "finetune.optim.warmup_steps=0",
]  # fmt: skip


def _files(tmp_path) -> StageOutput:
    rng = random.Random(0)
    words = ["the", "a", "film", "was", "good", "bad", "very", "plot", "and", "fun", "dull"]
    files = {"corpus.txt": tmp_path / "corpus.txt", "train.tsv": tmp_path / "train.tsv", "dev.tsv": tmp_path / "dev.tsv"}
    files["corpus.txt"].write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(100)))
    for name in ("train.tsv", "dev.tsv"):
        files[name].write_text("sentence\tlabel\n" + "".join(f"{' '.join(rng.choices(words, k=6))}\t{i % 2}\n" for i in range(40)))
    return StageOutput(stage="data", key="d", dir=str(tmp_path), result={"files": {k: str(v) for k, v in files.items()}, "digests": {k: k for k in files}})


def test_the_finetune_stage_starts_from_the_pretrain_stage_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine spin otherwise
    try:
        cfg = load_pipeline_config("smoke", TINY)
        data = _files(tmp_path)
        pretrained = pretrain_stage(cfg, data, tmp_path / "home")
        search = StageOutput(stage="search", key="s", dir=str(tmp_path), result={"best_params": {}})
        finetuned = finetune_stage(cfg, data, pretrained, search, tmp_path / "home")
    finally:
        torch.set_num_threads(threads)
    assert_trunk_is_the_pretrained_one(finetuned.result["best_dir"], pretrained.result["best_dir"])
