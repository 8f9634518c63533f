"""``selfattn tune --workers 4`` on the default journal file: four processes share one study.

The PostgreSQL variant is an integration test (tests/integration/test_optuna_postgres.py); this
one needs no server: the journal file under SELFATTN_HOME, MLflow on SQLite, Prefect's
ephemeral API. About a minute on 2 cores.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_four_workers_on_the_journal_finish_exactly_the_requested_trials(tmp_path, data_dir):
    import optuna
    from mlflow import MlflowClient

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(SELFATTN_HOME=str(home), SELFATTN_DATA_DIR=str(data_dir))
    n_trials = 4
    cmd = [sys.executable, "-m", "selfattn.cli", "tune", "--config", "smoke", "--workers", "4", "--set", f"search.n_trials={n_trials}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(home / "optuna.journal")))
    trials = optuna.load_study(study_name="selfattn-smoke", storage=storage).get_trials(deepcopy=False)
    finished = {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert sorted(t.number for t in trials) == list(range(n_trials)), [(t.number, t.state.name) for t in trials]
    assert all(t.state in finished for t in trials), [(t.number, t.state.name) for t in trials]
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)

    # one MLflow run per trial, nested under the tune run, none left RUNNING
    client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    parents = [r for r in runs if r.info.run_name.startswith("tune-")]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id and "optuna.trial" in r.data.tags]
    assert sorted(int(r.data.tags["optuna.trial"]) for r in nested) == list(range(n_trials))
    assert all(r.info.status == "FINISHED" for r in runs)
