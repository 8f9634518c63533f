"""The pipeline's stages as plain functions (no Prefect, no MLflow), each cached by a done marker.

Caching design (own done markers, not Prefect's result cache): every stage writes into
``<home>/runs/<stage>-<key>/`` where ``key`` is a SHA-256 of the stage's inputs (its config
section, the keys of the stages it depends on, the digests of the data files it reads) and the
code version (a digest of the ``selfattn`` sources and this file). When a stage finishes, it
writes ``_SUCCESS`` (JSON result) atomically (temp file + fsync + rename); a re-run finds the
marker and returns the stored result without doing the work; a changed config changes the keys
of that stage and of everything downstream only. A stage killed half-way has no marker, so it
runs again in the same directory, where the training engine resumes from its last checkpoint.

Why not Prefect's ``INPUTS + TASK_SOURCE`` cache: the stage directory must be stable across a
crash for checkpoint resume, the same stages must run without Prefect (benchmark,
``selfattn tune``), and a marker on disk is easy to inspect and delete by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import shutil
import urllib.request
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from pydantic import BaseModel, ConfigDict

import selfattn

from selfattn.io.checkpoint import copy_pretrained
from selfattn.config import override_model
from selfattn.data.paths import file_digest
from selfattn.data.tables import load_table
from selfattn.errors import UserError
from selfattn.eval.report_html import write_examples_page
from selfattn.train import FinetuneConfig, PretrainConfig, evaluate_checkpoint, finetune, pretrain
from selfattn.utils import atomic_write_text

from flows import behaviour_stage, tuning
from flows.config import PipelineConfig, trial_template
from flows.paths import data_root, resolve_local_path

log = logging.getLogger(__name__)

MARKER = "_SUCCESS"


# --------------------------------------------------------------------------- keys and markers


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of the training code (``selfattn`` package sources and this module)."""
    root = Path(selfattn.__file__).resolve().parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")) + [Path(__file__).resolve()]:
        h.update(str(p.relative_to(p.parents[1])).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class StageOutput(BaseModel):
    """What a stage hands downstream: paths and small JSON values, never tensors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    stage: str
    key: str
    dir: str
    cached: bool = False
    result: dict[str, Any] = {}


@dataclass
class Stage:
    """A stage directory keyed by its inputs; ``done()`` reads the marker, ``finish()`` writes it."""

    home: Path
    name: str
    inputs: dict[str, Any]
    key: str = field(init=False)
    dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.key = digest({"stage": self.name, "inputs": self.inputs, "code": code_version()})[:16]
        self.dir = self.home / "runs" / f"{self.name}-{self.key}"

    def done(self) -> StageOutput | None:
        """The stored result when the stage finished earlier (no lock; see :meth:`claim`)."""
        marker = self.dir / MARKER
        if not marker.is_file():
            return None
        try:
            result = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return StageOutput(stage=self.name, key=self.key, dir=str(self.dir), cached=True, result=result)

    @contextlib.contextmanager
    def claim(self) -> Iterator[tuple[StageOutput | None, Path]]:
        """Hold the stage's lock: ``(cached output or None, stage dir)``.

        Two pipelines reaching the same stage at once do the work once: the second waits for the
        lock, then finds the marker. The kernel drops the lock when a holder dies (SIGKILL).
        """
        if (done := self.done()) is not None:
            yield done, self.dir
            return
        # an explicit with-block: released on success, on an exception (a Prefect retry in this
        # process gets it back) and by the kernel when the process dies
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dir.with_name(f".{self.dir.name}.lock"), "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                done = self.done()
                yield done, (self.dir if done is not None else self.start())
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def start(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "inputs.json", json.dumps(self.inputs, indent=2, sort_keys=True, default=str))
        return self.dir

    def finish(self, result: dict[str, Any]) -> StageOutput:
        atomic_write_text(self.dir / MARKER, json.dumps(result, indent=2, sort_keys=True, default=str))
        return StageOutput(stage=self.name, key=self.key, dir=str(self.dir), cached=False, result=result)


# --------------------------------------------------------------------------- data


def _source_identity(spec: str, *, home: Path) -> dict[str, Any]:
    if data_root() is None:
        return {"remote": spec}
    p = resolve_local_path(spec, home=home)
    return {"file": str(p), "sha256": file_digest(p)}


def _write_table(rows: Any, path: Path) -> None:
    """A pandas DataFrame -> TSV without quoting (SST-2 style)."""
    lines = ["\t".join(map(str, rows.columns))]
    for rec in rows.itertuples(index=False):
        lines.append("\t".join(str(v).replace("\t", " ").replace("\n", " ") for v in rec))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _read_tsv(path: Path):
    from selfattn.data.tables import read_table

    return read_table(path).frame


def _hub_table(hub_id: str, split: str, cfg: PipelineConfig):
    """Download a hub split (users with internet) -> DataFrame with the configured columns."""
    ds = load_table(hub_id, split=split, columns=[cfg.data.text_column, cfg.data.label_column])
    return ds.select_columns([cfg.data.text_column, cfg.data.label_column]).to_pandas().astype(str)


def prepare_data(cfg: PipelineConfig, home: Path) -> StageOutput:
    """Materialise the run's data files (subsampled, exactly what is trained, checked and logged).

    Local copies come from ``SELFATTN_DATA_DIR``; without it the public sources are downloaded
    (SST-2 from the HF hub, Tiny Shakespeare from its canonical URL).
    """
    d = cfg.data
    sources = {
        "corpus": {"from_train": True} if d.corpus_from_train else _source_identity(d.corpus if data_root() else d.corpus_url, home=home),
        "train": _source_identity(d.train if data_root() else f"{d.sst2_hub}:train", home=home),
        "dev": _source_identity(d.dev if data_root() else f"{d.sst2_hub}:validation", home=home),
    }
    stage = Stage(home, "data", {"data": d.model_dump(), "sources": sources, "seed": cfg.seed})
    with stage.claim() as (out, out_dir):
        if out is not None:
            return out
        # corpus
        if d.corpus_from_train:
            src = sources["train"]
            table = _read_tsv(Path(src["file"])) if "file" in src else _hub_table(d.sst2_hub, "train", cfg)
            if d.text_column not in table.columns:
                raise UserError(f"data.corpus_from_train: training data has no column {d.text_column!r} (columns: {list(table.columns)})")
            text = "\n".join(t.strip() for t in table[d.text_column]) + "\n"
        elif "file" in sources["corpus"]:
            text = Path(sources["corpus"]["file"]).read_text(encoding="utf-8", errors="replace")
        else:
            with urllib.request.urlopen(d.corpus_url, timeout=60) as resp:  # noqa: S310 (fixed https URL from config)
                text = resp.read().decode("utf-8", errors="replace")
        if d.corpus_chars is not None:
            text = text[: d.corpus_chars]
        atomic_write_text(out_dir / "corpus.txt", text)
        # labelled splits
        for split, hub_split in (("train", "train"), ("dev", "validation")):
            src = sources[split]
            target = out_dir / f"{split}.tsv"
            n = d.train_rows if split == "train" else d.dev_rows
            if "file" in src and n is None:
                shutil.copyfile(src["file"], target)
                continue
            table = _read_tsv(Path(src["file"])) if "file" in src else _hub_table(d.sst2_hub, hub_split, cfg)
            if n is not None and n < len(table):
                table = table.sample(n=n, random_state=cfg.seed).sort_index() if split == "train" else table.head(n)
            _write_table(table, target)
        files = {name: str(out_dir / name) for name in ("corpus.txt", "train.tsv", "dev.tsv")}
        digests = {name: file_digest(Path(p)) for name, p in files.items()}
        return stage.finish({"files": files, "digests": digests, "digest": digest(digests)[:16], "sources": sources})


# --------------------------------------------------------------------------- validation


def validate_data(cfg: PipelineConfig, data: StageOutput, home: Path) -> StageOutput:
    """data_checks on the corpus, the training split and the dev split (against train).

    A failed check is not cached (the next run checks again); a passed one is. The result holds
    ``passed``, the failures and the paths of report.json and the GX Data Docs.
    """
    from data_checks import validate

    d = cfg.data
    files = data.result["files"]
    stage = Stage(home, "validate", {"data": data.result["digests"], "labels": d.labels, "cols": [d.text_column, d.label_column]})
    with stage.claim() as (out, out_dir):
        if out is not None:
            return out
        reports = {}
        common = {"text_column": d.text_column, "label_column": d.label_column, "labels": d.labels}
        reports["corpus"] = validate(files["corpus.txt"], kind="corpus", output_dir=out_dir / "corpus")
        reports["train"] = validate(files["train.tsv"], kind="labelled", output_dir=out_dir / "train", **common)
        reports["dev"] = validate(files["dev.tsv"], kind="labelled", against=files["train.tsv"], output_dir=out_dir / "dev", **common)
        summary = {name: r.to_dict() for name, r in reports.items()}
        atomic_write_text(out_dir / "report.json", json.dumps(summary, indent=2, default=str))
        passed = all(r.passed for r in reports.values())
        result = {
            "passed": passed,
            "failures": {name: [f"{c.name}: {c.detail}" for c in r.failures] for name, r in reports.items() if r.failures},
            "warnings": {name: [f"{c.name}: {c.detail}" for c in r.warnings] for name, r in reports.items() if r.warnings},
            "report": str(out_dir / "report.json"),
            "data_docs": {name: str(r.data_docs) for name, r in reports.items() if r.data_docs},
        }
        if not passed:
            return StageOutput(stage="validate", key=stage.key, dir=str(out_dir), cached=False, result=result)
        return stage.finish(result)


def require_passed(checked: StageOutput) -> None:
    """The data gate: a UserError naming every failed check unless validation passed."""
    if not checked.result["passed"]:
        failures = "; ".join(f"{k}: {', '.join(v)}" for k, v in checked.result["failures"].items())
        raise UserError(f"data checks failed, nothing was trained or registered: {failures} (report: {checked.result['report']})")


# --------------------------------------------------------------------------- training


def pretrain_config(cfg: PipelineConfig, data: StageOutput) -> PretrainConfig:
    """The engine's PretrainConfig of this run: the pipeline's section with the run's corpus."""
    return override_model(cfg.pretrain, {"data.path": data.result["files"]["corpus.txt"]}, where="pretrain")


def finetune_config(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    params: dict[str, Any] | None = None,
    *,
    trial: bool = False,
) -> FinetuneConfig:
    """The engine's FinetuneConfig of this run (trials: with ``search.trial_overrides``), then
    ``params`` (dotted keys, e.g. Optuna's). The only place a fine-tune's config is built.

    Trials and the final fine-tune alike select and stop on a held-out part of train
    (val_path None, ``finetune.data.val_fraction``), so the dev split stays unseen until the
    final evaluation: the reported dev score is not selected on dev."""
    d = cfg.data
    run = {
        "data.train_path": data.result["files"]["train.tsv"],
        "data.val_path": None,
        "data.text_column": d.text_column,
        "data.label_column": d.label_column,
        "data.labels": d.labels,
        "init_from": pretrained.result["best_dir"],
    }
    base = trial_template(cfg) if trial else cfg.finetune
    return override_model(base, {**run, **searched(cfg, params or {})}, where="finetune")


def searched(cfg: PipelineConfig, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` without the fixed keys: a continued study's best trial may come from before a
    key was fixed, and the fixed value wins."""
    return {k: v for k, v in params.items() if k not in cfg.search.fixed}


def _without_paths(engine_cfg: PretrainConfig | FinetuneConfig) -> dict[str, Any]:
    """The validated config minus run-specific paths (they are keyed by digests instead)."""
    out = engine_cfg.model_dump(mode="json")
    out.get("data", {}).pop("path", None)
    for k in ("train_path", "val_path"):
        if out.get("data", {}).get(k):
            out["data"][k] = Path(out["data"][k]).name
    out.pop("init_from", None)
    return out


def pretrain_plan(cfg: PipelineConfig, data: StageOutput, home: Path) -> tuple[Stage, PretrainConfig]:
    """The pretrain stage (keyed by the validated config and the corpus digest) and its config."""
    engine_cfg = pretrain_config(cfg, data)
    return Stage(home, "pretrain", {"config": _without_paths(engine_cfg), "corpus": data.result["digests"]["corpus.txt"]}), engine_cfg


def search_plan(cfg: PipelineConfig, data: StageOutput, pretrained: StageOutput, home: Path) -> Stage:
    """The search stage, keyed by the space, the validated trial config, the pretrained model and the data."""
    inputs = {
        # trial_overrides and fixed are inside the validated trial config
        "search": cfg.search.model_dump(mode="json", exclude={"storage", "trial_overrides", "fixed"}),
        "pretrain": pretrained.key,
        "finetune": _without_paths(finetune_config(cfg, data, pretrained, trial=True)),
        "data": data.result["digests"],
    }
    return Stage(home, "search", inputs)


def finetune_plan(cfg: PipelineConfig, data: StageOutput, pretrained: StageOutput, search: StageOutput, home: Path) -> tuple[Stage, FinetuneConfig]:
    """The final fine-tune stage (keyed by its validated config) and that config (best parameters applied)."""
    engine_cfg = finetune_config(cfg, data, pretrained, search.result.get("best_params", {}))
    return Stage(home, "finetune", {"config": _without_paths(engine_cfg), "pretrain": pretrained.key, "data": data.result["digests"]}), engine_cfg


def _train_result(result: Any, out_dir: Path) -> dict[str, Any]:
    history_path = out_dir / "history.json"
    atomic_write_text(history_path, json.dumps(list(result.history or []), default=str))
    return {
        "best_dir": str(result.best_dir),
        "last_ckpt": str(result.last_ckpt) if result.last_ckpt else None,
        "metrics": {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "history": str(history_path),
    }


def pretrain_stage(cfg: PipelineConfig, data: StageOutput, home: Path, callbacks: Sequence[Any] = ()) -> StageOutput:
    """Causal-LM pretraining on the corpus (resumes from the stage's checkpoint after a crash)."""
    stage, engine_cfg = pretrain_plan(cfg, data, home)
    with stage.claim() as (out, out_dir):
        if out is not None:
            return out
        result = pretrain(engine_cfg, out_dir / "train", list(callbacks))
        return stage.finish({**_train_result(result, out_dir), "config": engine_cfg.model_dump(mode="json")})


def search_stage(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    home: Path,
    trial_callbacks: Callable[[Any, dict[str, Any]], Sequence[Any]] | None = None,
    study_callbacks: Sequence[Callable[[Any, Any], None]] = (),
) -> StageOutput:
    """Optuna search (resumable study); the result holds the best parameters.

    ``trial_callbacks(trial, params)`` returns extra engine callbacks for a trial (e.g. one that
    logs it as a nested MLflow run). With ``search.enabled: false`` the best parameters are {}.
    """
    stage = search_plan(cfg, data, pretrained, home)
    with stage.claim() as (out, out_dir):
        if out is not None:
            return out
        if not cfg.search.enabled or not cfg.search.space or cfg.search.n_trials == 0:
            return stage.finish({"best_params": {}, "enabled": False})
        objective = make_objective(cfg, data, pretrained, out_dir, trial_callbacks)
        study = tuning.optimize(cfg, objective, home=home, callbacks=study_callbacks)
        summary = tuning.summarize(study, cfg, home)
        plots = [str(p) for p in tuning.save_plots(study, out_dir / "plots")]
        return stage.finish({**summary.to_dict(), "enabled": True, "plots": plots})


def make_objective(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    out_dir: Path,
    trial_callbacks: Callable[[Any, dict[str, Any]], Sequence[Any]] | None = None,
) -> Callable[[Any], float]:
    """Optuna objective: a short fine-tune from the pretrained checkpoint; returns the metric."""

    def objective(trial: Any) -> float:
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        params = tuning.suggest(trial, cfg)
        engine_cfg = finetune_config(cfg, data, pretrained, params, trial=True)
        # a retried trial (its process died) resumes in the dead trial's directory
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning
            number = RetryHeartbeatStaleTrialCallback.retried_trial_number(tuning.frozen(trial))
        trial_dir = out_dir / f"trial-{trial.number if number is None else number}"
        callbacks = [tuning.PruningCallback(trial=trial, metric=cfg.search.metric)]
        callbacks += list(trial_callbacks(trial, params) if trial_callbacks else [])
        result = finetune(engine_cfg, trial_dir, callbacks)
        value = tuning.pick_metric(result.metrics or {}, f"best_{cfg.search.metric}")  # the best model's score
        if value is None:
            raise UserError(f"trial {trial.number}: the engine reported no {cfg.search.metric!r} metric (got {sorted(result.metrics)})")
        trial.set_user_attr("out_dir", str(trial_dir))
        return value

    return objective


def finetune_stage(
    cfg: PipelineConfig,
    data: StageOutput,
    pretrained: StageOutput,
    search: StageOutput,
    home: Path,
    callbacks: Sequence[Any] = (),
) -> StageOutput:
    """The final fine-tune with the best parameters (GPU when the engine finds one)."""
    stage, engine_cfg = finetune_plan(cfg, data, pretrained, search, home)
    params = searched(cfg, search.result.get("best_params", {}))
    with stage.claim() as (out, out_dir):
        if out is not None:
            return out
        result = finetune(engine_cfg, out_dir / "train", list(callbacks))
        return stage.finish({**_train_result(result, out_dir), "config": engine_cfg.model_dump(mode="json"), "params": params})


MODEL_DIR = "model"


def evaluate_stage(cfg: PipelineConfig, data: StageOutput, finetuned: StageOutput, home: Path) -> StageOutput:
    """Metrics on the dev split, plots (learning curves, confusion matrix, reliability, attention), explained examples.

    The fine-tune's checkpoint is copied to ``<stage dir>/model`` and only that copy is
    calibrated, scored and returned (``result["model_dir"]``: the model to serve and register).
    The fine-tune stage's directory is never written: another evaluate stage (e.g. with
    ``evaluation.calibrate: false``) reads the same checkpoint and gets its own copy. (Results
    cached by older code, without ``model_dir``, are never reused: the key holds the code digest.)
    """
    dev = data.result["files"]["dev.tsv"]
    inputs = {"finetune": finetuned.key, "dev": data.result["digests"]["dev.tsv"], "evaluation": cfg.evaluation.model_dump()}
    stage = Stage(home, "evaluate", inputs)
    with stage.claim() as (out, out_dir):
        if out is not None:
            return out
        model_dir = copy_pretrained(finetuned.result["best_dir"], out_dir / MODEL_DIR)
        # the temperature goes into the copy before dev is scored, so dev metrics use it
        extra = behaviour_stage.calibrate(cfg, model_dir, finetuned.result["config"]["data"], dev)
        metrics = evaluate_checkpoint(model_dir, dev, out_dir / "eval")
        plots = sorted(str(p) for p in (out_dir / "eval" / "plots").rglob("*.png"))
        if not any(p.endswith("learning_curves.png") for p in plots):
            plots += _learning_curves(finetuned, out_dir / "eval" / "plots")
        metrics.update(extra, **behaviour_stage.behaviour(cfg, model_dir, dev, out_dir))
        page = write_examples_page(model_dir, out_dir / "eval" / "predictions.tsv", out_dir / "eval" / "plots" / "examples.html")
        plots += [str(page)] if page else []  # explained dev examples, logged with the plots
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
        return stage.finish(
            {
                "metrics": scalars,
                "metrics_file": str(out_dir / "metrics.json"),
                "plots": plots,
                "dataset_digest": data.result["digests"]["dev.tsv"][:16],
                "eval_dir": str(out_dir / "eval"),
                "behaviour_dir": str(out_dir / behaviour_stage.BEHAVIOUR_DIR),
                "model_dir": str(model_dir),
            }
        )


def _learning_curves(finetuned: StageOutput, out_dir: Path) -> list[str]:
    """Learning curves of the fine-tune (the engine plots only when it finds its own history)."""
    from selfattn.eval.plots import plot_learning_curves

    history = json.loads(Path(finetuned.result["history"]).read_text(encoding="utf-8"))
    if not history:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    return [str(plot_learning_curves(history, out_dir / "learning_curves.png"))]
