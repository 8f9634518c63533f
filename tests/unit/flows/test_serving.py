"""The pyfunc model: raw text in, label + probabilities out, never crashing on hostile input."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from flows.serving import SelfattnClassifier, as_texts, log_model


def _reference_probs(model_dir, text):
    """Direct forward pass of the checkpoint, one text at a time (no padding)."""
    from selfattn.io.checkpoint import load_pretrained

    pre = load_pretrained(model_dir)
    ids = pre.tokenizer.encode(text.strip())[: pre.config.context_length]
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = pre.model(x, torch.ones_like(x, dtype=torch.bool)).logits
    return torch.softmax(logits.double(), -1)[0].tolist()


def test_batched_predictions_match_single_forward(tiny_classifier_dir):
    clf = SelfattnClassifier().load(str(tiny_classifier_dir))
    texts = ["great fun", "a dull , lifeless mess .", "boring"]
    out = clf.predict(None, texts)
    assert list(out.columns) == ["label", "label_index", "score", "prob_0", "prob_1", "warning"]
    for text, row in zip(texts, out.to_dict(orient="records")):
        ref = _reference_probs(tiny_classifier_dir, text)
        assert row["prob_0"] == pytest.approx(ref[0], abs=1e-5)
        assert row["prob_1"] == pytest.approx(ref[1], abs=1e-5)
        assert row["label"] == max((0, 1), key=lambda k: ref[k])
        assert row["score"] == pytest.approx(max(ref), abs=1e-5)


def test_hostile_inputs_never_crash(tiny_classifier_dir):
    clf = SelfattnClassifier().load(str(tiny_classifier_dir))
    long_text = "great fun " * 500
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = clf.predict_texts(["", long_text, b"\xff\xfe bad bytes", "surrogate \udcff here", None])
    assert len(out) == 5
    assert out["warning"][0].startswith("empty input")
    assert "truncated" in out["warning"][1]
    assert any("truncated" in str(w.message) for w in caught)
    assert "UTF-8" in out["warning"][2] and "UTF-8" in out["warning"][3]
    for row in out.to_dict(orient="records"):
        assert math.isclose(row["prob_0"] + row["prob_1"], 1.0, rel_tol=1e-5)
    # truncation keeps exactly the model's context: same as the first context_length tokens
    ref = _reference_probs(tiny_classifier_dir, long_text)
    assert out["prob_1"][1] == pytest.approx(ref[1], abs=1e-5)


def test_input_shapes():
    assert as_texts("one") == ["one"]
    assert as_texts(pd.DataFrame({"sentence": ["a", "b"]})) == ["a", "b"]
    assert as_texts(pd.DataFrame({"x": [1], "text": ["t"]})) == ["t"]
    assert as_texts({"text": ["a"]}) == ["a"]


def test_logged_pyfunc_roundtrip(tiny_classifier_dir, mlflow_home, experiment_id):
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id):
        info = log_model(str(tiny_classifier_dir), name="model")
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    direct = SelfattnClassifier().load(str(tiny_classifier_dir)).predict_texts(["great fun", ""])
    shapes = (
        ["great fun", ""],
        np.array(["great fun", ""], dtype=object),
        np.array(["great fun", ""]),
        pd.DataFrame({"text": ["great fun", ""]}),
        pd.DataFrame({"any name": ["great fun", ""]}),
    )
    for model_input in shapes:
        out = loaded.predict(model_input)
        assert out["prob_1"].tolist() == pytest.approx(direct["prob_1"].tolist(), abs=1e-6)
    assert loaded.predict("great fun")["prob_1"].tolist() == pytest.approx(direct["prob_1"].tolist()[:1], abs=1e-6)
    # no input schema: rows arrive as sent (no cast of 1 or null to "1", "None"), the params are declared
    assert info.signature is not None and info.signature.inputs is None and info.signature.params is not None
    # nothing but safetensors / JSON / tokenizer files travel as the model_dir artifact
    local = mlflow.artifacts.download_artifacts(info.model_uri)
    from pathlib import Path

    files = {p.name for p in (Path(local) / "artifacts" / "model").rglob("*") if p.is_file()}
    assert "model.safetensors" in files and not any(f.endswith((".pt", ".pkl", ".bin")) for f in files)
    assert not list(Path(local).rglob("*.pkl"))  # models-from-code: nothing pickled


# flows/pyfunc_model.py as MLflow stored it beside every model registered so far (models-from-code):
# at load time that copy runs, so the import path it names must keep working
STORED_ENTRY_POINT = """import mlflow

from flows.serving import SelfattnClassifier

mlflow.models.set_model(SelfattnClassifier())
"""


def test_models_registered_before_keep_loading(tiny_classifier_dir, monkeypatch):
    import mlflow

    from flows import pyfunc_model

    built = []
    monkeypatch.setattr(mlflow.models, "set_model", built.append)
    exec(compile(STORED_ENTRY_POINT, "python_model.py", "exec"), {})
    [model] = built
    # by name: loading a logged pyfunc elsewhere in the session may have re-imported flows.serving
    assert (type(model).__module__, type(model).__name__) == ("flows.serving", "SelfattnClassifier")
    assert "from flows.serving import SelfattnClassifier" in open(pyfunc_model.__file__, encoding="utf-8").read()
    frame = model.load(str(tiny_classifier_dir)).predict_texts(["great fun"])
    assert abs(frame["prob_0"][0] + frame["prob_1"][0] - 1) < 1e-6


@pytest.fixture()
def logged(tiny_classifier_dir, mlflow_home, experiment_id):
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id):
        info = log_model(str(tiny_classifier_dir), name="model")
    return mlflow.pyfunc.load_model(info.model_uri)


def test_a_loaded_pyfunc_takes_what_users_pass_and_explains_each(logged, tiny_classifier_dir):
    from mlflow.exceptions import MlflowException

    direct = SelfattnClassifier().load(str(tiny_classifier_dir)).predict_texts(["a", "b"])
    assert logged.predict(["a", "b"])["prob_1"].tolist() == pytest.approx(direct["prob_1"].tolist(), abs=1e-6)
    for model_input in (["a"], "a", pd.DataFrame({"sentence": ["a"]}), np.array(["a"], dtype=object)):
        out = logged.predict(model_input, params={"explain": "integrated_gradients"})
        assert out["prob_1"].tolist() == pytest.approx(direct["prob_1"].tolist()[:1], abs=1e-6)
        [pairs] = out["attributions"].tolist()
        assert [token for token, _ in pairs] == ["a"]
    for bad, row in (([1, None], "row 0 is int (1)"), (["a", None], "row 1 is null"), ([["a", "b"]], "row 0 is list")):
        with pytest.raises(MlflowException, match=re.escape(row)):
            logged.predict(bad)


def test_the_scoring_server_takes_every_rest_format_and_answers_400_naming_the_row(logged):
    from fastapi.testclient import TestClient
    from mlflow.pyfunc.scoring_server import init

    client = TestClient(init(logged))
    good = (
        {"inputs": ["a", "b"]},
        {"inputs": "a"},
        {"instances": ["a"]},
        {"dataframe_split": {"columns": ["sentence"], "data": [["a"]]}},
        {"dataframe_records": [{"x": "a"}]},
    )
    for body in good:
        answer = client.post("/invocations", json={**body, "params": {"explain": "gradient_x_input"}})
        assert answer.status_code == 200, answer.text
        rows = answer.json()["predictions"]
        assert rows[0]["attributions"] and abs(rows[0]["prob_0"] + rows[0]["prob_1"] - 1) < 1e-6
    for body, row in (({"inputs": [1, None]}, "row 0 is int"), ({"inputs": [["a", "b"]]}, "row 0 is a nested list"), ({"dataframe_records": [{"x": 3}]}, "row 0 is int"), ({"inputs": []}, "no rows to score")):
        answer = client.post("/invocations", json=body)
        assert answer.status_code == 400 and row in answer.json()["message"]
