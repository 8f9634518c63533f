"""Shared test fixtures: real data location, a temporary SELFATTN_HOME, fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data sets (SELFATTN_DATA_DIR, default ../shared/data); read-only."""
    d = Path(os.environ.get("SELFATTN_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (d / "sst2" / "train.tsv").is_file():
        pytest.skip(f"real data not found under {d}; set SELFATTN_DATA_DIR")
    return d


@pytest.fixture()
def selfattn_home(tmp_path, monkeypatch) -> Path:
    """A private SELFATTN_HOME and no inherited MLflow URI, so tests never touch ./.selfattn."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home
