"""Optuna search: trials fine-tune from the pretrained checkpoint with a short budget.

The study lives in Optuna's journal file under ``SELFATTN_HOME`` by default (``optuna.journal``:
an append-only log several local worker processes share without SQLite's locking), or in an RDB
for an SQLAlchemy URL in ``search.storage``. Both carry a heartbeat: a trial whose process died
(SIGKILL, OOM) is failed on the next start and retried once with the same parameters
(``RetryHeartbeatStaleTrialCallback``).
``search.n_trials`` is the number of finished (complete or pruned) trials the study should hold,
so a re-run continues the study and several workers (``selfattn tune --workers N``, see
:mod:`flows.tune`) share it. Trials are logged as nested MLflow runs by us (not
optuna-integration's MLflowCallback).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from selfattn.errors import UserError
from selfattn.train import Callback, TrainingDiverged

from flows.config import PipelineConfig, study_storage_url
from flows.paths import JOURNAL_SCHEME, selfattn_home
from flows.reliability import file_lock

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "PRUNED")


def pick_metric(metrics: dict[str, Any], key: str) -> float | None:
    """``metrics[key]`` as a float, or None when it is missing or not a number.

    The engine's spellings: ``val_<metric>`` in each evaluation (``on_eval``), ``best_<metric>``
    for the best model in a run's final metrics, ``<metric>`` from ``evaluate_checkpoint``.
    """
    v = metrics.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


class PruningCallback(Callback):
    """Reports each eval's metric to the trial; raises ``optuna.TrialPruned`` when told to prune.

    The engine lets an exception raised in ``on_eval`` stop training and propagate, which is
    how Optuna's pruning reaches ``study.optimize``.
    """

    def __init__(self, *, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_eval(self, step: int, metrics: dict) -> None:
        import optuna

        value = pick_metric(metrics, f"val_{self.metric}")
        if value is None:
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({self.metric}={value:.4f})")


HEARTBEAT_ATTR = "selfattn:heartbeat"
_WARNED: set[str] = set()


def _journal_storage_class():
    """``JournalStorage`` with Optuna's heartbeat protocol (``BaseHeartbeat``).

    Optuna 5's journal storage has no heartbeat of its own, so a trial whose process was killed
    would stay RUNNING forever. Here the heartbeat is a trial system attribute (a timestamp
    appended to the journal every ``heartbeat_interval`` seconds); a RUNNING trial whose last
    heartbeat (or start, for a trial not yet beaten) is older than ``grace_period`` is stale.
    ``study.optimize`` then fails it and calls the stale-trial callback (the retry), exactly as
    it does for ``RDBStorage``. Built lazily: nothing of Optuna is imported with this module.
    """
    import time

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat

    class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
        def __init__(self, backend: Any, *, heartbeat_interval: int, grace_period: int, stale_trial_callback: Any) -> None:
            super().__init__(backend)
            self.heartbeat_interval = heartbeat_interval
            self.grace_period = grace_period
            self.stale_trial_callback = stale_trial_callback

        def record_heartbeat(self, trial_id: int) -> None:
            try:
                self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # another worker judged this trial stale and failed it already

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now = time.time()
            stale = []
            for t in self.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                # a retried trial inherits its predecessor's system attrs: its start counts too
                started = t.datetime_start.timestamp() if t.datetime_start else 0.0
                beat = t.system_attrs.get(HEARTBEAT_ATTR, 0.0)
                if now - max(started, float(beat)) > self.grace_period:
                    stale.append(t._trial_id)
            return stale

        def get_heartbeat_interval(self) -> int | None:
            return self.heartbeat_interval

        def get_heartbeat_stale_trial_callback(self) -> Any:
            return self.stale_trial_callback

    return HeartbeatJournalStorage


# seconds an RDB call waits for its database to come back (a restart, a failover) before it fails
DB_RETRY_BUDGET_S = 120.0
_RDB_CALLS = (
    # what Optuna's cached wrapper calls on its backend, and the public calls beside
    "create_new_study", "delete_study", "get_all_studies", "get_study_id_from_name", "get_study_name_from_id",
    "get_study_directions", "get_study_user_attrs", "get_study_system_attrs", "set_study_user_attr",
    "set_study_system_attr", "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
    "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr", "set_trial_system_attr",
    "get_trial", "get_all_trials", "_get_trials", "get_n_trials", "get_best_trial", "_get_best_trial_id",
    "get_trial_id_from_study_id_trial_number", "record_heartbeat", "_get_stale_trial_ids",
)  # fmt: skip


@lru_cache(maxsize=1)
def _retrying_rdb_storage() -> type:
    """Optuna's ``RDBStorage`` whose calls wait out a database restart: a call that fails because the
    connection dropped or was refused (``OperationalError``; Optuna wraps it in ``StorageInternalError``)
    is retried with backoff for up to :data:`DB_RETRY_BUDGET_S`, on a fresh session. ``pool_pre_ping`` (set by the
    caller) replaces the pool's dead connections once the server is back. Each call is one
    transaction, rolled back when its connection drops, so a retry repeats nothing that was
    committed (except in the round trip of a commit whose reply is lost)."""
    import functools
    import threading

    from optuna.exceptions import StorageInternalError
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import DBAPIError, OperationalError, PendingRollbackError

    def transient(exc: BaseException) -> bool:
        cause = exc.__cause__ or exc.__context__
        return (
            isinstance(exc, (OperationalError, PendingRollbackError))
            or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
            or (isinstance(exc, StorageInternalError) and cause is not None and transient(cause))
        )

    inside = threading.local()  # a retried call calling another: only the outer one retries

    def retried(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self, *args: Any, **kwargs: Any) -> Any:
            if getattr(inside, "active", False):
                return method(self, *args, **kwargs)
            deadline, delay = time.monotonic() + DB_RETRY_BUDGET_S, 0.5
            inside.active = True
            try:
                while True:
                    try:
                        return method(self, *args, **kwargs)
                    except Exception as exc:
                        if not transient(exc) or time.monotonic() + delay > deadline:
                            raise
                        log.warning("Optuna storage: %s failed (%s); retrying in %.1f s", name, type(exc).__name__, delay)
                        self.remove_session()  # the thread's session holds the dead connection's transaction
                        time.sleep(delay)
                        delay = min(delay * 2, 10.0)
            finally:
                inside.active = False

        return call

    return type("RetryingRDBStorage", (RDBStorage,), {name: retried(name, getattr(RDBStorage, name)) for name in _RDB_CALLS})


def open_storage(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None, max_retry: int | None = 1, home: Path | None = None):
    """The Optuna storage at ``url``: a journal file (``journal:///<path>``) or an RDB URL.

    With ``heartbeat_interval`` set, a trial whose process died (SIGKILL, OOM) is failed by the
    next worker to start a trial and retried up to ``max_retry`` times with the same parameters.
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if heartbeat_interval else None
    if url.startswith(JOURNAL_SCHEME):
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix(JOURNAL_SCHEME))
        path.parent.mkdir(parents=True, exist_ok=True)
        # the default symlink lock: a writer killed while holding it is broken after 30 s
        return _journal_storage_class()(
            JournalFileBackend(str(path)), heartbeat_interval=heartbeat_interval, grace_period=grace_period or 120, stale_trial_callback=retry
        )
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}

    # processes creating the schema of a fresh storage at once collide ("table already exists")
    with warnings.catch_warnings(), file_lock((home or selfattn_home()) / "locks" / "optuna-storage.lock", timeout_s=600):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return _retrying_rdb_storage()(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=retry,
        )


def storage(cfg: PipelineConfig, home: Path | None = None):
    """The study's storage (journal file by default, RDB for a database URL), with heartbeat and retry."""
    s = cfg.search
    url = study_storage_url(cfg, home)
    if url.startswith("sqlite") and not s.storage and not os.environ.get("SELFATTN_OPTUNA_STORAGE") and url not in _WARNED:
        _WARNED.add(url)
        log.warning(
            "Optuna study kept in the existing %s (SQLite locks under parallel workers); "
            "remove or move it to use the journal file %s",
            url.removeprefix("sqlite:///"),
            (home or selfattn_home()) / "optuna.journal",
        )
    return open_storage(url, heartbeat_interval=s.heartbeat_interval_s, grace_period=s.grace_period_s, max_retry=s.max_retry, home=home)


def make_study(cfg: PipelineConfig, home: Path | None = None, *, worker: int = 0):
    """Create or load (``load_if_exists``) the study named in the config; TPE seeded."""
    import optuna

    s = cfg.search
    if s.pruner == "median":
        pruner = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=s.pruner_warmup_steps)
    elif s.pruner == "hyperband":
        pruner = optuna.pruners.HyperbandPruner()
    else:
        pruner = optuna.pruners.NopPruner()
    sampler = optuna.samplers.TPESampler(seed=s.seed + worker, n_startup_trials=max(2, min(10, s.n_trials // 2)))
    return optuna.create_study(
        study_name=s.study_name,
        storage=storage(cfg, home),
        sampler=sampler,
        pruner=pruner,
        direction=s.direction,
        load_if_exists=True,
    )


def suggest(trial: Any, cfg: PipelineConfig) -> dict[str, Any]:
    """Sample every key of ``search.space`` (dotted finetune keys) -> ``{key: value}``."""
    params: dict[str, Any] = {}
    for key, sp in cfg.search.space.items():
        if sp.type == "categorical":
            params[key] = trial.suggest_categorical(key, sp.choices)
        elif sp.type == "int":
            params[key] = trial.suggest_int(key, int(sp.low), int(sp.high), step=int(sp.step or 1), log=sp.log)
        else:
            params[key] = trial.suggest_float(key, sp.low, sp.high, step=sp.step, log=sp.log)
    return params


def frozen(trial: Any) -> Any:
    """The stored ``FrozenTrial`` of a live trial (system attrs, e.g. which trial it retries)."""
    for t in trial.study.get_trials(deepcopy=False):
        if t.number == trial.number:
            return t
    raise LookupError(f"trial {trial.number} is not in study {trial.study.study_name!r}")


def n_finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


@dataclass
class SearchResult:
    study_name: str
    storage: str
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    n_trials: int
    n_complete: int
    n_pruned: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def summarize(study: Any, cfg: PipelineConfig, home: Path | None = None) -> SearchResult:
    import optuna

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise UserError(
            f"Optuna study {cfg.search.study_name!r} has no complete trial "
            f"({len(trials)} trials: {sorted({t.state.name for t in trials})}); check the trial logs in MLflow"
        )
    best = study.best_trial
    return SearchResult(
        study_name=cfg.search.study_name,
        storage=study_storage_url(cfg, home),
        best_params=dict(best.params),
        best_value=float(best.value),
        best_trial=best.number,
        n_trials=len(trials),
        n_complete=len(complete),
        n_pruned=sum(t.state == optuna.trial.TrialState.PRUNED for t in trials),
    )


def optimize(
    cfg: PipelineConfig,
    objective: Callable[[Any], float],
    *,
    home: Path | None = None,
    worker: int = 0,
    callbacks: Sequence[Callable[[Any, Any], None]] = (),
    share: int | None = None,
) -> Any:
    """Run trials until the study holds ``search.n_trials`` finished ones (or the timeout).

    ``share``: with several workers, this worker's fixed number of trials, worked out once by
    the caller. ``MaxTrialsCallback`` alone would let each worker finish the trial it is running
    when the others reach the target, overshooting ``n_trials`` by up to ``workers - 1``.
    """
    import optuna
    from optuna.study import MaxTrialsCallback

    study = make_study(cfg, home, worker=worker)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = cfg.search.n_trials - n_finished(study) if share is None else share
    stop = [MaxTrialsCallback(cfg.search.n_trials, states=states)] if share is None else []
    if remaining > 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=cfg.search.timeout_s,
            callbacks=[*stop, *callbacks],
            catch=_trial_errors(),
            gc_after_trial=True,
        )
    return study


def _trial_errors() -> tuple[type[BaseException], ...]:
    """Errors that fail one trial (recorded in the study) instead of the whole search."""
    return (TrainingDiverged, FloatingPointError, ArithmeticError)


def save_plots(study: Any, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances (matplotlib), when they can be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, fn in (("optuna_history.png", ovm.plot_optimization_history), ("optuna_importances.png", ovm.plot_param_importances)):
            try:
                ax = fn(study)
            except (ValueError, RuntimeError, ZeroDivisionError, optuna.exceptions.OptunaError) as exc:
                log.info("skipping %s: %s", name, exc)
                continue
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=90)
            plt.close(fig)
            paths.append(out_dir / name)
    return paths
