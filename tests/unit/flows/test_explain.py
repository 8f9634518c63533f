"""Explanations served and shown: the logged pyfunc's `explain` param, `selfattn explain`, the HTML page."""

from __future__ import annotations

import json
import warnings

import pandas as pd
import pytest

from flows.serving import SelfattnClassifier, log_model
from selfattn.cli import main

TEXTS = ["great fun", "a dull , lifeless mess .", ""]


def _direct(model_dir, texts, method):
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.eval.interpret import explain

    pre = load_pretrained(model_dir)
    return explain(pre.model, pre.tokenizer, [t.strip() for t in texts], method=method)


def test_logged_pyfunc_explains_on_request_and_the_command_resolves_it(tiny_classifier_dir, mlflow_home, experiment_id, capsys):
    import mlflow
    from mlflow.exceptions import MlflowException

    with mlflow.start_run(experiment_id=experiment_id), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = log_model(str(tiny_classifier_dir), name="model", registered_model_name="explain-test")
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"explain": "none", "explain_steps": 32, "explain_unit": "token"}
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    frame = pd.DataFrame({"text": TEXTS})  # the signature takes a one-column frame or an object array

    plain = loaded.predict(frame)
    assert "attributions" not in plain.columns
    for method in ("integrated_gradients", "attention_rollout"):
        out = loaded.predict(frame, params={"explain": method})
        assert out["prob_1"].tolist() == pytest.approx(plain["prob_1"].tolist(), abs=1e-6)
        direct = _direct(tiny_classifier_dir, TEXTS, method)
        for row, ref in zip(out["attributions"], direct):
            assert [t for t, _ in row] == ref.tokens  # [token, score] per token of the text
            assert [s for _, s in row] == pytest.approx(ref.scores, abs=1e-6)
        assert out["attributions"][2] == []  # an empty text has nothing to explain
        assert len(out["attributions"][0]) == len("great fun")  # char tokenizer: one per character
    words = loaded.predict(pd.DataFrame({"text": ["a dull , lifeless mess ."]}), params={"explain": "gradient_x_input", "explain_unit": "word"})
    assert [w for w, _ in words["attributions"][0]] == ["a", "dull", ",", "lifeless", "mess", "."]
    with pytest.raises(MlflowException, match="'shap' is unknown"):
        loaded.predict(frame, params={"explain": "shap"})

    capsys.readouterr()  # `selfattn explain` on the registered version, coloured for the terminal
    assert main(["explain", "--model", "models:/explain-test/1", "great fun"]) == 0
    out = capsys.readouterr().out
    assert "great" in out and "integrated_gradients" in out and "completeness error" in out


def test_explain_command_on_a_directory(tiny_classifier_dir, capsys):
    assert main(["explain", "--model", str(tiny_classifier_dir), "--json", "--method", "attention_rollout", "a dull mess", ""]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["text"] for r in rows] == ["a dull mess", ""]
    assert [w for w, _ in rows[0]["attributions"]] == ["a", "dull", "mess"]
    assert sum(s for _, s in rows[0]["attributions"]) == pytest.approx(1.0)  # rollout over mean pooling
    assert rows[1]["attributions"] == [] and "empty" in rows[1]["note"]


def test_rich_render_colours_by_sign(tiny_classifier_dir):
    from rich.console import Console

    from flows.explain_cli import render

    clf = SelfattnClassifier().load(str(tiny_classifier_dir))
    from flows.serving import explain_items

    [a] = explain_items(clf, ["a dull mess"], method="gradient_x_input")
    console = Console(record=True, width=120, color_system="truecolor")
    render([a], clf.labels, console=console)
    text = console.export_text(clear=False)
    html = console.export_html(inline_styles=True)
    words = a.words()
    top = max(words, key=lambda w: abs(w[1]))
    full = "#00ff00" if top[1] > 0 else "#ff0000"  # the largest |score| gets the full colour
    assert full in html and "a dull mess" in text


def test_explain_command_refuses_a_language_model(tmp_path, capsys):
    import torch

    from selfattn.io.checkpoint import save_pretrained
    from selfattn.config import ModelConfig
    from selfattn.nn.models import DecoderLM
    from selfattn.data.tokenization import CharTokenizer

    torch.manual_seed(0)
    tok = CharTokenizer.train(["abc "])
    lm = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, context_length=16, n_layers=1, d_model=32, n_heads=2))
    save_pretrained(lm, tmp_path / "lm", tokenizer=tok)
    assert main(["explain", "--model", str(tmp_path / "lm"), "--method", "attention_rollout", "abc"]) == 2
    err = capsys.readouterr().err
    assert "attention_rollout" in err and "language model" in err and "Traceback" not in err


def test_a_calibrated_model_explains_the_probabilities_it_serves(tiny_classifier_dir, tmp_path):
    """The pyfunc scores with the checkpoint's temperature; its explanations use the same one."""
    import shutil

    from flows.serving import explain_items
    from selfattn.eval.calibration import save_temperature
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.eval.interpret import explain

    calibrated = shutil.copytree(tiny_classifier_dir, tmp_path / "calibrated")
    save_temperature(calibrated, 3.0)
    clf = SelfattnClassifier().load(str(calibrated))
    served = clf.predict_texts(["a dull mess"])
    [a] = explain_items(clf, ["a dull mess"], method="integrated_gradients", steps=16)
    assert a.probs[1] == pytest.approx(float(served["prob_1"][0]), abs=1e-6)
    pre = load_pretrained(calibrated)
    [ref] = explain(pre.model, pre.tokenizer, ["a dull mess"], method="integrated_gradients", steps=16, temperature=3.0)
    [raw] = explain(pre.model, pre.tokenizer, ["a dull mess"], method="integrated_gradients", steps=16)
    assert a.scores == pytest.approx(ref.scores, abs=1e-7) and a.scores != pytest.approx(raw.scores, abs=1e-7)
