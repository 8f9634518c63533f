"""What ``selfattn run`` prints: stage lines, progress bars, the summary; nothing the user cannot act on.

``install(verbose=False)`` is called by the CLI at command time (never on import). It

- ignores, one by one, the library warnings a user can do nothing about (:data:`QUIET_WARNINGS`:
  category + message + module, never a whole category or library);
- lowers the console handler of Prefect's logging to WARNING (its INFO lines still go to the
  Prefect API and UI) and the INFO chatter of MLflow's store and system-metrics loggers;
- prints the pipeline's stage lines (logger ``selfattn.stages``, written by
  :func:`flows.tracking.runs.stage_run`).

``install(verbose=True)`` changes none of the filters or levels: everything is shown.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import NamedTuple

STAGE_LOGGER = "selfattn.stages"


class QuietWarning(NamedTuple):
    """One library warning that is noise for a user of the pipeline, and why."""

    category: type[Warning]
    message: str  # regex, matched at the start of the message
    module: str  # regex, matched against the module the warning is attributed to
    why: str


QUIET_WARNINGS: tuple[QuietWarning, ...] = (
    QuietWarning(
        UserWarning, r"The specified dataset source can be interpreted in multiple ways",
        r"mlflow\.data\.dataset_source_registry",
        "a local TSV path matches two equivalent MLflow source classes; MLflow picks one, the record is the same",
    ),
    QuietWarning(
        UserWarning, r"Hint: Inferred schema contains integer column\(s\)", r"mlflow\.types\.utils",
        "the label column is an int column of a dataset record (no missing values by the data gate)",
    ),
)

# Not here: MLflow's "Add type hints to the `predict` method" advice. It is raised under MLflow's
# own ``simplefilter("once")``, which no filter of ours can override; flows.serving declines the
# type-hint wrapping instead (its predict validates rows itself), so the advice is never given.

# INFO lines of libraries that repeat on every run ("Creating initial MLflow database tables",
# "Started monitoring system metrics"); their warnings and errors still show
# (levels, set after the import: MLflow and Optuna configure their loggers when imported)
QUIET_LOGGERS = ("mlflow.store.db.utils", "mlflow.system_metrics", "mlflow.pyfunc", "mlflow.models", "alembic", "great_expectations")

# Prefect's logging.yml handler levels, overridable through the environment before import
_PREFECT_CONSOLE_LEVEL = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"


class _Once(logging.Filter):
    """Passes each distinct message once (the same data note repeats for every trial)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self._seen:
            return False
        self._seen.add(msg)
        return True


class _NoKnownTraceback(logging.Filter):
    """Prefect's "task/flow run failed" lines for errors the CLI explains in its closing paragraph:
    a ``UserError`` is dropped (the paragraph says it once, instead of once per enclosing flow); a
    tracking server that stayed down keeps its line but not the traceback (each failed stage would
    otherwise print the client's retry chain again)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            from flows.reliability import server_unreachable
            from selfattn.errors import UserError

            if isinstance(exc, UserError):
                return False
            if server_unreachable(exc):
                record.exc_info, record.exc_text = None, None
        return True


# our own notes the user can act on, shown once per run instead of once per trial
ONCE_LOGGERS = ("selfattn.data",)


def filter_warnings() -> None:
    """Ignore each warning of :data:`QUIET_WARNINGS` (added in front of the filter list)."""
    for w in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=w.message, category=w.category, module=w.module)


def install(verbose: bool = False) -> None:
    """Set up the console of a CLI command (see the module docstring)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    stages = logging.getLogger(STAGE_LOGGER)
    if not any(getattr(h, "_selfattn_console", False) for h in stages.handlers):
        handler._selfattn_console = True  # type: ignore[attr-defined]
        stages.addHandler(handler)
    stages.setLevel(logging.INFO)
    stages.propagate = False
    if verbose:
        return
    filter_warnings()
    import optuna

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # per-trial lines; the stage line says when it is done
    for name in ONCE_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Once) for f in logger.filters):
            logger.addFilter(_Once())
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoKnownTraceback) for f in logger.filters):
            logger.addFilter(_NoKnownTraceback())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar for three tiny files
    if "prefect" not in sys.modules:  # read once, when Prefect configures its logging
        os.environ.setdefault(_PREFECT_CONSOLE_LEVEL, "WARNING")
