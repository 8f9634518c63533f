"""One "host" of the promotion race: its own SELFATTN_HOME, the shared MLflow server from
MLFLOW_TRACKING_URI. Creates a version per score (argv) and runs the champion gate on each
right away; starts at the wall-clock time in argv[1] so the two hosts overlap."""

import sys
import time

from mlflow import MlflowClient

from flows.tracking import registry, runs

start_at, model, host, scores = float(sys.argv[1]), sys.argv[2], sys.argv[3], [float(s) for s in sys.argv[4:]]
runs.configure()
client = MlflowClient()
exp = runs.ensure_experiment("promote-race")
try:
    client.create_registered_model(model)
except Exception:  # the other host created it first
    pass
time.sleep(max(0.0, start_at - time.time()))
for i, score in enumerate(scores):
    run = client.create_run(exp, run_name=f"{host}-{i}")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(
        model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
        tags={registry.TAG_METRIC: "accuracy", registry.TAG_SCORE: f"{score:.6f}", registry.TAG_EVAL_DIGEST: "same-dev-set"},
    )
    decision = registry.gate(model_name=model, version=str(mv.version), metric="accuracy", margin=0.0)
    print(f"{host} v{mv.version} score={score:.3f} promoted={decision.promoted} over={decision.champion_version}", flush=True)
