"""`mlflow models serve` passes the `explain` params through: a logged classifier answers with attributions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .conftest import serve_load

pytestmark = pytest.mark.integration


def _post(port: int, body: dict) -> tuple[int, dict]:
    status, raw = serve_load().post(port, json.dumps(body).encode())
    return status, json.loads(raw)


def test_served_model_explains_on_request(tmp_path, monkeypatch):
    import mlflow
    import torch

    from flows.serving import log_model
    from selfattn.io.checkpoint import save_pretrained
    from selfattn.config import ModelConfig
    from selfattn.eval.interpret import explain
    from selfattn.nn.models import build_classifier
    from selfattn.data.tokenization import CharTokenizer

    texts = ["great fun", "a dull , lifeless mess ."]
    torch.manual_seed(0)
    tok = CharTokenizer.train(texts)
    model = build_classifier(ModelConfig(vocab_size=tok.vocab_size, context_length=48, n_layers=2, d_model=32, n_heads=2, n_classes=2)).eval()
    save_pretrained(model, tmp_path / "clf", tokenizer=tok, extra={"labels": [0, 1]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:  # artifacts under tmp_path (the default experiment would write ./mlruns)
        exp = mlflow.create_experiment("explain-serve", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            log_model(str(tmp_path / "clf"), name="model")
    finally:
        mlflow.set_tracking_uri(before)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    sl = serve_load()
    server, port = sl.start_server(f"runs:/{run.info.run_id}/model", env, tmp_path / "serve.log")
    try:
        status, plain = _post(port, {"inputs": texts})
        status_ig, explained = _post(port, {"inputs": texts, "params": {"explain": "integrated_gradients", "explain_unit": "word"}})
        status_bad, bad = _post(port, {"inputs": texts, "params": {"explain": "shap"}})
    finally:
        sl.stop_server(server)

    assert status == 200 and "attributions" not in plain["predictions"][0]
    assert status_ig == 200
    rows = explained["predictions"]
    ref = explain(model, tok, texts, method="integrated_gradients")
    for row, r in zip(rows, ref):
        assert [w for w, _ in row["attributions"]] == [w for w, _ in r.words()]
        assert [s for _, s in row["attributions"]] == pytest.approx([s for _, s in r.words()], abs=1e-5)
    assert status_bad == 400 and "'shap' is unknown" in json.dumps(bad)
