"""``init_from=gguf:FILE``: the smoke pipeline on a tiny random Llama written as llama.cpp writes it
(q/k rows permuted, mixed quant types, a SentencePiece vocabulary), and the fine-tune engine on the
same file without the pipeline."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")


def _tiny_file(d):
    from tests.unit.selfattn.io.test_gguf import (
        _hf_model,
        _sentencepiece_tokenizer,
        write_gguf,
    )

    tok = _sentencepiece_tokenizer()
    path = d / "tiny-llama.gguf"
    write_gguf(path, _hf_model("llama", len(tok["tokens"])), "llama", tok)
    return path


@pytest.mark.slow  # a whole pipeline run: about a minute of CPU, several on a loaded machine
def test_pipeline_from_a_gguf_file(tmp_path, data_dir, monkeypatch):
    import mlflow
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.io.gguf import import_gguf

    path = _tiny_file(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    overrides = [f"init_from=gguf:{path}", "finetune.lora.rank=4", "finetune.lora.alpha=8", "finetune.lora.targets=[q_proj,v_proj]",
                 "finetune.head.pooling=last", "finetune.head.causal=true", "registry.model_name=selfattn-gguf-smoke"]  # fmt: skip
    try:
        with prefect_test_harness(server_startup_timeout=120):
            result = pipeline("smoke", overrides=overrides)
        pre = result.stages["pretrain"]
        assert pre.stage == "init_from" and pre.result["tokenizer"] == "hf" and pre.result["source"] == f"gguf:{path}"
        imported = load_pretrained(pre.result["best_dir"])
        model, tok = import_gguf(path)
        for k, v in model.state_dict().items():  # converted once, exactly what import_gguf gives
            assert bool((imported.model.state_dict()[k] == v).all()), k
        tuned = load_pretrained(result.stages["finetune"].result["best_dir"])
        assert tuned.task == "classifier" and tuned.config.pooling == "last"
        assert tuned.tokenizer.encode("a gripping film") == tok.encode("a gripping film")
        assert result.model_version == "1"
        preds = Path(result.stages["evaluate"].result["eval_dir"]) / "predictions.tsv"
        with preds.open(newline="") as f:
            scored = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        assert len(scored) == 100  # the smoke preset's dev scored
        assert result.metrics["accuracy"] == pytest.approx(sum(r["label"] == r["prediction"] for r in scored) / len(scored))
    finally:
        mlflow.set_tracking_uri(before)


def test_finetune_engine_takes_a_gguf_file(tmp_path, data_dir):
    """``selfattn finetune --set init_from=gguf:FILE``: the LM imported in memory, a LoRA classifier trained."""
    from selfattn.config import load_config
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.train import FinetuneConfig, finetune

    path = _tiny_file(tmp_path)
    rows = (data_dir / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[:121]
    (tmp_path / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfg = load_config(FinetuneConfig, None, [f"data.train_path={tmp_path / 'train.tsv'}", "data.text_column=sentence", "data.label_column=label",
                                             "data.labels=[0,1]", "data.max_length=32", f"init_from=gguf:{path}", "lora.rank=2",
                                             "train.max_steps=2", "train.batch_size=8", "train.eval_every=2", "train.checkpoint_every=2",
                                             "train.device=cpu"])  # fmt: skip
    result = finetune(cfg, tmp_path / "out")
    tuned = load_pretrained(result.best_dir)
    assert tuned.task == "classifier" and tuned.config.causal and tuned.config.pooling == "last"
    from selfattn.io.gguf import import_gguf

    assert tuned.tokenizer.encode("a gripping film") == import_gguf(path)[1].encode("a gripping film")
