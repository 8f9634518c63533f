"""CLI commands contributed by data_checks (registered through the selfattn.cli entry point)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this layer's commands to the selfattn CLI."""
