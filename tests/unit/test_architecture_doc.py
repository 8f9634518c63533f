"""docs/ARCHITECTURE.md stays true: every module of selfattn/, data_checks/ and flows/, every Python
file of infra/ and every command of the ``selfattn`` CLI is listed there (a new module without a
line in the inventory, or a listed one that no longer exists, fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "ARCHITECTURE.md"
FOLDERS = ("selfattn", "data_checks", "flows", "infra")


def _modules() -> set[str]:
    """Every ``.py`` file of the four folders, as a repo-relative path (``__init__.py`` included)."""
    return {p.relative_to(ROOT).as_posix() for folder in FOLDERS for p in (ROOT / folder).rglob("*.py")}


def _listed() -> set[str]:
    """Backticked ``.py`` paths of the page."""
    return set(re.findall(r"`([A-Za-z_][\w/]*\.py)`", DOC.read_text(encoding="utf-8")))


def _commands() -> set[str]:
    """The commands the ``selfattn`` CLI registers, its plugins' included."""
    import typer

    from data_checks.cli import register as register_checks
    from flows.cli import register as register_flows
    from selfattn.cli import app

    full = typer.Typer()
    full.registered_commands = list(app.registered_commands)
    register_checks(full)
    register_flows(full)
    return {c.name or c.callback.__name__.replace("_", "-") for c in full.registered_commands}


def test_every_module_is_listed_and_every_listed_module_exists():
    modules, listed = _modules(), _listed()
    assert len(modules) > 60
    assert not modules - listed, f"add to docs/ARCHITECTURE.md: {sorted(modules - listed)}"
    gone = {p for p in listed if p.split("/")[0] in FOLDERS} - modules
    assert not gone, f"listed in docs/ARCHITECTURE.md but not in the tree: {sorted(gone)}"


def test_every_cli_command_is_listed():
    commands = _commands()
    assert {"run", "validate", "pretrain", "ui"} <= commands
    text = DOC.read_text(encoding="utf-8")
    missing = sorted(c for c in commands if f"`selfattn {c}`" not in text)
    assert not missing, f"add to docs/ARCHITECTURE.md's CLI table: {missing}"


def test_the_mlflow_modules_the_page_names_are_the_import_graph_tests():
    """The rule table names the same five modules the import-graph test allows."""
    from tests.unit.test_import_graph import MLFLOW_MODULES

    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if "import MLflow" in line)
    named = {"flows." + m.removesuffix(".py").replace("/", ".") for m in re.findall(r"`([\w/]+\.py)`", row)}
    assert named == MLFLOW_MODULES


def test_each_module_has_one_inventory_row():
    """Each module has exactly one inventory row (no duplicates that could drift apart)."""
    rows = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
    firsts = [m.group(1) for line in rows if (m := re.match(r"\| `([\w/]+\.py)`", line))]
    dupes = sorted({f for f in firsts if firsts.count(f) > 1})
    assert not dupes, dupes
