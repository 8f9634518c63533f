"""SIGKILL the real pipeline at four points, re-run the same command each time.

One home, one sequence (a preempted nightly job that keeps getting killed):

    run 1  killed during pretraining       (a pretraining checkpoint exists)
    run 2  killed during an Optuna trial   (trial 0 complete, trial 1 running)
    run 3  killed during fine-tuning       (a fine-tuning checkpoint exists)
    run 4  killed during registration      (the model version exists, the run is not over)
    run 5  finishes

Kill points are detected by watching what the pipeline writes (checkpoint files, trial
directories, the registry table), never by sleeping. The whole process group gets a real
SIGKILL, Prefect's ephemeral server included. Then a poisoned (NaN) fine-tune runs on the same
home. The tests below assert on what the sequence left behind.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from .conftest import SMOKE_SETS, Pipeline, checkpoint_step, model_versions, pipeline_env, query, runs, stage_dirs, study_trials, trials

MODEL = "selfattn-sst2-smoke"
SECRET = f"s3cr3t-{uuid.uuid4().hex}"


def _trial_value(home: Path, number: int) -> float | None:
    return next((t.value for t in study_trials(home) if t.number == number), None)


def _marker_mtimes(home: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (home / "runs").glob("*/_SUCCESS")}


def _ckpt(home: Path, stage: str) -> Path | None:
    for d in stage_dirs(home, stage):
        for p in sorted((d / "train" / "checkpoints").glob("step-*/state.pt"), reverse=True):
            return p
    return None


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, data_dir) -> dict:
    base = tmp_path_factory.mktemp("crash")
    home, work, logs = base / "home", base / "work", base / "logs"
    work.mkdir()
    env = pipeline_env(home, data_dir, MLFLOW_TRACKING_PASSWORD=SECRET, PGPASSWORD=SECRET, SELFATTN_TEST_API_TOKEN=SECRET)
    obs: dict = {"home": home, "work": work, "logs": logs, "markers": {}}

    def start(name: str, sets: list[str] = (), extra_env: dict[str, str] | None = None) -> Pipeline:
        return Pipeline(env={**env, **(extra_env or {})}, cwd=work, log_dir=logs, name=name, sets=[*SMOKE_SETS, *sets])

    # run 1: killed during pretraining, once a checkpoint is on disk
    p = start("1-pretrain")
    p.wait_for("a pretraining checkpoint", lambda: _ckpt(home, "pretrain") is not None)
    p.kill()
    obs["pretrain_kill_step"] = checkpoint_step(_ckpt(home, "pretrain"))
    obs["pretrain_done_at_kill"] = any((d / "_SUCCESS").is_file() for d in stage_dirs(home, "pretrain"))
    obs["markers"]["after_1"] = _marker_mtimes(home)

    # run 2: killed during the second Optuna trial (the first one is complete)
    p = start("2-trial")
    p.wait_for("Optuna trial 1 to start", lambda: any((d / "trial-1").is_dir() for d in stage_dirs(home, "search")))
    p.kill()
    obs["trials_at_kill"] = trials(home)
    obs["trial0_value_at_kill"] = _trial_value(home, 0)
    obs["markers"]["after_2"] = _marker_mtimes(home)

    # run 3: killed during fine-tuning, once a checkpoint is on disk
    p = start("3-finetune")
    p.wait_for("a fine-tuning checkpoint", lambda: _ckpt(home, "finetune") is not None)
    p.kill()
    obs["finetune_kill_step"] = checkpoint_step(_ckpt(home, "finetune"))
    obs["finetune_done_at_kill"] = any((d / "_SUCCESS").is_file() for d in stage_dirs(home, "finetune"))
    obs["markers"]["after_3"] = _marker_mtimes(home)

    # run 4: killed during registration, as soon as the model version exists
    p = start("4-register")
    p.wait_for("the registered model version", lambda: bool(model_versions(home)))
    p.kill()
    obs["versions_at_kill"] = model_versions(home)
    obs["markers"]["after_4"] = _marker_mtimes(home)

    # run 5: the same command finishes
    p = start("5-final")
    obs["final_rc"] = p.wait(timeout=900)
    obs["final_stdout"], obs["final_stderr"] = p.stdout, p.stderr
    obs["markers"]["after_5"] = _marker_mtimes(home)
    obs["runs_before_nan"] = runs(home)
    obs["trials"] = trials(home)
    obs["retried"] = [(t.number, t.state.name, t.system_attrs["failed_trial"]) for t in study_trials(home) if "failed_trial" in t.system_attrs]
    obs["versions"] = model_versions(home)
    obs["aliases"] = query(home / "mlflow.db", "select alias, version from registered_model_aliases where name = ?", (MODEL,))

    # afterwards: a NaN loss injected in fine-tuning on the same home (a sitecustomize patches the
    # engine's loss seam); a patience that never triggers in 30 steps makes it a new fine-tuning stage
    hook = Path(__file__).parent / "nan_hook"
    nan_env = {"SELFATTN_TEST_NAN_STEP": "13", "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))}
    p = start("6-nan", ["finetune.train.early_stopping_patience=100"], nan_env)
    obs["nan_rc"] = p.wait(timeout=900)
    obs["nan_stderr"] = p.stderr
    obs["runs"] = runs(home)
    obs["versions_after_nan"] = model_versions(home)
    return obs


def _stage_runs(obs: dict, stage: str, key: str = "runs_before_nan") -> list[dict]:
    return [r for r in obs[key] if r["tags"].get("selfattn.stage") == stage]


def test_final_run_finishes(crashed):
    assert crashed["final_rc"] == 0, crashed["final_stderr"][-4000:]
    assert "pipeline run" in crashed["final_stdout"]


def test_pretraining_resumes_from_its_last_checkpoint(crashed):
    step = crashed["pretrain_kill_step"]
    assert not crashed["pretrain_done_at_kill"] and 0 < step < 80
    start_steps = sorted(int(r["params"]["info.start_step"]) for r in _stage_runs(crashed, "pretrain") if "info.start_step" in r["params"])
    assert start_steps == [0, step], f"run 1 starts at 0, run 2 resumes at the killed run's checkpoint ({step}); got {start_steps}"
    history = json.loads((stage_dirs(crashed["home"], "pretrain")[0] / "train" / "history.json").read_text())
    assert max(h["step"] for h in history) == 80
    assert len(stage_dirs(crashed["home"], "pretrain")) == 1, "the resumed stage must reuse the killed one's directory"


def test_finetuning_resumes_from_its_last_checkpoint(crashed):
    step = crashed["finetune_kill_step"]
    assert not crashed["finetune_done_at_kill"] and step > 0
    start_steps = sorted(int(r["params"]["info.start_step"]) for r in _stage_runs(crashed, "finetune") if "info.start_step" in r["params"])
    assert start_steps == [0, step], f"expected a fresh start then a resume at step {step}; got {start_steps}"


def test_finished_stages_are_not_redone(crashed):
    m = crashed["markers"]
    # a stage's done-marker, once written, is never rewritten by a later run
    for earlier, later in (("after_1", "after_2"), ("after_2", "after_3"), ("after_3", "after_4"), ("after_4", "after_5")):
        for stage, mtime in m[earlier].items():
            assert m[later][stage] == mtime, f"{stage} was redone between {earlier} and {later}"
    assert {k.split("-")[0] for k in m["after_1"]} >= {"data", "validate"}
    assert {k.split("-")[0] for k in m["after_2"]} >= {"pretrain"}
    assert {k.split("-")[0] for k in m["after_3"]} >= {"search"}
    assert {k.split("-")[0] for k in m["after_4"]} >= {"finetune", "evaluate"}
    out = crashed["final_stdout"]
    for stage in ("data", "pretrain", "search", "finetune", "evaluate"):
        assert any(line.split()[:2] == [stage, "cached"] for line in out.splitlines()), f"{stage} not reported cached:\n{out}"


def test_optuna_study_keeps_completed_trials_and_retries_the_dead_one(crashed):
    at_kill = dict(crashed["trials_at_kill"])
    assert at_kill == {0: "COMPLETE", 1: "RUNNING"}
    final = dict(crashed["trials"])
    assert final[0] == "COMPLETE" and final[1] == "FAIL"
    value_at_kill = crashed["trial0_value_at_kill"]
    assert value_at_kill is not None and _trial_value(crashed["home"], 0) == value_at_kill
    assert (crashed["home"] / "optuna.journal").is_file() and not (crashed["home"] / "optuna.db").exists()
    retried = {number: (state, failed) for number, state, failed in crashed["retried"]}
    assert any(failed == 1 and state in ("COMPLETE", "PRUNED") for state, failed in retried.values()), retried
    finished = [s for s in final.values() if s in ("COMPLETE", "PRUNED")]
    assert len(finished) == 2, f"the study holds n_trials (2) finished trials, no more: {final}"
    assert "RUNNING" not in final.values() and "WAITING" not in final.values(), final


def test_no_mlflow_run_stays_running(crashed):
    all_runs = crashed["runs"]
    assert not [r for r in all_runs if r["status"] == "RUNNING"]
    killed = [r for r in all_runs if r["status"] == "KILLED"]
    # the four killed pipelines' parent runs at least, each marked on the next start
    parents = [r for r in killed if "mlflow.parentRunId" not in r["tags"]]
    assert len(parents) == 4, [(r["name"], r["status"]) for r in all_runs]
    assert all(r["tags"].get("selfattn.stale") for r in killed)
    stages_killed = {r["tags"].get("selfattn.stage") for r in killed}
    assert {"pretrain", "trial", "finetune", "register"} <= stages_killed, stages_killed


def test_registry_ends_with_exactly_one_version(crashed):
    assert crashed["versions_at_kill"] == [(MODEL, 1)]
    assert crashed["versions"] == [(MODEL, 1)]
    assert dict(crashed["aliases"]) == {"champion": 1, "challenger": 1}


def test_nan_loss_stops_finetuning_keeps_the_checkpoint_and_registers_nothing(crashed):
    assert crashed["nan_rc"] == 3, crashed["nan_stderr"][-3000:]
    errors = [line for line in crashed["nan_stderr"].splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged") and "(step 10)" in errors[0], errors
    poisoned = [d for d in stage_dirs(crashed["home"], "finetune") if not (d / "_SUCCESS").is_file()]
    assert len(poisoned) == 1
    # checkpoint at step 10, NaN injected at step 13, read out at step 15: step 10 is kept
    assert checkpoint_step(poisoned[0] / "train" / "checkpoints" / "step-00000010" / "state.pt") == 10
    assert crashed["versions_after_nan"] == [(MODEL, 1)], "nothing may be registered from a diverged run"
    failed = [r for r in crashed["runs"] if r["tags"].get("selfattn.stage") == "finetune" and r["status"] == "FAILED"]
    assert failed and "diverged" in failed[-1]["tags"].get("selfattn.error", "")
    assert not [r for r in crashed["runs"] if r["status"] == "RUNNING"]


def test_no_secret_from_the_environment_is_stored(crashed):
    """Passwords in the environment never reach params, tags, artifacts, stage files or logs."""
    needle = SECRET.encode()
    for root in (crashed["home"], crashed["work"], crashed["logs"]):
        for path in root.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), f"secret found in {path}"
    for r in crashed["runs"]:
        assert not any(SECRET in str(v) for v in (*r["params"].values(), *r["tags"].values()))
