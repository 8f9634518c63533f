"""Files of a local store stay under SELFATTN_HOME, and a full disk under it is one clear error.

Real MLflow (SQLite store) and real stage directories; the full disk is a small tmpfs mounted by
the test (skipped where mounting is not allowed): (b) artifact logging, (c) the done-marker."""

from __future__ import annotations

import pytest

from flows.stages.base import MARKER, Artifact, Logged, Stage
from selfattn.cli import main
from selfattn.errors import EXIT_DISK_FULL, DiskFull


@pytest.fixture()
def restore_mlflow_uri():
    import mlflow

    before = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(before)


def test_artifacts_of_a_sqlite_store_the_user_named_go_under_the_home(selfattn_home, tmp_path, monkeypatch, restore_mlflow_uri):
    from mlflow import MlflowClient

    from flows.tracking import runs

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'elsewhere.db'}")
    runs.configure(selfattn_home)
    exp = runs.ensure_experiment("local-store", selfattn_home)
    run_id = MlflowClient().create_run(exp).info.run_id
    runs.log(run_id, Logged(texts={"notes/a.txt": "kept under the home"}))
    logged = list((selfattn_home / "mlartifacts").rglob("notes/a.txt"))
    assert len(logged) == 1 and logged[0].read_text() == "kept under the home"
    assert not (work / "mlruns").exists() and list(work.iterdir()) == []


def test_every_store_command_takes_home_and_names_the_store(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "not-this-one"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "chosen"
    rc = main(["rollback", "--home", str(home), "no-such-model"])
    err = capsys.readouterr().err
    assert rc == 2 and f"store: MLflow sqlite:///{home / 'mlflow.db'}" in err, err
    assert (home / "mlflow.db").is_file() and not (tmp_path / "not-this-one").exists()
    for command in ("run", "tune", "promote", "rollback", "predict", "explain", "deploy", "status", "ui"):
        assert main([command, "--help"]) == 0
        assert "--home" in capsys.readouterr().out, command


def test_a_full_disk_while_logging_artifacts_is_disk_full_and_a_retry_logs_them(small_disk, tmp_path, monkeypatch, restore_mlflow_uri):
    from mlflow import MlflowClient

    from flows.tracking import runs

    home = small_disk.path / "home"
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs.configure(home)
    exp = runs.ensure_experiment("disk-full", home)
    run_id = MlflowClient().create_run(exp).info.run_id
    big = tmp_path / "history.json"  # outside the small disk
    big.write_bytes(b"[" + b"0," * 400_000 + b"0]")
    small_disk.fill(leave=64 * 1024)
    with pytest.raises(DiskFull) as err:
        runs.log(run_id, Logged(artifacts=[Artifact(path=str(big), to="history")]))
    assert err.value.exit_code == EXIT_DISK_FULL and str(home / "mlartifacts") in str(err.value) and "needs about 781.3 KiB" in str(err.value)
    small_disk.free_space()
    runs.log(run_id, Logged(artifacts=[Artifact(path=str(big), to="history")]))
    copied = list((home / "mlartifacts").rglob("history/history.json"))
    assert len(copied) == 1 and copied[0].read_bytes() == big.read_bytes()


def test_a_full_disk_while_writing_the_done_marker_leaves_the_stage_unfinished(small_disk):
    stage = Stage(home=small_disk.path / "home", name="evaluate", inputs={"seed": 1})
    stage.start()
    (stage.dir / "metrics.json").write_text('{"accuracy": 0.5}')
    result = {"metrics": {"accuracy": 0.5}, "notes": "x" * 200_000}
    small_disk.fill(leave=4096)
    with pytest.raises(DiskFull) as err:
        stage.finish(result)
    assert str(stage.dir / MARKER) in str(err.value) and err.value.exit_code == EXIT_DISK_FULL
    assert stage.done() is None and not [p for p in stage.dir.iterdir() if p.name.startswith(".")]
    assert (stage.dir / "metrics.json").read_text() == '{"accuracy": 0.5}'  # what the stage wrote before is intact
    small_disk.free_space()
    stage.finish(result)
    assert stage.done().result == result
