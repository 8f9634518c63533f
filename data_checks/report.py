"""The outcome of a validation: one ``CheckResult`` per check, and a ``Report`` that sums them up.

Checks evaluated by Great Expectations and checks computed in pandas (for which GX has no
expectation) have the same shape, so callers never care which engine produced a result.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

_STATUS_STYLE = {"pass": "green", "FAIL": "bold red", "warn": "yellow"}


@dataclass(frozen=True)
class CheckResult:
    """One check. ``observed`` is the measured value; ``detail`` says in words what is wrong (or
    what was measured); ``examples`` are a few offending rows (``"row 12: 'text' (label 2)"``)."""

    name: str
    expectation: str  # GX expectation type, or "pandas:<what>" for checks GX has no expectation for
    severity: str  # "error" | "warning"
    observed: Any
    detail: str
    examples: list[str] = field(default_factory=list)
    passed: bool = True

    @property
    def status(self) -> str:
        """``pass``, ``FAIL`` (a failing error) or ``warn`` (a failing warning)."""
        if self.passed:
            return "pass"
        return "FAIL" if self.severity == "error" else "warn"


@dataclass
class Report:
    """All checks run on one data file. ``passed`` is False when any error-severity check failed."""

    path: Path
    kind: str
    checks: list[CheckResult]
    n_rows: int
    against: Path | None = None
    data_docs: Path | None = None  # folder holding the GX Data Docs site (index.html)
    report_json: Path | None = None
    seconds: float = 0.0

    @property
    def failures(self) -> list[CheckResult]:
        """Failed checks of severity ``error``."""
        return [c for c in self.checks if not c.passed and c.severity == "error"]

    @property
    def warnings(self) -> list[CheckResult]:
        """Failed checks of severity ``warning``."""
        return [c for c in self.checks if not c.passed and c.severity == "warning"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def __getitem__(self, name: str) -> CheckResult:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(f"no check named {name!r} in this report; checks: {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable summary (what ``report.json`` holds)."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "against": str(self.against) if self.against else None,
            "passed": self.passed,
            "n_rows": self.n_rows,
            "n_failures": len(self.failures),
            "n_warnings": len(self.warnings),
            "failures": [c.name for c in self.failures],
            "warnings": [c.name for c in self.warnings],
            "checks": [{**asdict(c), "status": c.status, "observed": _jsonable(c.observed)} for c in self.checks],
            "data_docs": str(self.data_docs) if self.data_docs else None,
            "seconds": round(self.seconds, 3),
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    def summary_line(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"{verdict}: {self.path} ({self.kind}, {self.n_rows} rows) -- {len(self.checks)} checks, "
            f"{len(self.failures)} failed, {len(self.warnings)} warning(s)"
        )

    def summary_table(self, *, show_observed: bool = True, max_example_chars: int = 70) -> "Table":
        """A rich table, one row per check; up to two example rows under each check that did not pass.

        ``show_observed=False`` drops the observed-value column (the detail repeats the numbers),
        which keeps the table on one 80-column screen.
        """
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self.summary_line(), title_justify="left", show_lines=False, expand=False)
        table.add_column("check", no_wrap=True)
        table.add_column("status", no_wrap=True)
        if show_observed:
            table.add_column("observed", overflow="fold", max_width=18)
        table.add_column("detail", overflow="fold", ratio=1)
        for c in self.checks:
            detail = c.detail
            if not c.passed and c.examples:
                shown = [_clip(e, max_example_chars) for e in c.examples[:2]]
                detail += "\n  e.g. " + "\n  e.g. ".join(shown)
            cells = [c.name, Text(c.status, style=_STATUS_STYLE[c.status])]
            if show_observed:
                cells.append(_clip(_format_observed(c.observed), 40))
            table.add_row(*cells, detail)
        return table


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _format_observed(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return str(value)
