"""``init_from=hf:DIR``: the smoke pipeline on a tiny random GPT-2 and Qwen3 saved by transformers (no hub).

The imported model replaces pretraining; search, LoRA fine-tune (targets given by their HF
names: GPT-2's fused ``c_attn``, Qwen3's q/k/v/o), evaluate, register and promote run on it, and
the registered pyfunc tokenizes raw text with the imported tokenizer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")


def _tiny(kind, d, sentences):
    """A tiny random ``kind`` model ("gpt2" or "qwen3") and a byte-level BPE tokenizer, as transformers saves them."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(sentences, trainer=trainer)
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    else:  # Qwen3: q/k norm, heads wider than hidden / heads, GQA, tied head
        cfg = transformers.Qwen3Config(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=64,
                                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


@pytest.mark.slow  # a whole pipeline run: about a minute of CPU, several on a loaded machine
@pytest.mark.parametrize("kind, targets", [("gpt2", "[c_attn]"), ("qwen3", "[q_proj,k_proj,v_proj,o_proj]")])
def test_pipeline_from_an_imported_model(kind, targets, tmp_path, data_dir, monkeypatch):
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.cli import main

    lines = (data_dir / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:400]
    src = tmp_path / f"{kind}-tiny"
    _tiny(kind, src, [line.split("\t")[0] for line in lines])
    home = tmp_path / "home"
    home.mkdir()
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"init_from=hf:{src}", "finetune.lora.rank=4", "finetune.lora.alpha=8", f"finetune.lora.targets={targets}", "registry.model_name=selfattn-hf-smoke"]
    try:
        with prefect_test_harness(server_startup_timeout=120):
            result = pipeline("smoke", overrides=overrides)
        pre = result.stages["pretrain"]
        assert pre.stage == "init_from" and pre.result["tokenizer"] == "hf"
        imported = load_pretrained(pre.result["best_dir"])
        if kind == "gpt2":
            assert imported.config.position == "learned" and imported.config.gelu_approximate == "tanh"
        else:
            assert imported.config.qk_norm and imported.config.head_dim == 32 and imported.config.kv_heads == 1
        tuned = load_pretrained(result.stages["finetune"].result["best_dir"])
        assert tuned.task == "classifier" and tuned.tokenizer.kind == "hf"
        assert tuned.extra["train_config"]["lora"]["targets"] == targets.strip("[]").split(",")
        assert tuned.tokenizer.encode("a gripping film") == imported.tokenizer.encode("a gripping film")
        assert result.model_version == "1" and result.decision["promoted"]
        preds = Path(result.stages["evaluate"].result["eval_dir"]) / "predictions.tsv"
        with preds.open(newline="") as f:
            scored = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        assert len(scored) == 100  # the smoke preset's dev scored
        assert result.metrics["accuracy"] == pytest.approx(sum(r["label"] == r["prediction"] for r in scored) / len(scored))
        # stdout captured for this call only: a capsys/capfd fixture over the whole test would leave
        # Prefect's console handler (set up once per process) writing to a stream closed after it
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["predict", "--model", "models:/selfattn-hf-smoke@champion", "--json", "a gripping , beautifully acted film ."]) == 0
        rows = [json.loads(x) for x in out.getvalue().splitlines() if x.startswith("{")]
        assert len(rows) == 1 and abs(rows[0]["prob_0"] + rows[0]["prob_1"] - 1) < 1e-5 and not rows[0].get("warning")
    finally:
        mlflow.set_tracking_uri(before)
