"""`mlflow models serve` passes the `explain` params through: a logged classifier answers with attributions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_served_model_explains_on_request(tmp_path, monkeypatch):
    import mlflow
    import torch

    from flows.serving import log_model
    from selfattn.checkpoint import save_pretrained
    from selfattn.config import ModelConfig
    from selfattn.interpret import explain
    from selfattn.models import build_classifier
    from selfattn.tokenization import CharTokenizer

    texts = ["great fun", "a dull , lifeless mess ."]
    torch.manual_seed(0)
    tok = CharTokenizer.train(texts)
    model = build_classifier(ModelConfig(vocab_size=tok.vocab_size, context_length=48, n_layers=2, d_model=32, n_heads=2, n_classes=2)).eval()
    save_pretrained(model, tmp_path / "clf", tokenizer=tok, extra={"labels": [0, 1]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as run:
        log_model(str(tmp_path / "clf"), name="model")
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run.info.run_id}/model",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                pytest.fail(f"mlflow models serve exited {server.returncode}:\n{(tmp_path / 'serve.log').read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow models serve did not answer /ping in 300 s")
            time.sleep(1)
        url = f"http://127.0.0.1:{port}/invocations"
        status, plain = _post(url, {"inputs": texts})
        status_ig, explained = _post(url, {"inputs": texts, "params": {"explain": "integrated_gradients", "explain_unit": "word"}})
        status_bad, bad = _post(url, {"inputs": texts, "params": {"explain": "shap"}})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()

    assert status == 200 and "attributions" not in plain["predictions"][0]
    assert status_ig == 200
    rows = explained["predictions"]
    ref = explain(model, tok, texts, method="integrated_gradients")
    for row, r in zip(rows, ref):
        assert [w for w, _ in row["attributions"]] == [w for w, _ in r.words()]
        assert [s for _, s in row["attributions"]] == pytest.approx([s for _, s in r.words()], abs=1e-5)
    assert status_bad == 400 and "'shap' is unknown" in json.dumps(bad)
