"""Fixtures for the flows tests: a tiny real classifier checkpoint and a private MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

TEXTS = ["a gripping , beautifully acted film .", "a dull , lifeless mess .", "great fun", "boring and long"]


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory) -> Path:
    """A save_pretrained classifier (2 layers, 32 dims, char tokenizer), seeded."""
    import torch

    from selfattn.config import ModelConfig
    from selfattn.data.tokenization import CharTokenizer
    from selfattn.io.checkpoint import save_pretrained
    from selfattn.nn.models import build_classifier

    torch.manual_seed(0)
    tok = CharTokenizer.train(TEXTS)
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=48, n_layers=2, d_model=32, n_heads=2, n_classes=2, pad_token_id=tok.pad_id)
    model = build_classifier(cfg).eval()
    out = tmp_path_factory.mktemp("clf") / "model"
    save_pretrained(model, out, tokenizer=tok, extra={"labels": [0, 1]})
    return out


@pytest.fixture()
def mlflow_home(selfattn_home):
    """MLflow pointed at sqlite under a temporary SELFATTN_HOME (restored afterwards)."""
    import mlflow

    from flows.tracking import runs

    before = mlflow.get_tracking_uri()
    runs.configure(selfattn_home)
    yield selfattn_home
    mlflow.set_tracking_uri(before)


@pytest.fixture()
def experiment_id(mlflow_home) -> str:
    """An experiment whose artifacts stay under the temporary home: runs started without one go to
    MLflow's default experiment, which writes its artifacts to ./mlruns in the working directory."""
    from flows.tracking.runs import ensure_experiment

    return ensure_experiment("unit-tests", mlflow_home)
