"""Optuna on the stack's PostgreSQL storage with 2 worker processes in parallel: the study ends with
exactly the requested number of trials, none lost or duplicated."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from .conftest import selfattn_cmd

pytestmark = pytest.mark.integration

SCRIPTS = Path(__file__).parent / "scripts"


def _interleaved(trials) -> bool:
    """True if some trial of one process started before a trial of the other process finished."""
    by_pid: dict[int, list] = {}
    for t in trials:
        by_pid.setdefault(t.user_attrs["pid"], []).append(t)
    (a, b) = by_pid.values()
    return any(x.datetime_start < y.datetime_complete and y.datetime_start < x.datetime_complete for x in a for y in b)


def test_two_worker_processes_share_one_study(stack, stack_env):
    import optuna

    storage, study_name, n_trials = stack["optuna_storage"], f"it-{uuid.uuid4().hex[:8]}", 10
    optuna.create_study(study_name=study_name, storage=storage, direction="minimize")
    shares = [n_trials // 2 + n_trials % 2, n_trials // 2]  # the requested total, split between the workers
    procs = [
        subprocess.Popen(
            [sys.executable, str(SCRIPTS / "optuna_worker.py"), storage, study_name, str(share), str(worker)],
            env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for worker, share in enumerate(shares)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err

    trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    assert len(trials) == n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))  # no gaps, no duplicates
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    pids = [t.user_attrs["pid"] for t in trials]
    assert sorted(pids.count(p.pid) for p in procs) == sorted(shares)  # each process ran its share
    assert _interleaved(trials), "the two workers never ran at the same time"
    # every value is the objective evaluated at that trial's parameters
    for t in trials:
        assert t.value == pytest.approx((t.params["x"] - 2.0) ** 2 + t.params["y"])


def _has_tune_command() -> bool:
    proc = subprocess.run([*selfattn_cmd(), "tune", "--help"], capture_output=True, text=True, timeout=120)
    return proc.returncode == 0 and "--workers" in proc.stdout


def test_selfattn_tune_two_workers_on_postgres(stack, stack_env, data_dir):
    """``selfattn tune --config smoke --workers 2`` against the stack's PostgreSQL storage."""
    assert _has_tune_command(), "`selfattn tune --help` does not offer --workers"
    import optuna

    study_name, n_trials = f"it-tune-{uuid.uuid4().hex[:8]}", 4
    cmd = [
        *selfattn_cmd(), "tune", "--config", "smoke", "--workers", "2",
        "--set", f"search.storage={stack['optuna_storage']}",
        "--set", f"search.study_name={study_name}",
        "--set", f"search.n_trials={n_trials}",
        "--set", "tracking.experiment=it-tune",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=stack_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    study = optuna.load_study(study_name=study_name, storage=stack["optuna_storage"])
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(finished) == n_trials, [(t.number, t.state.name) for t in trials]
    assert len(trials) == n_trials, f"extra trials beyond the requested {n_trials}: {[(t.number, t.state.name) for t in trials]}"
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert any(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
