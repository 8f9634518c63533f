"""The pyfunc model: raw text in, label + probabilities out, never crashing on hostile input."""

from __future__ import annotations

import math
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
    for model_input in (np.array(["great fun", ""], dtype=object), pd.DataFrame({"text": ["great fun", ""]})):
        out = loaded.predict(model_input)
        assert out["prob_1"].tolist() == pytest.approx(direct["prob_1"].tolist(), abs=1e-6)
    # an object tensor: the scoring server passes rows as sent (no cast of 1 or null to "1", "None")
    assert info.signature is not None and info.signature.inputs.inputs[0].type == np.dtype(object)
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
