"""``mlflow models serve`` of a logged selfattn classifier answers hostile requests with a 4xx that
names the problem, or a bounded 200 with a warning, and stays up throughout."""

from __future__ import annotations

import json
import os

import pytest

from .conftest import REPO, _clean_env, serve_load

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny classifier (2 layers, 32 dims) logged into a SQLite store, served on loopback."""
    import mlflow
    import torch

    from flows.serving import log_model
    from selfattn.io.checkpoint import save_pretrained
    from selfattn.config import ModelConfig
    from selfattn.nn.models import build_classifier
    from selfattn.data.tokenization import CharTokenizer

    home = tmp_path_factory.mktemp("serve_home")
    torch.manual_seed(0)
    tok = CharTokenizer.train(["a gripping film", "a dull mess", "fine"])
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=48, n_layers=2, d_model=32, n_heads=2, n_classes=2, pad_token_id=tok.pad_id)
    save_pretrained(build_classifier(cfg).eval(), home / "clf", tokenizer=tok, extra={"labels": [0, 1]})
    uri = f"sqlite:///{home / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.create_experiment("serve-limits", artifact_location=(home / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            log_model(str(home / "clf"), name="model")
    finally:
        mlflow.set_tracking_uri(before)
    env = _clean_env()
    env.update(MLFLOW_TRACKING_URI=uri, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    sl = serve_load()
    proc, port = sl.start_server(f"runs:/{run.info.run_id}/model", env, home / "serve.log")
    try:
        yield sl, proc, port
    finally:
        sl.stop_server(proc)


def _ask(served, body: bytes) -> tuple[int, dict]:
    sl, proc, port = served
    status, raw = sl.post(port, body, timeout=300)
    assert sl.ping(port) and proc.poll() is None, "the server went down"
    return status, json.loads(raw)


@pytest.mark.parametrize(
    "body, problem",
    [
        (b'{"inputs": [1, 2, null]}', "row 0 is int (1)"),
        (b'{"inputs": ["fine", "also fine", null]}', "row 2 is null"),
        # MLflow reads an `inputs` list with no input schema through numpy, which turns ["fine", 3] and
        # ["fine", true] into strings; the DataFrame formats keep the JSON types
        (b'{"dataframe_records": [{"text": "fine"}, {"text": "also fine"}, {"text": 3}]}', "row 2 is int (3)"),
        (b'{"dataframe_split": {"columns": ["text"], "data": [["fine"], [true]]}}', "row 1 is bool"),
        (b'{"inputs": [["a", "b"], ["c", "d"]]}', "row 0 is a nested list (['a', 'b']; all rows: shape [2, 2])"),
        (b'{"inputs": ["fine", {"text": "x"}]}', "row 1 is dict"),
        (b'{"inputs": ["unterminated', "valid JSON"),
    ],
)
def test_bad_rows_get_a_4xx_naming_the_problem(served, body, problem):
    status, answer = _ask(served, body)
    assert 400 <= status < 500, (status, answer)
    assert problem in answer["message"], answer["message"][-500:]


def test_good_rows_still_answer_after_the_bad_ones(served):
    status, answer = _ask(served, b'{"inputs": ["a gripping film", ""]}')
    assert status == 200
    rows = answer["predictions"]
    assert len(rows) == 2 and rows[1]["warning"].startswith("empty input")
    assert all(r["prob_0"] + r["prob_1"] == pytest.approx(1.0, abs=1e-5) for r in rows)


def test_a_10mb_string_is_cut_and_says_so(served):
    status, answer = _ask(served, json.dumps({"inputs": ["a" * 10_000_000]}).encode())
    assert status == 200
    assert "cut from 10000000 to 20000 characters" in answer["predictions"][0]["warning"]


def test_100k_rows_are_refused_with_how_to_split(served):
    status, answer = _ask(served, json.dumps({"inputs": ["ok"] * 100_000}).encode())
    assert status == 400 and "100000 rows in one request, more than 10000" in answer["message"]


def test_an_empty_list_gets_a_4xx_with_a_message(served):
    status, answer = _ask(served, b'{"inputs": []}')
    assert 400 <= status < 500 and answer["message"], answer
