"""infra/local.py's MLflow service command: which MLflow app serves the UI (no service started)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _local():
    spec = importlib.util.spec_from_file_location("infra_local", REPO / "infra" / "local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_mlflow_app_follows_auth_and_jobs(tmp_path, monkeypatch):
    local = _local()
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "a-long-enough-password")

    def app(**settings) -> str:
        cmd = local.mlflow_service(local.StackSettings(state_dir=tmp_path, **settings), 5000).cmd
        return cmd[cmd.index("--app-name") + 1]

    assert app() == "selfattn"  # the UI opens experiments on their training runs (flows/mlflow_app.py)
    assert app(mlflow_auth=True) == "selfattn-auth"
    # MLflow hands its job runner the gateway token only for the app named basic-auth
    assert app(mlflow_auth=True, mlflow_jobs=True) == "basic-auth"
    assert app(mlflow_jobs=True) == "selfattn"
