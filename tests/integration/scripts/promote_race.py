"""One "host" of the promotion race: its own SELFATTN_HOME, the shared MLflow server from
MLFLOW_TRACKING_URI. Creates a version per score (argv) and runs the champion gate on each
right away. The hosts meet at file barriers (argv[1]: each host touches its name in a folder,
then waits for the other's) before starting and before each gate, so the gates overlap on a
loaded machine too; each prints how often its gates found the registry
lock held by the other host and waited (the gate logs it): ``<host> lock-waits=<n>``."""

import logging
import sys
import time
from pathlib import Path

from mlflow import MlflowClient

from flows.tracking import registry, runs

barrier, model, host, scores = Path(sys.argv[1]), sys.argv[2], sys.argv[3], [float(s) for s in sys.argv[4:]]


class _Waits(logging.Handler):
    """Counts the registry lock's "waiting" records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.n = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.n += "waiting" in record.getMessage()


waits = _Waits()
registry.log.addHandler(waits)
registry.log.setLevel(logging.INFO)
runs.configure()
client = MlflowClient()
exp = runs.ensure_experiment("promote-race")
try:
    client.create_registered_model(model)
except Exception:  # the other host created it first
    pass


def meet(name: str) -> None:
    """Wait until both hosts have reached the barrier ``name`` (a folder each host touches its name in)."""
    here = barrier / name
    here.mkdir(exist_ok=True)
    (here / host).touch()
    deadline = time.monotonic() + 300
    while len(list(here.iterdir())) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"{host}: the other host never reached the barrier {name}")
        time.sleep(0.01)


meet("start")  # imported and connected
for i, score in enumerate(scores):
    run = client.create_run(exp, run_name=f"{host}-{i}")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(
        model, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id,
        tags={registry.TAG_METRIC: "accuracy", registry.TAG_SCORE: f"{score:.6f}", registry.TAG_EVAL_DIGEST: "same-dev-set"},
    )
    meet(f"gate-{i}")  # both hosts gate their i-th version at once, however loaded the machine
    decision = registry.gate(model_name=model, version=str(mv.version), metric="accuracy", margin=0.0)
    print(f"{host} v{mv.version} score={score:.3f} promoted={decision.promoted} over={decision.champion_version}", flush=True)
print(f"{host} lock-waits={waits.n}", flush=True)
