"""data_checks: a Great Expectations gate in front of every dataset (see docs/data_checks.md).

``from data_checks import validate, Report`` -- the names are resolved lazily, so importing the
package costs nothing: pandas and Great Expectations load only when ``validate`` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_checks.config import CheckThresholds
    from data_checks.report import CheckResult, Report
    from data_checks.validation import validate

__all__ = ["validate", "Report", "CheckResult", "CheckThresholds"]

_WHERE = {
    "validate": "data_checks.validation",
    "Report": "data_checks.report",
    "CheckResult": "data_checks.report",
    "CheckThresholds": "data_checks.config",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'data_checks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
