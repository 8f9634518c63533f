"""``init_from=hf:DIR``: the smoke pipeline on a tiny random GPT-2 saved by transformers (no hub).

The imported model replaces pretraining; search, LoRA fine-tune (targets given by their GPT-2
name, ``c_attn``), evaluate, register and promote run on it, and the registered pyfunc
tokenizes raw text with the imported tokenizer.
"""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")


def _tiny_gpt2(d, sentences):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(sentences, trainer=trainer)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


@pytest.mark.slow  # a whole pipeline run: about a minute of CPU, several on a loaded machine
def test_pipeline_from_an_imported_gpt2(tmp_path, data_dir, monkeypatch, capsys):
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from selfattn.checkpoint import load_pretrained
    from selfattn.cli import main

    lines = (data_dir / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:400]
    src = tmp_path / "gpt2-tiny"
    _tiny_gpt2(src, [line.split("\t")[0] for line in lines])
    home = tmp_path / "home"
    home.mkdir()
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"init_from=hf:{src}", "finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.targets=[c_attn]", "registry.model_name=selfattn-hf-smoke"]
    try:
        with prefect_test_harness(server_startup_timeout=120):
            result = pipeline("smoke", overrides=overrides)
        pre = result.stages["pretrain"]
        assert pre.stage == "init_from" and pre.result["tokenizer"] == "hf"
        imported = load_pretrained(pre.result["best_dir"])
        assert imported.config.position == "learned" and imported.config.gelu_approximate == "tanh"
        tuned = load_pretrained(result.stages["finetune"].result["best_dir"])
        assert tuned.task == "classifier" and tuned.tokenizer.kind == "hf"
        assert tuned.extra["train_config"]["lora"]["targets"] == ["c_attn"]
        assert tuned.tokenizer.encode("a gripping film") == imported.tokenizer.encode("a gripping film")
        assert result.model_version == "1" and result.decision["promoted"]
        assert 0.0 <= result.metrics["accuracy"] <= 1.0
        capsys.readouterr()
        assert main(["predict", "--model", "models:/selfattn-hf-smoke@champion", "--json", "a gripping , beautifully acted film ."]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
        assert len(rows) == 1 and abs(rows[0]["prob_0"] + rows[0]["prob_1"] - 1) < 1e-5 and not rows[0].get("warning")
    finally:
        mlflow.set_tracking_uri(before)
