"""After any documented command, the user knows what to do next: a missing model names the store
and lists what is in it (predict, explain, promote, rollback alike), and predict / explain without
``--model`` use the champion of this home's last run (real MLflow on SQLite, a tiny real model)."""

from __future__ import annotations

import json

import pytest

from flows.tracking import registry
from selfattn.cli import main

NAME = "first-hour-model"


@pytest.fixture()
def registered(tiny_classifier_dir, experiment_id, mlflow_home):
    """A tiny classifier registered as ``NAME`` v1 and made champion; the home's last run names it."""
    import mlflow

    from flows.serving import log_model

    with mlflow.start_run(experiment_id=experiment_id):
        uri = log_model(str(tiny_classifier_dir)).model_uri
    tags = {registry.TAG_METRIC: "accuracy", registry.TAG_SCORE: "0.7", registry.TAG_EVAL_DIGEST: "d"}
    version = str(registry.register(model_uri=uri, model_name=NAME, run_key="k1", tags=tags, home=mlflow_home).version)
    registry.promote(NAME, version, home=mlflow_home)
    run_dir = mlflow_home / "runs" / "pipeline-abc"
    run_dir.mkdir(parents=True)
    (run_dir / "result.json").write_text(json.dumps({"model_name": NAME, "model_version": version}), encoding="utf-8")
    return mlflow_home


def test_predict_and_explain_without_model_use_the_last_runs_champion(registered, capsys):
    assert main(["predict", "--json", "great fun", "boring and long"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["great fun", "boring and long"]
    assert all(abs(r["prob_0"] + r["prob_1"] - 1) < 1e-5 for r in rows)
    assert main(["explain", "--json", "--method", "gradient_x_input", "great fun"]) == 0
    explained = json.loads(capsys.readouterr().out.splitlines()[0])
    assert explained["text"] == "great fun" and explained["attributions"]


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "--model", "models:/no-such-model@champion", "hello"],
        ["explain", "--model", "models:/no-such-model@champion", "hello"],
        ["promote", "no-such-model", "1"],
        ["rollback", "no-such-model"],
    ],
)
def test_a_missing_model_names_the_store_and_lists_the_models_alike(registered, capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "registered model 'no-such-model' not found in the model store sqlite:///" in err
    assert str(registered / "mlflow.db") in err and f"registered models there: {NAME}" in err
    assert "MlflowException" not in err and "Traceback" not in err


def test_a_missing_version_or_alias_lists_the_versions_and_aliases(registered, capsys):
    assert main(["promote", NAME, "7"]) == 2
    assert "has no version '7'" in (err := capsys.readouterr().err) and "its versions: 1" in err and "champion -> v1" in err
    assert main(["predict", "--model", f"models:/{NAME}@staging", "hello"]) == 2
    assert "has no alias 'staging'" in (err := capsys.readouterr().err) and "its versions: 1" in err


def test_predict_without_model_on_a_home_without_runs_says_what_to_do(mlflow_home, capsys):
    assert main(["predict", "hello"]) == 2
    err = capsys.readouterr().err
    assert "no --model given" in err and str(mlflow_home) in err and "selfattn run" in err
