"""The training engine: schedule, optimizer groups, reproducibility, resume, divergence, early stopping,
callbacks, fine-tuning (full and LoRA) and evaluation of the result. Tiny models, CPU."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from selfattn.errors import UserError
from selfattn.train import Callback, FinetuneConfig, PretrainConfig, StopTraining, TrainingDiverged, evaluate_checkpoint, finetune, pretrain
from selfattn.train.config import OptimConfig
from selfattn.train.optim import build_optimizer, lr_at

WORDS_POS = ["good", "great", "fine", "lovely", "superb", "fun"]
WORDS_NEG = ["bad", "awful", "dull", "poor", "boring", "ugly"]
FILLER = ["the", "film", "was", "a", "very", "movie", "plot", "and"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    corpus = "\n".join(" ".join(rng.choice(FILLER + WORDS_POS + WORDS_NEG) for _ in range(12)) for _ in range(300))
    (d / "corpus.txt").write_text(corpus)
    for name, n in (("train.tsv", 240), ("dev.tsv", 60)):
        rows = []
        for i in range(n):
            y = i % 2
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 8))]
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS_POS if y else WORDS_NEG))
            rows.append(f"{' '.join(words)}\t{y}\n")
        (d / name).write_text("sentence\tlabel\n" + "".join(rows))
    return d


@pytest.fixture(autouse=True)
def _home_and_one_thread(tmp_path, monkeypatch):
    """A private SELFATTN_HOME; one intra-op thread (tiny ops on a shared 2-core box spin otherwise)."""
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_config(files, **train) -> PretrainConfig:
    return PretrainConfig.model_validate({
        "data": {"path": str(files / "corpus.txt"), "block_size": 16},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "dropout": 0.1},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 8, "batch_size": 4, "eval_every": 4, "eval_batches": 2, "log_every": 1, "checkpoint_every": 4, "progress": False, **train},
    })


class Recorder(Callback):
    def __init__(self, stop_at: int | None = None) -> None:
        self.events, self.losses, self.stop_at, self.info = [], {}, stop_at, None

    def on_train_start(self, info):
        self.info = info
        self.events.append(("start", info["start_step"]))

    def on_step(self, step, metrics):
        self.losses[step] = metrics["train_loss"]
        self.events.append(("step", step))
        if step == self.stop_at:
            raise StopTraining

    def on_eval(self, step, metrics):
        self.events.append(("eval", step))

    def on_checkpoint(self, step, path):
        assert path.is_file()
        self.events.append(("checkpoint", step))

    def on_train_end(self, result):
        self.events.append(("end", result.metrics["steps"]))


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10)
    lrs = [lr_at(s, cfg, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-3 / 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # warmup rises
    assert lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 9e-4)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))  # cosine falls
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)


def test_optimizer_decays_only_weight_matrices():
    from selfattn.config import ModelConfig
    from selfattn.nn.models import DecoderLM

    model = DecoderLM(ModelConfig(vocab_size=50, n_layers=1, d_model=16, n_heads=2, bias=True))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        no_decay = "norm" in name or name.endswith("bias") or "emb" in name
        assert (id(p) in decayed) != no_decay, name
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_same_seed_same_losses_and_resume_continues_the_curve(files, tmp_path):
    full = Recorder()
    result = pretrain(lm_config(files), tmp_path / "full", [full])
    assert sorted(full.losses) == list(range(1, 9))
    assert full.events[0] == ("start", 0) and full.events[-1] == ("end", 8.0)
    assert [e for e in full.events if e[0] in ("eval", "checkpoint")] == [("eval", 4), ("checkpoint", 4), ("eval", 8), ("checkpoint", 8)]
    assert (result.best_dir / "model.safetensors").is_file() and result.last_ckpt.is_file()
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert metrics["val_loss"] == pytest.approx(result.metrics["val_loss"]) and metrics["tokens_per_s"] > 0
    assert (tmp_path / "full" / "plots" / "learning_curves.png").is_file()
    evals = [h for h in json.loads((tmp_path / "full" / "history.json").read_text()) if "val_loss" in h]
    assert [h["step"] for h in evals] == [4, 8]
    assert result.metrics["best_val_loss"] == min(h["val_loss"] for h in evals)

    first = Recorder(stop_at=3)  # stops gracefully (checkpoint at step 3) ...
    stopped = pretrain(lm_config(files), tmp_path / "split", [first])
    assert stopped.stopped_early == "callback" and torch.load(stopped.last_ckpt, weights_only=True)["step"] == 3
    assert [h["step"] for h in stopped.history if "val_loss" in h] == [3]  # a stopped run ends evaluated
    second = Recorder()  # ... and the next call resumes from it (dropout RNG and data position included)
    pretrain(lm_config(files), tmp_path / "split", [second])
    assert second.events[0] == ("start", 3)
    assert first.losses == {s: full.losses[s] for s in (1, 2, 3)}  # same seed, same losses
    assert second.losses == {s: full.losses[s] for s in range(4, 9)}  # resume == uninterrupted

    other_seed = Recorder()
    pretrain(lm_config(files, max_steps=1, seed=7), tmp_path / "seed7", [other_seed])
    assert other_seed.losses[1] != full.losses[1]

    changed = lm_config(files)
    changed.model.d_model = 64
    with pytest.raises(UserError, match=r"different config \(model.d_model: 32 in the checkpoint, 64 now"):
        pretrain(changed, tmp_path / "full")


def poison_step(monkeypatch, step: int) -> None:
    """Make the training loss NaN at optimizer step ``step`` (a test seam, not a config key)."""
    from selfattn.train import engine

    clean = engine._Run._micro_loss

    def poisoned(self, batch):
        loss = clean(self, batch)
        return loss * float("nan") if self.state.step + 1 == step else loss

    monkeypatch.setattr(engine._Run, "_micro_loss", poisoned)


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(files, tmp_path, monkeypatch):
    poison_step(monkeypatch, 5)
    cfg = lm_config(files, max_steps=10, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match=r"became nan between steps 4 and 5.*last good checkpoint is .*step-00000004/state.pt \(step 4\)"):
        pretrain(cfg, tmp_path / "out")
    state = torch.load(tmp_path / "out" / "checkpoints" / "step-00000004" / "state.pt", weights_only=True)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_early_stopping_on_a_flat_validation_metric(files, tmp_path):
    cfg = lm_config(files, max_steps=50, eval_every=2, early_stopping_patience=2, progress=True)  # the tqdm bar too
    cfg.optim.lr = 1e-30  # the weights cannot move in float32: val loss stays exactly flat
    rec = Recorder()
    result = pretrain(cfg, tmp_path / "out", [rec])
    assert result.stopped_early == "early_stopping"
    assert [e for e in rec.events if e[0] == "eval"] == [("eval", 2), ("eval", 4), ("eval", 6)]
    assert result.metrics["steps"] == 6


def test_callback_exceptions_propagate(files, tmp_path):
    class Prune(Callback):
        def on_eval(self, step, metrics):
            raise RuntimeError(f"pruned at {step}")

    with pytest.raises(RuntimeError, match="pruned at 4"):
        pretrain(lm_config(files), tmp_path / "out", [Prune()])


def test_finetune_from_scratch_learns_and_lora_from_pretrained(files, tmp_path):
    base = {
        "data": {"train_path": str(files / "train.tsv"), "val_path": str(files / "dev.tsv"), "tokenizer": "bpe", "vocab_size": 300, "max_length": 48},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"max_steps": 40, "batch_size": 16, "eval_every": 20, "log_every": 10, "progress": False},
    }
    scratch = FinetuneConfig.model_validate({**base, "model": {"n_layers": 1, "d_model": 32, "n_heads": 2}})
    result = finetune(scratch, tmp_path / "scratch")
    assert result.metrics["best_accuracy"] >= 0.9, result.metrics

    lm = pretrain(lm_config(files, max_steps=4), tmp_path / "lm")
    rec = Recorder()
    lora = FinetuneConfig.model_validate({**base, "init_from": str(lm.out_dir), "lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}, "train": {**base["train"], "max_steps": 10, "eval_every": 10}})
    result = finetune(lora, tmp_path / "lora", [rec])
    assert 0 < rec.info["trainable_params"] < 0.3 * rec.info["n_params"]
    metrics = evaluate_checkpoint(result.best_dir, lora.data, tmp_path / "eval", n_attention_examples=1)
    assert metrics["task"] == "classifier" and metrics["n"] == 60
    assert sum(map(sum, metrics["confusion_matrix"])) == 60
    for name in ("confusion_matrix.png", "reliability.png", "attention_0.png", "learning_curves.png"):
        assert (tmp_path / "eval" / "plots" / name).is_file(), name
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"] == metrics["accuracy"]


def assert_trunk_is_the_pretrained_one(clf_dir, pre_dir) -> None:
    """Every weight of the classifier but its head (and pooler) equals the pretrained model's."""
    from selfattn.io.checkpoint import load_pretrained

    clf, pre = load_pretrained(clf_dir).model.state_dict(), load_pretrained(pre_dir).model.state_dict()
    trunk = [k for k in clf if not k.startswith(("head.", "pooler."))]
    assert len(trunk) > 10 and set(trunk) <= set(pre), sorted(set(trunk) - set(pre))
    for k in trunk:
        torch.testing.assert_close(clf[k], pre[k], rtol=0, atol=1e-12, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_a_finetune_from_init_from_starts_from_the_pretrained_weights(files, tmp_path, objective):
    """One step at a learning rate of 1e-30 (far below float32's resolution of any weight: a
    fine-tune of no steps, which the config does not allow): the saved trunk is the pretrained one."""
    lm = pretrain(lm_config(files, max_steps=4, seed=7).model_copy(update={"objective": objective}), tmp_path / "lm")
    cfg = FinetuneConfig.model_validate({
        "data": {"train_path": str(files / "train.tsv"), "val_path": str(files / "dev.tsv"), "max_length": 16},
        "init_from": str(lm.out_dir),
        "optim": {"lr": 1e-30, "warmup_steps": 0},
        "train": {"max_steps": 1, "batch_size": 8, "eval_every": 1, "log_every": 1, "progress": False},
    })
    result = finetune(cfg, tmp_path / "clf")
    assert_trunk_is_the_pretrained_one(result.best_dir, lm.best_dir)


def test_finetune_reads_texts_spelled_like_missing_values(files, tmp_path):
    """A TSV whose sentences are ``NA``, ``null``, ``None``, ``nan``, ``N/A`` trains: they are strings,
    tokenized like any other sentence, and come back in the evaluation's predictions."""
    import csv

    spellings = ["NA", "null", "None", "nan", "N/A"]
    lines = (files / "train.tsv").read_text().splitlines()[:41] + [f"{s}\t{i % 2}" for i, s in enumerate(spellings)]
    data = tmp_path / "na.tsv"
    data.write_text("\n".join(lines) + "\n")
    cfg = FinetuneConfig.model_validate({
        "data": {"train_path": str(data), "val_path": str(data), "tokenizer": "char", "max_length": 48},
        "model": {"n_layers": 1, "d_model": 32, "n_heads": 2},
        "train": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "log_every": 1, "progress": False},
    })
    result = finetune(cfg, tmp_path / "out")
    assert result.metrics["best_n"] == 45.0
    with (tmp_path / "out" / "eval" / "predictions.tsv").open(newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    assert texts[-5:] == spellings
    from selfattn.io.checkpoint import load_pretrained

    tok = load_pretrained(result.best_dir).tokenizer
    assert all(len(tok.encode(s)) >= len(s) for s in spellings)  # characters, not an unknown/empty value
