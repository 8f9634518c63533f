"""CLI: commands registered, config refused before any work, deployment built with the cron schedule."""

from __future__ import annotations

from selfattn.cli import main


def test_commands_are_registered(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("run", "tune", "promote", "rollback", "predict", "deploy", "ui"):
        assert cmd in out


def test_run_refuses_unknown_keys_before_any_work(selfattn_home, capsys):
    assert main(["run", "--config", "smoke", "--set", "search.n_trialz=3"]) == 2
    err = capsys.readouterr().err
    assert "search.n_trialz" in err and "n_trials" in err
    assert not any(selfattn_home.iterdir())  # nothing was created


def test_unknown_search_space_keys_are_refused_in_one_paragraph(selfattn_home, capsys):
    for cmd in ("run", "tune"):
        assert main([cmd, "--config", "smoke", "--set", "search.space[optim.lrr].high=0.01"]) == 2
        err = capsys.readouterr().err
        assert "'optim.lrr' is not a key of search.space" in err and "optim.lr" in err and "Traceback" not in err
    assert not any(selfattn_home.iterdir())


def test_prefect_env_points_the_ephemeral_api_at_home(selfattn_home, monkeypatch):
    from flows.cli import prefect_env

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_DATABASE_CONNECTION_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    env = prefect_env(selfattn_home)
    assert env["PREFECT_HOME"] == str(selfattn_home / "prefect")
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == f"sqlite+aiosqlite:///{selfattn_home / 'prefect' / 'prefect.db'}"
    assert env["PREFECT_SERVER_EPHEMERAL_ENABLED"] == "true"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert prefect_env(selfattn_home) == {}


def test_deployment_has_the_cron_schedule():
    from flows.pipeline import build_deployment

    dep = build_deployment(cron="0 3 * * *", config="smoke", overrides=["search.n_trials=4"])
    assert dep.name == "nightly" and dep.flow_name == "selfattn-pipeline"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.parameters == {"config": "smoke", "overrides": ["search.n_trials=4"]}
