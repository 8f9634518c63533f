"""The training stages in a row on a tiny learnable task: the fine-tune stage starts from the
pretrain stage's weights, and the pipeline's classifier beats the majority class on dev."""

from __future__ import annotations

import csv
import random
from collections import Counter

import pytest
import torch

from flows.config import load_pipeline_config
from flows.stages.base import StageOutput
from flows.stages.evaluate import evaluate_stage
from flows.stages.finetune import finetune_stage
from flows.stages.pretrain import pretrain_stage
from tests.unit.selfattn.train import test_train as engine_tests

# the smoke preset, shorter, with a BPE vocabulary small enough that each word is a token
TINY = [
    "pretrain.data.tokenizer=bpe", "pretrain.data.vocab_size=300",
    "pretrain.train.max_steps=4", "pretrain.train.eval_every=4", "pretrain.train.checkpoint_every=0", "pretrain.train.progress=false",
    "finetune.train.device=cpu", "finetune.train.progress=false", "finetune.train.checkpoint_every=0",
    "evaluation.behaviour=false", "evaluation.calibrate=false",
]  # fmt: skip
NO_STEP = ["finetune.train.max_steps=1", "finetune.train.eval_every=1", "finetune.optim.lr=1e-30", "finetune.optim.warmup_steps=0"]
LEARN = ["finetune.train.max_steps=60", "finetune.train.eval_every=20", "finetune.train.batch_size=16", "finetune.optim.lr=0.003",
         "finetune.head.pooling=mean", "finetune.head.causal=false", "finetune.head.dropout=0.0"]  # fmt: skip


def _rows(rng: random.Random, n: int, positive_share: float) -> str:
    """Filler words and one sentiment word that decides the label."""
    rows = []
    for _ in range(n):
        y = int(rng.random() < positive_share)
        words = [rng.choice(engine_tests.FILLER) for _ in range(rng.randint(3, 6))]
        words.insert(rng.randint(0, len(words)), rng.choice(engine_tests.WORDS_POS if y else engine_tests.WORDS_NEG))
        rows.append(f"{' '.join(words)}\t{y}\n")
    return "sentence\tlabel\n" + "".join(rows)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The data stage's output (train balanced, dev 70 % positive) and the pretrain stage's, on a private home."""
    tmp = tmp_path_factory.mktemp("stages")
    rng = random.Random(0)
    files = {name: tmp / name for name in ("corpus.txt", "train.tsv", "dev.tsv")}
    files["corpus.txt"].write_text("\n".join(" ".join(rng.choice(engine_tests.FILLER + engine_tests.WORDS_POS + engine_tests.WORDS_NEG) for _ in range(12)) for _ in range(200)))
    files["train.tsv"].write_text(_rows(rng, 200, 0.5))
    files["dev.tsv"].write_text(_rows(rng, 60, 0.7))
    data = StageOutput(stage="data", key="d", dir=str(tmp), result={"files": {k: str(v) for k, v in files.items()}, "digests": {k: k for k in files}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine spin otherwise
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFATTN_HOME", str(tmp / "home"))
        pretrained = pretrain_stage(load_pipeline_config("smoke", TINY), data, tmp / "home")
        yield {"home": tmp / "home", "data": data, "pretrained": pretrained}
    torch.set_num_threads(threads)


def _finetune(run, overrides: list[str]) -> tuple[object, StageOutput]:
    cfg = load_pipeline_config("smoke", TINY + overrides)
    search = StageOutput(stage="search", key="s", dir=str(run["home"]), result={"best_params": {}})
    return cfg, finetune_stage(cfg, run["data"], run["pretrained"], search, run["home"])


def test_the_finetune_stage_starts_from_the_pretrain_stage_weights(run):
    # one step at a learning rate of 1e-30 (far below float32's resolution of any weight): the
    # fine-tune of no steps that the config does not allow
    _, finetuned = _finetune(run, NO_STEP)
    engine_tests.assert_trunk_is_the_pretrained_one(finetuned.result["best_dir"], run["pretrained"].result["best_dir"])


def test_the_pipeline_classifier_beats_the_majority_class_on_a_learnable_task(run):
    cfg, finetuned = _finetune(run, LEARN)
    evaluated = evaluate_stage(cfg, run["data"], finetuned, run["home"])
    with open(run["data"].result["files"]["dev.tsv"], newline="") as f:
        labels = [row["label"] for row in csv.DictReader(f, delimiter="\t")]
    majority = Counter(labels).most_common(1)[0][1] / len(labels)  # about 0.7: what "always positive" scores
    accuracy = evaluated.result["metrics"]["accuracy"]
    assert accuracy > majority + (1 - majority) / 2, (accuracy, majority)
