"""The embedded Optuna storage (a journal file under the home): 4 processes on one study, and a
trial whose process was SIGKILLed is failed and retried, as the RDB heartbeat does."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from flows import tuning
from flows.config import PipelineConfig, study_storage_url

N_TRIALS = 8


def _cfg(**search) -> PipelineConfig:
    # the objectives below sample their own toy parameters: no search.space needed
    return PipelineConfig.model_validate({"search": {"study_name": "journal", "n_trials": N_TRIALS, "pruner": "none", "direction": "minimize", **search}})


def _objective(trial) -> float:
    x, y = trial.suggest_float("x", -10.0, 10.0), trial.suggest_int("y", 0, 5)
    trial.set_user_attr("pid", os.getpid())
    return (x - 2.0) ** 2 + y


def _wait_for_all(rendezvous: Path, n: int, timeout_s: float = 300.0) -> None:
    """A barrier across processes: mark this one as arrived, wait until ``n`` have."""
    (rendezvous / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout_s
    while len(list(rendezvous.iterdir())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(rendezvous.iterdir()))} of {n} workers reached the barrier in {timeout_s:.0f} s")
        time.sleep(0.01)


def _worker(cfg_json: str, home: str, worker: int, share: int, rendezvous: str, n_workers: int) -> int:
    """One ``selfattn tune`` worker whose first trial waits inside the trial until every worker is
    inside one: the trials provably overlap, however the processes are scheduled."""
    cfg = PipelineConfig.model_validate_json(cfg_json)
    first = True

    def objective(trial) -> float:
        nonlocal first
        value = _objective(trial)
        if first:
            first = False
            _wait_for_all(Path(rendezvous), n_workers)
        return value

    study = tuning.optimize(cfg, objective, home=Path(home), worker=worker, share=share)
    return tuning.n_finished(study)


def _hang(trial) -> float:
    trial.suggest_float("x", -10.0, 10.0)
    trial.suggest_int("y", 0, 5)
    Path(os.environ["MARK"]).write_text(str(trial.number))
    time.sleep(600)
    return 0.0


def _hanging_worker(cfg_json: str, home: str, mark: str) -> None:
    os.environ["MARK"] = mark
    tuning.optimize(PipelineConfig.model_validate_json(cfg_json), _hang, home=Path(home), share=1)


def _states(study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def test_default_storage_is_a_journal_under_the_home_and_an_old_sqlite_db_is_kept(tmp_path):
    cfg = _cfg()
    assert study_storage_url(cfg, tmp_path) == f"journal:///{tmp_path / 'optuna.journal'}"
    (tmp_path / "optuna.db").touch()
    assert study_storage_url(cfg, tmp_path) == f"sqlite:///{tmp_path / 'optuna.db'}", "an existing study database keeps being used"
    assert study_storage_url(_cfg(storage="postgresql://u@h/db"), tmp_path) == "postgresql://u@h/db"


def test_four_workers_share_the_journal_study_without_lost_or_duplicate_trials(tmp_path):
    import optuna

    from flows import tune  # here, not at the top: each spawned worker re-imports this module

    cfg = _cfg()
    split = tune.shares(N_TRIALS - tuning.n_finished(tuning.make_study(cfg, tmp_path)), 4)
    assert min(split) >= 1, split  # every worker runs a trial, so every one reaches the barrier
    rendezvous = tmp_path / "rendezvous"
    rendezvous.mkdir()
    with ProcessPoolExecutor(max_workers=4, mp_context=mp.get_context("spawn")) as pool:
        jobs = [pool.submit(_worker, cfg.model_dump_json(), str(tmp_path), i, split[i], str(rendezvous), 4) for i in range(4)]
        done = [f.result() for f in jobs]
    assert max(done) == N_TRIALS
    assert (tmp_path / "optuna.journal").is_file() and not (tmp_path / "optuna.db").exists()

    trials = tuning.make_study(cfg, tmp_path).get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(N_TRIALS)), "no gap, no duplicate number"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials), _states(tuning.make_study(cfg, tmp_path))
    pids = [t.user_attrs["pid"] for t in trials]
    assert sorted(pids.count(p) for p in set(pids)) == sorted(split), "each process ran exactly its share"
    assert len(list(rendezvous.iterdir())) == 4, "every worker was inside a trial while the others were"
    assert any(a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete for a in trials for b in trials if a.user_attrs["pid"] != b.user_attrs["pid"]), "the workers never overlapped"
    for t in trials:
        assert t.value == pytest.approx((t.params["x"] - 2.0) ** 2 + t.params["y"])
    # a re-run of the finished study adds nothing
    tuning.optimize(cfg, _objective, home=tmp_path)
    assert len(tuning.make_study(cfg, tmp_path).get_trials(deepcopy=False)) == N_TRIALS


def test_a_killed_trial_is_failed_and_retried_with_its_parameters(tmp_path):
    import optuna

    cfg = _cfg(n_trials=2, heartbeat_interval_s=1, grace_period_s=2)
    mark = tmp_path / "running"
    proc = mp.get_context("spawn").Process(target=_hanging_worker, args=(cfg.model_dump_json(), str(tmp_path), str(mark)))
    proc.start()
    deadline = time.monotonic() + 120
    while not mark.exists():
        assert proc.is_alive() and time.monotonic() < deadline, "the worker never started its trial"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert _states(tuning.make_study(cfg, tmp_path)) == {0: "RUNNING"}, "a killed trial stays RUNNING until someone notices"
    time.sleep(3)  # past the grace period: the dead trial's heartbeat is stale

    study = tuning.optimize(cfg, _objective, home=tmp_path)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials.values() if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state == optuna.trial.TrialState.COMPLETE
    assert retry[0].params == trials[0].params, "the retry runs the dead trial's parameters"
    assert tuning.n_finished(study) == 2 and len(trials) == 3, _states(study)
