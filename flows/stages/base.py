"""What every stage shares: a directory keyed by its inputs, a done marker, and ``StageOutput``.

Caching design (own done markers, not Prefect's result cache): every stage writes into
``<home>/runs/<stage>-<key>/`` where ``key`` is a SHA-256 of the stage's inputs (its config
section, the keys of the stages it depends on, the digests of the data files it reads) and the
code version (a digest of the ``selfattn`` sources and of ``flows/stages/``). When a stage
finishes, it writes ``_SUCCESS`` (JSON result) atomically (temp file + fsync + rename); a re-run
finds the marker and returns the stored result without doing the work; a changed config changes
the keys of that stage and of everything downstream only. A stage killed half-way has no marker,
so it runs again in the same directory, where the training engine resumes from its last checkpoint.

Why not Prefect's ``INPUTS + TASK_SOURCE`` cache: the stage directory must be stable across a
crash for checkpoint resume, the same stages must run without Prefect (benchmark,
``selfattn tune``), and a marker on disk is easy to inspect and delete by hand.

A stage computes and *declares*: its ``StageOutput.log`` (a :class:`Logged`) says which params,
metrics, tags, artifacts, tables and datasets belong on the stage's tracking run (and, in
``Logged.pipeline``, on the pipeline's run). ``flows.tracking.runs.log_stage`` records them; no
stage module imports a tracking or orchestration library.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, ConfigDict

import selfattn
from selfattn.utils import atomic_write_text

MARKER = "_SUCCESS"


# --------------------------------------------------------------------------- what a stage declares


class _Plain(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Artifact(_Plain):
    """A local file or directory, logged under ``to`` (a folder of the run's artifacts; "" = top)."""

    path: str
    to: str = ""


class Table(_Plain):
    """A TSV file logged as a table the tracking UI can show and compare (``artifact_file``: ``.json``)."""

    path: str
    artifact_file: str


class Dataset(_Plain):
    """A data file listed as a run input (digest and source): on the stage's run and the pipeline's."""

    path: str
    name: str
    context: str
    targets: str | None = None
    digest: str | None = None


class Logged(_Plain):
    """What should be recorded on a tracking run: the one answer to "where do I log X?".

    ``params`` are flattened (``{"optim": {"lr": 1}}`` -> ``optim.lr``); ``dicts`` and ``texts``
    map an artifact file name to a JSON value or a text; ``pipeline`` is what the pipeline's own
    run gets besides (headline metrics, the data digest, a failed gate's report).
    """

    params: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    artifacts: list[Artifact] = []
    dicts: dict[str, Any] = {}
    texts: dict[str, str] = {}
    tables: list[Table] = []
    datasets: list[Dataset] = []
    pipeline: Logged | None = None


class StageOutput(_Plain):
    """What a stage hands downstream (paths and small JSON values, never tensors) and what it
    asks to be logged (``log``; derived from ``result``, so a cached stage declares the same)."""

    stage: str
    key: str
    dir: str
    cached: bool = False
    result: dict[str, Any] = {}
    log: Logged = Logged()

    def declare(self, log: Logged) -> StageOutput:
        """This output with ``log`` as its declarations."""
        return self.model_copy(update={"log": log})


# --------------------------------------------------------------------------- keys and markers


def digest(obj: Any) -> str:
    """SHA-256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def sources_digest(*roots: Path) -> str:
    """SHA-256 of the ``*.py`` files under ``roots``: their paths (from their parent folder) and bytes."""
    h = hashlib.sha256()
    for p in sorted(p for root in roots for p in root.rglob("*.py")):
        h.update(str(p.relative_to(p.parents[1])).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """Digest of the code that computes a stage's result: the ``selfattn`` package and ``flows/stages/``."""
    return sources_digest(Path(selfattn.__file__).resolve().parent, Path(__file__).resolve().parent)[:16]


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

    def output(self, result: dict[str, Any], *, cached: bool = False) -> StageOutput:
        return StageOutput(stage=self.name, key=self.key, dir=str(self.dir), cached=cached, result=result)

    def done(self) -> StageOutput | None:
        """The stored result when the stage finished earlier (no lock; see :meth:`claim`)."""
        marker = self.dir / MARKER
        if not marker.is_file():
            return None
        try:
            result = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return self.output(result, cached=True)

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
        return self.output(result)


# --------------------------------------------------------------------------- shared by the training stages


def engine_inputs(engine_cfg: BaseModel) -> dict[str, Any]:
    """A validated engine config minus run-specific paths (the stage keys hold their digests instead)."""
    out = engine_cfg.model_dump(mode="json")
    out.get("data", {}).pop("path", None)
    for k in ("train_path", "val_path"):
        if out.get("data", {}).get(k):
            out["data"][k] = Path(out["data"][k]).name
    out.pop("init_from", None)
    return out


def train_result(result: Any, out_dir: Path, engine_cfg: BaseModel) -> dict[str, Any]:
    """A training stage's result: the best checkpoint, the last one, final metrics, the history file, the config."""
    history_path = out_dir / "history.json"
    atomic_write_text(history_path, json.dumps(list(result.history or []), default=str))
    return {
        "best_dir": str(result.best_dir),
        "last_ckpt": str(result.last_ckpt) if result.last_ckpt else None,
        "metrics": {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
        "history": str(history_path),
        "config": engine_cfg.model_dump(mode="json"),
    }


def training_log(out: StageOutput) -> Logged:
    """A training stage's declarations: the engine config it built, its final metrics, its history
    (and the tokenizer, when the checkpoint has one)."""
    r = out.result
    tokenizer = Path(r["best_dir"]) / "tokenizer"
    artifacts = [Artifact(path=str(tokenizer), to="tokenizer")] if out.stage == "pretrain" and tokenizer.is_dir() else []
    return Logged(
        params=r["config"],
        metrics={f"final_{k}": v for k, v in r["metrics"].items()},
        artifacts=[*artifacts, Artifact(path=r["history"], to="history")],
    )
