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


def test_help_follows_the_conventions(capsys):
    from selfattn import __version__

    assert main(["-h"]) == 0
    out = capsys.readouterr().out
    assert "SELFATTN_HOME" in out and "SELFATTN_DATA_DIR" in out and "presets" in out
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == __version__
    assert main(["run", "-h"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # help text wraps at any space
    assert "--set 'search.space[optim.lr].high=0.01'" in out  # brackets shown, as typed
    assert "--set KEY=VALUE" in out and "--config PRESET|FILE" in out and "<bool>" not in out and "<list[str]>" not in out
    assert main(["status", "-h"]) == 0
    assert "--limit INTEGER" in capsys.readouterr().out
    # arguments in Click's form: TEXTS..., NAME, [NAME]; never Typer's {texts}... <list[str]>
    assert main(["predict", "-h"]) == 0
    out = capsys.readouterr().out
    assert "Usage: selfattn predict [OPTIONS] TEXTS..." in out and any(line.split()[:2] == ["TEXTS...", "texts"] for line in out.splitlines())
    assert "{" not in out and "<" not in out
    assert main(["promote", "-h"]) == 0 and "Usage: selfattn promote [OPTIONS] NAME VERSION" in capsys.readouterr().out
    assert main(["presets", "-h"]) == 0 and "Usage: selfattn presets [OPTIONS] [NAME]" in capsys.readouterr().out
    assert main(["predict"]) == 2 and "Missing argument 'TEXTS'" in capsys.readouterr().err


def test_presets_are_listed_and_printed(capsys):
    from flows.config import PRESETS, load_pipeline_config, preset_path

    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PRESETS) and all(len(line.split()) > 3 for line in lines)
    assert main(["presets", "smoke"]) == 0
    assert capsys.readouterr().out == preset_path("smoke").read_text(encoding="utf-8")
    assert main(["presets", "nope"]) == 2
    assert f"the presets: {', '.join(PRESETS)}" in capsys.readouterr().err
    assert load_pipeline_config("smoke").name == "smoke"


def test_a_bad_set_value_names_the_set_not_the_preset(selfattn_home, capsys):
    assert main(["run", "--config", "smoke", "--set", "finetune.train.max_steps=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid --set finetune.train.max_steps=abc (applied to ")
    assert "finetune.train.max_steps: Input should be a valid integer" in err and "from --set finetune.train.max_steps=abc" in err


def test_config_errors_come_before_the_heavy_imports(tmp_path):
    import os
    import subprocess
    import sys

    code = (
        "import sys; from selfattn.cli import main; rc = main(['run', '--config', 'nosuch']); "
        "print(rc, sorted(m for m in ('torch', 'mlflow', 'prefect', 'optuna') if m in sys.modules))"
    )
    env = {**os.environ, "SELFATTN_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split(maxsplit=1) == ["2", "[]\n"], done.stdout + done.stderr
    assert "neither a preset" in done.stderr


def test_status_refuses_a_state_prefect_does_not_have(selfattn_home, capsys):
    assert main(["status", "--state", "Bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown flow-run state 'Bogus'" in err and "Late" in err and "Crashed" in err


def test_status_on_a_home_without_runs_starts_no_server(tmp_path):
    import os
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    code = "import sys; from selfattn.cli import main; rc = main(['status']); print(rc, 'prefect' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, "SELFATTN_HOME": str(home)}, timeout=120)
    assert done.stdout.splitlines() == [f"no flow runs yet in {home} (`selfattn run` starts one)", "0 False"], done.stdout + done.stderr
    assert not (home / "prefect" / "prefect.db").exists()
