"""CLI commands contributed by flows (registered through the selfattn.cli entry point).

``run``, ``tune``, ``promote``, ``rollback``, ``predict``, ``explain``, ``deploy``, ``ui``. Heavy libraries
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

CONFIG_HELP = "preset (demo, smoke) or a YAML file"
SET_HELP = "override a config key, e.g. --set search.n_trials=4 (repeatable)"


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
    from flows.config import selfattn_home

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

    from flows import tracking

    thread = None
    if not os.environ.get("PREFECT_API_URL"):
        from prefect.server.api.server import SubprocessASGIServer

        thread = threading.Thread(target=SubprocessASGIServer().start, name="prefect-ephemeral-start", daemon=True)
        thread.start()
    tracking.configure(home)
    tracking.ensure_experiment(experiment, home)
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


def _print_result(result) -> None:
    print(f"pipeline run {result.pipeline_run_id} (MLflow run {result.mlflow_run_id})")
    for name, out in result.stages.items():
        print(f"  {name:<9} {'cached' if out.cached else 'ran   '} {out.dir}")
    for k, v in sorted(result.metrics.items()):
        print(f"  {k} = {v:.4f}")
    if result.decision:
        d = result.decision
        verdict = "promoted to champion" if d["promoted"] else "not promoted"
        print(f"model {result.model_name} v{result.model_version}: {verdict} ({d['reason']})")


def register(app: typer.Typer) -> None:
    """Add this layer's commands to the selfattn CLI."""

    @app.command()
    def run(
        config: str = typer.Option("demo", "--config", "-c", help=CONFIG_HELP),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help=SET_HELP),
    ) -> None:
        """Run the pipeline: validate -> pretrain -> search -> fine-tune -> evaluate -> register -> promote."""
        cfg = _load(config, overrides or [])  # refused before any work
        home = setup_home()
        from flows.recovery import file_lock

        # two first starts on one home race on the Prefect/MLflow schema migrations: one at a time
        with file_lock(home / "locks" / "warm-start.lock", timeout_s=900):
            warm_start(home, cfg.tracking.experiment)
        from flows.pipeline import pipeline

        with _embedded_settings():
            result = pipeline(cfg)
        _print_result(result)

    @app.command()
    def tune(
        config: str = typer.Option("demo", "--config", "-c", help=CONFIG_HELP),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help=SET_HELP),
        workers: int = typer.Option(1, "--workers", "-w", min=1, help="processes sharing the Optuna study"),
    ) -> None:
        """Run the Optuna search only (data + pretraining first, cached), with N worker processes."""
        from flows.tuning import tune_command

        cfg = _load(config, overrides or [])
        home = setup_home()
        summary = tune_command(cfg, home, workers=workers)
        print(json.dumps(summary, indent=2, default=str))

    @app.command()
    def promote(
        name: str = typer.Argument(..., help="registered model name"),
        version: str = typer.Argument(..., help="version to make champion"),
    ) -> None:
        """Make VERSION the champion of model NAME (the old champion is remembered for rollback)."""
        from flows import registry, tracking

        home = setup_home()
        tracking.configure(home)
        old = registry.promote(name, version, home=home)
        print(f"{name}: champion -> v{version}" + (f" (was v{old})" if old else ""))

    @app.command()
    def rollback(name: str = typer.Argument(..., help="registered model name")) -> None:
        """Move the champion of NAME back to the previous champion."""
        from flows import registry, tracking

        home = setup_home()
        tracking.configure(home)
        target = registry.rollback(name, home=home)
        print(f"{name}: champion -> v{target}")

    @app.command()
    def predict(
        texts: List[str] = typer.Argument(..., help="texts to classify"),
        model: str = typer.Option("models:/selfattn-sst2@champion", "--model", "-m", help="MLflow model URI"),
        as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
    ) -> None:
        """Classify TEXT... with a registered model (default: the champion)."""
        from flows import tracking

        home = setup_home()
        tracking.configure(home)
        from flows.recovery import clean_texts, load_classifier, merge_notes

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

    @app.command()
    def explain(
        texts: List[str] = typer.Argument(..., help="texts to explain"),
        model: str = typer.Option("models:/selfattn-sst2@champion", "--model", "-m", help="MLflow model URI or a model directory"),
        method: str = typer.Option("integrated_gradients", "--method", help="integrated_gradients, gradient_x_input, attention_rollout, attention_last"),
        steps: int = typer.Option(32, "--steps", help="integrated gradients quadrature nodes"),
        tokens: bool = typer.Option(False, "--tokens", help="colour subword tokens, not words"),
        as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
    ) -> None:
        """Classify TEXT... and colour each word by how much it drove the prediction."""
        from flows.explain_cli import load_explainable, render
        from flows.serving import explain_items

        if "://" in model or model.startswith(("models:/", "runs:/")):
            from flows import tracking

            tracking.configure(setup_home())
        clf = load_explainable(model, method)
        attrs = explain_items(clf, texts, method=method, steps=steps)
        unit = "token" if tokens else "word"
        if as_json:
            for a in attrs:
                label = clf.labels[a.target] if a.target is not None else None
                print(json.dumps({"text": a.text, "label": label, "method": method, "attributions": a.pairs(unit), "note": a.note}, default=str))
        else:
            render(attrs, clf.labels, unit=unit)

    @app.command()
    def deploy(
        cron: str = typer.Option("0 3 * * *", "--cron", help="cron schedule (UTC)"),
        config: str = typer.Option("demo", "--config", "-c", help=CONFIG_HELP),
        overrides: Optional[List[str]] = typer.Option(None, "--set", "-s", help=SET_HELP),
        name: str = typer.Option("nightly", "--name", help="deployment name"),
    ) -> None:
        """Serve the pipeline on a cron schedule (blocks; Ctrl-C to stop)."""
        _load(config, overrides or [])  # refuse a bad config now, not at 3 am
        setup_home()
        from prefect import serve

        from flows.pipeline import build_deployment

        serve(build_deployment(cron=cron, config=config, overrides=overrides or [], name=name))

    @app.command()
    def ui(
        port: int = typer.Option(5000, "--port", "-p"),
        host: str = typer.Option("127.0.0.1", "--host"),
    ) -> None:
        """Start the MLflow UI on the configured store."""
        import subprocess

        from flows.config import mlflow_artifact_root, mlflow_tracking_uri

        home = setup_home()
        uri = mlflow_tracking_uri(home)
        cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            cmd += ["--default-artifact-root", Path(mlflow_artifact_root(home)).as_uri()]
        print(" ".join(cmd))
        raise typer.Exit(subprocess.call(cmd))
