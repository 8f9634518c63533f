"""CLI commands contributed by flows (registered through the selfattn.cli entry point).

``run``, ``tune``, ``promote``, ``rollback``, ``predict``, ``explain``, ``deploy``, ``status``, ``ui``, ``presets``. Heavy libraries
(prefect, mlflow, optuna, torch) are imported inside the commands; the embedded stores under
``SELFATTN_HOME`` are configured here, at command time, never on import.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from selfattn.errors import UserError

CONFIG_HELP = "a preset (`selfattn presets` lists them) or a YAML file"
SET_HELP = (
    "override a config key, e.g. --set search.n_trials=4 (repeatable); a searched finetune key is fixed "
    "(--set finetune.optim.lr=0.001), a range is set with brackets (--set 'search.space[optim.lr].high=0.01')"
)


MODEL_HELP = (
    "models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a model directory; "
    "default: the champion of the model this home's last `selfattn run` registered"
)


def prefect_env(home: Path) -> dict[str, str]:
    """Environment for Prefect's embedded mode: ephemeral API with its database under home.

    Prefect reads its settings when it is imported, so this runs before ``import prefect``.
    A configured server (``PREFECT_API_URL``) or an explicit database URL wins.
    """
    env: dict[str, str] = {}
    if os.environ.get("PREFECT_API_URL"):
        return env
    prefect_home = home / "prefect"
    env["PREFECT_HOME"] = os.environ.get("PREFECT_HOME") or str(prefect_home)
    env["PREFECT_SERVER_EPHEMERAL_ENABLED"] = "true"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the subprocess server can take >20 s (Prefect's default) to boot on a busy 2-core machine
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if not (os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL") or os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL")):
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"
    return env


def setup_home() -> Path:
    """Create ``SELFATTN_HOME`` and point Prefect at it (call at the start of a command)."""
    from flows.paths import selfattn_home

    home = selfattn_home()
    home.mkdir(parents=True, exist_ok=True)
    env = prefect_env(home)
    if "PREFECT_HOME" in env:
        Path(env["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if "prefect" in sys.modules and env:
        # already imported (e.g. under a test harness): settings are fixed, leave them alone
        return home
    os.environ.update(env)
    os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "1")
    return home


def warm_start(home: Path, experiment: str) -> None:
    """Boot Prefect's ephemeral API (a subprocess) while MLflow creates its store, in parallel.

    Both cost seconds on a fresh home; the flow then finds the server running (Prefect keeps one
    ephemeral server per process) and the MLflow tables created. No-op for a configured server.
    """
    import threading

    from flows.tracking import runs

    thread = None
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.server.api.server import SubprocessASGIServer

        thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-ephemeral-start", daemon=True)
        thread.start()
    runs.configure(home)
    runs.ensure_experiment(experiment, home)
    if thread is not None:
        thread.join()


def _embedded_settings():
    """Prefect settings for a run on the embedded (ephemeral) API; a no-op against a server.

    Prefect 3.9 starts a flow-run heartbeat thread per (sub-)flow and joins it on exit while it
    sleeps in 1 s steps: ~1 s per sub-flow (6 of them per pipeline). Heartbeats let a *server*
    detect crashed runs; the ephemeral API dies with this process, so nothing reads them. With a
    configured server (``PREFECT_API_URL``: infra/, workers, deployments) they stay on.
    """
    import contextlib

    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _load(config: str, overrides: list[str]):
    from flows.config import load_pipeline_config

    return load_pipeline_config(config, overrides)


def _start(cfg) -> Path:
    """Home set up and the Prefect API + MLflow store warmed, before a flow runs."""
    from flows.reliability import file_lock

    home = setup_home()
    # two first starts on one home race on the Prefect/MLflow schema migrations: one at a time
    with file_lock(home / "locks" / "warm-start.lock", timeout_s=900):
        warm_start(home, cfg.tracking.experiment)
    return home


def run(
    config: str = typer.Option("demo", "--config", "-c", metavar="PRESET|FILE", help=CONFIG_HELP),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="show every library log line and warning"),
    new_run: bool = typer.Option(
        False, "--new-run", help="record a new pipeline run even when every stage is cached "
        "(without it, a config whose stages all finished earlier reports that run and stops)"),
) -> None:
    """Run the pipeline: validate -> pretrain -> search -> fine-tune -> evaluate -> register -> promote.

    Each stage is cached by its inputs; when all of them finished earlier in this home, the command
    says so and prints that run's summary (--new-run records a new run from the cache)."""
    cfg = _load(config, overrides or [])  # refused before any work (and before the heavy imports)
    from flows import console

    console.install(verbose=verbose)
    if not new_run and _report_up_to_date(cfg):
        return
    _start(cfg)
    from flows.pipeline import pipeline
    from flows.summary import console_lines

    with _embedded_settings():
        result = pipeline(cfg)
    print("\n".join(console_lines(result, ui_hint(result.mlflow_run_id, result.experiment_id))))


def _report_up_to_date(cfg) -> bool:
    """Print the earlier run and return True when every stage of ``cfg`` is done in this home."""
    from flows import uptodate
    from flows.paths import selfattn_home

    found = uptodate.find(cfg, selfattn_home())
    if found is None:
        return False
    print("\n".join(uptodate.console(found, ui_hint(found.result.mlflow_run_id, found.result.experiment_id))))
    return True


def ui_hint(run_id: str, experiment_id: str) -> str:
    """Where to look at a run: its MLflow UI link on a server, else the command that serves the UIs."""
    from flows.tracking.runs import run_url

    url = run_url(run_id, experiment_id)
    return url if url.startswith("http") else "selfattn ui   (MLflow on http://127.0.0.1:5000, Prefect on http://127.0.0.1:4200)"

def tune(
    config: str = typer.Option("demo", "--config", "-c", metavar="PRESET|FILE", help=CONFIG_HELP),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="processes sharing the Optuna study"),
) -> None:
    """Run the Optuna search only (the pipeline's data gate + pretraining first, cached), with N worker processes."""
    cfg = _load(config, overrides or [])
    _start(cfg)
    from flows.pipeline import tune_flow

    with _embedded_settings():
        summary = tune_flow(cfg, workers=workers)
    print(json.dumps(summary, indent=2, default=str))

def promote(
    name: str = typer.Argument(..., help="registered model name"),
    version: str = typer.Argument(..., help="version to make champion"),
) -> None:
    """Make VERSION the champion of model NAME (the old champion is remembered for rollback)."""
    from flows.tracking import registry, runs

    home = setup_home()
    runs.configure(home)
    old = registry.promote(name, version, home=home)
    print(f"{name}: champion -> v{version}" + (f" (was v{old})" if old else ""))

def rollback(name: str = typer.Argument(..., help="registered model name")) -> None:
    """Move the champion of NAME back to the previous champion."""
    from flows.tracking import registry, runs

    home = setup_home()
    runs.configure(home)
    target = registry.rollback(name, home=home)
    print(f"{name}: champion -> v{target}")

def predict(
    texts: List[str] = typer.Argument(..., help="texts to classify"),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="URI", help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
) -> None:
    """Classify texts with a registered model (default: the champion of this home's last run)."""
    from flows.tracking import runs

    home = setup_home()
    runs.configure(home)
    from flows.predict import clean_texts, load_classifier, merge_notes, resolve_model

    model = resolve_model(model, home)
    texts, notes = clean_texts(texts)  # invalid UTF-8 from argv -> U+FFFD, noted in 'warning'
    try:
        frame = merge_notes(load_classifier(model).predict_texts(texts), notes)  # never unpickles
    except Exception as exc:
        if type(exc).__name__ in ("MlflowException", "RestException", "OSError", "FileNotFoundError"):
            raise UserError(f"could not load model {model!r}: {exc}") from None
        raise
    for text, row in zip(texts, frame.to_dict(orient="records")):
        if as_json:
            print(json.dumps({"text": text, **row}, default=str))
        else:
            probs = " ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("prob_"))
            warn = f"  [{row['warning']}]" if row.get("warning") else ""
            print(f"{row['label']}\t{probs}\t{text[:80]}{warn}")

def explain(
    texts: List[str] = typer.Argument(..., help="texts to explain"),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="URI", help=MODEL_HELP),
    method: str = typer.Option("integrated_gradients", "--method", help="integrated_gradients, gradient_x_input, attention_rollout, attention_last"),
    steps: int = typer.Option(32, "--steps", help="integrated gradients quadrature nodes"),
    tokens: bool = typer.Option(False, "--tokens", help="colour subword tokens, not words"),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
) -> None:
    """Classify texts and colour each word by how much it drove the prediction."""
    from flows.explain_cli import load_explainable, render
    from flows.serving import explain_items

    if model is None or "://" in model or model.startswith(("models:/", "runs:/")):
        from flows.predict import resolve_model
        from flows.tracking import runs

        home = setup_home()
        runs.configure(home)
        model = resolve_model(model, home)
    clf = load_explainable(model, method)
    attrs = explain_items(clf, texts, method=method, steps=steps)
    unit = "token" if tokens else "word"
    if as_json:
        for a in attrs:
            label = clf.labels[a.target] if a.target is not None else None
            print(json.dumps({"text": a.text, "label": label, "method": method, "attributions": a.pairs(unit), "note": a.note}, default=str))
    else:
        render(attrs, clf.labels, unit=unit)

def deploy(
    cron: str = typer.Option("0 3 * * *", "--cron", help="cron schedule (UTC)"),
    config: str = typer.Option("demo", "--config", "-c", metavar="PRESET|FILE", help=CONFIG_HELP),
    overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", metavar="KEY=VALUE", help=SET_HELP),
    name: str = typer.Option("nightly", "--name", help="deployment name"),
    pool: Optional[str] = typer.Option(
        None, "--pool", help="register on this work pool of a Prefect server and return (a worker runs it); "
        "default: serve the schedule from this process"),
) -> None:
    """Schedule the pipeline on cron: on a work pool (--pool), or served by this process (blocks; Ctrl-C to stop)."""
    _load(config, overrides or [])  # refuse a bad config now, not at 3 am
    setup_home()
    from flows.pipeline import build_deployment

    deployment = build_deployment(cron=cron, config=config, overrides=overrides or [], name=name)
    if pool is None:
        from prefect import serve

        print(f"serving deployment {deployment.flow_name}/{name} on cron {cron!r} (UTC); runs start only while this process runs")
        serve(deployment)
        return
    if not os.environ.get("PREFECT_API_URL"):
        raise UserError(
            "--pool needs a Prefect server (PREFECT_API_URL): the embedded API stops with this process, so "
            "nothing would run the schedule. Start one with `infra/local.sh up` or `selfattn ui`, or drop --pool."
        )
    from prefect import get_client

    from flows.prefect_ops import pool_report

    with get_client(sync_client=True) as client:
        report = pool_report(client, pool)
    if not report.exists:
        raise UserError(report.message)
    deployment_id = deployment.apply(work_pool_name=pool)
    print(f"deployment {deployment.flow_name}/{name} ({deployment_id}) on work pool {pool!r}, cron {cron!r} (UTC)")
    print(("" if report.online_workers else "warning: ") + report.message)

def status(
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="how many flow runs"),
    state: Optional[List[str]] = typer.Option(None, "--state", help="only these state names (Late, Crashed, Running, ...)"),
    pool: Optional[str] = typer.Option(None, "--pool", help="also report this work pool's workers"),
) -> None:
    """Recent flow runs (Late and Crashed ones included) and, with --pool, whether a worker is online."""
    home = setup_home()
    database = home / "prefect" / "prefect.db"  # the embedded API's (prefect_env)
    embedded = not os.environ.get("PREFECT_API_URL") and os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL", "").endswith(str(database))
    if embedded and not database.is_file() and not pool:
        # the embedded API has never run in this home: nothing to list, and no server to start for it
        print(f"no flow runs yet in {home} (`selfattn run` starts one)")
        return
    from flows import console
    from flows.prefect_ops import check_states, pool_report, recent_runs, recent_runs_from_database, worker_command

    runs, report = None, None
    if state:  # Prefect's state names: imports it (its start-up banners are not for this command)
        console.install()
        state = check_states(state)
    if embedded and not pool:
        import sqlite3

        try:  # the embedded API's file, read directly: no server to start for a table
            runs = recent_runs_from_database(database, limit=limit, states=state)
        except sqlite3.Error as exc:
            print(f"note: reading {database} directly failed ({exc}); asking Prefect's API instead", file=sys.stderr)
    if runs is None:
        console.install()
        from prefect import get_client

        with get_client(sync_client=True) as client:
            runs = recent_runs(client, limit=limit, states=state)
            report = pool_report(client, pool) if pool else None
    from rich.console import Console
    from rich.table import Table

    table = Table("flow run", "state", "expected start (UTC)", "work pool", title="recent flow runs")
    for r in runs:
        table.add_row(r["name"], r["state"], r["expected_start"], r["work_pool"])
    console = Console(width=120)
    console.print(table)
    late = [r for r in runs if r["state"] == "Late"]
    if late:
        pools = sorted({r["work_pool"] for r in late if r["work_pool"]})
        hint = "; ".join(worker_command(p) for p in pools) or "start the process that serves the deployment"
        console.print(f"{len(late)} Late run(s): scheduled, but no worker picked them up. {hint}", soft_wrap=True)
    if report is not None:
        console.print(report.message, soft_wrap=True)

def ui(
    port: int = typer.Option(5000, "--port", "-p", help="MLflow UI port"),
    prefect_port: int = typer.Option(4200, "--prefect-port", help="Prefect UI/API port"),
    host: str = typer.Option("127.0.0.1", "--host"),
) -> None:
    """The MLflow UI and the Prefect UI on the configured stores (Ctrl-C stops both)."""
    from flows.paths import mlflow_artifact_root, mlflow_tracking_uri
    from flows.prefect_ops import prefect_server_env, serve_uis

    home = setup_home()
    cmd = mlflow_ui_command(mlflow_tracking_uri(home), Path(mlflow_artifact_root(home)), host, port)
    # MLflow's GenAI job runner adds ~8 processes that a local UI does not need
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    server_env = None
    if os.environ.get("PREFECT_API_URL"):  # a team server already has its UI
        print(f"Prefect UI: {os.environ['PREFECT_API_URL'].removesuffix('/api')} (configured server)")
    else:
        server_env = prefect_server_env(prefect_env(home), host, prefect_port)
    from flows.tracking import runs

    runs.configure(home)
    links = runs.training_links(f"http://{host}:{port}")
    if links:
        print("training runs (MLflow's home page opens an experiment on its runs unless this browser's sidebar switch was set to GenAI; these links open the runs either way):")
        print("\n".join(f"  {name}: {url}" for name, url in links))
    raise typer.Exit(serve_uis(cmd, f"http://{host}:{port}", server_env, host, prefect_port, log_dir=home / "logs"))


MLFLOW_APP = "selfattn"  # flows/mlflow_app.py:create_app, an `mlflow.app` entry point (pyproject.toml)


def mlflow_ui_command(uri: str, artifact_root: Path, host: str, port: int) -> list[str]:
    """The ``mlflow server`` that ``selfattn ui`` runs on store ``uri``: MLflow's app with the
    ``selfattn`` index page, on which a fresh browser opens an experiment on its training runs
    (flows/mlflow_app.py); a local store keeps its artifacts under ``artifact_root``."""
    from importlib.metadata import entry_points

    from flows.tracking.runs import is_tracking_server

    app = ["--app-name", MLFLOW_APP]
    if MLFLOW_APP not in {e.name for e in entry_points(group="mlflow.app")}:  # an install older than the entry point
        print(f"note: the MLflow app {MLFLOW_APP!r} is not installed (reinstall: pip install -e .); "
              "MLflow's own UI opens experiments on its GenAI view", file=sys.stderr)  # fmt: skip
        app = []
    cmd = [sys.executable, "-m", "mlflow", "server", *app, "--backend-store-uri", uri,
           "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    if not is_tracking_server(uri):
        cmd += ["--default-artifact-root", artifact_root.as_uri()]
    return cmd


def presets(name: Optional[str] = typer.Argument(None, help="a preset to print (as a start for your own file)")) -> None:
    """List the shipped presets, or print one: selfattn presets smoke > my.yaml; selfattn run -c my.yaml."""
    from flows.config import PRESETS, preset_path

    if name is not None:
        if name not in PRESETS:
            raise UserError(f"no preset {name!r}; the presets: {', '.join(PRESETS)}")
        print(preset_path(name).read_text(encoding="utf-8"), end="")
        return
    for preset in PRESETS:
        print(f"{preset:<7} {preset_summary(preset_path(preset))}")


def preset_summary(path: Path) -> str:
    """The first sentence of a preset's leading comment, without its ``name:`` lead."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines).removeprefix(f"{path.stem}:").strip()
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


COMMANDS = (run, tune, promote, rollback, predict, explain, deploy, status, ui, presets)
# commands that read a store someone else wrote: they say which one on stderr
READS_STORE = {"promote", "rollback", "predict", "explain", "status", "ui"}
HOME_HELP = "where the stores (mlflow.db, mlartifacts/, optuna.journal, prefect/) and the runs live; default ./.selfattn"


def with_home(command):
    """``command`` with a ``--home DIR`` option (or ``SELFATTN_HOME``), applied before it runs; one
    that reads a store names it first (``store: ...`` on stderr)."""
    import functools
    import inspect

    @functools.wraps(command)
    def wrapper(*args, home: Optional[Path] = None, **kwargs):
        if home is not None:
            os.environ["SELFATTN_HOME"] = str(home.expanduser())
        if command.__name__ in READS_STORE:
            print(f"store: {describe_stores()}", file=sys.stderr)
        return command(*args, **kwargs)

    option = typer.Option(None, "--home", envvar="SELFATTN_HOME", show_envvar=True, metavar="DIR", help=HOME_HELP)
    sig = inspect.signature(command)
    home_param = inspect.Parameter("home", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[Path])
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), home_param])
    wrapper.__annotations__ = {**getattr(command, "__annotations__", {}), "home": Optional[Path]}
    return wrapper


def describe_stores() -> str:
    """The MLflow store and the Prefect API a command of this home uses, in one line."""
    from flows.paths import mlflow_tracking_uri, selfattn_home

    home = selfattn_home()
    prefect = os.environ.get("PREFECT_API_URL") or f"embedded, {home / 'prefect' / 'prefect.db'}"
    return f"MLflow {mlflow_tracking_uri(home)}; Prefect {prefect} (SELFATTN_HOME={home})"


def register(app: typer.Typer) -> None:
    """Add this layer's commands to the selfattn CLI, each with ``--home``."""
    for command in COMMANDS:
        app.command(name=command.__name__)(with_home(command))
