"""The data stages: materialise the run's files, then the data gate (``data_checks`` on each file).

Local copies come from ``SELFATTN_DATA_DIR``; without it the public sources are downloaded
(SST-2 from the HF hub, Tiny Shakespeare from its canonical URL). The files are subsampled as
the config says, so what is checked, trained on, logged and digested is exactly what is used.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from flows.paths import data_root, resolve_local_path
from flows.stages.base import Artifact, Dataset, Logged, Stage, StageOutput, digest
from selfattn.data.paths import file_digest
from selfattn.data.tables import load_table, read_table
from selfattn.errors import UserError
from selfattn.utils import atomic_write_text

TAG_DATA_DIGEST = "selfattn.data_digest"
TAG_VALIDATION = "selfattn.validation"
FILES = ("corpus.txt", "train.tsv", "dev.tsv")
# file -> (dataset name, the context it is used in)
DATASETS = {"corpus.txt": ("corpus", "pretrain"), "train.tsv": ("sst2-train", "training"), "dev.tsv": ("sst2-dev", "evaluation")}


# --------------------------------------------------------------------------- materialise


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


def _hub_table(hub_id: str, split: str, cfg: PipelineConfig):
    """Download a hub split (users with internet) -> DataFrame with the configured columns."""
    ds = load_table(hub_id, split=split, columns=[cfg.data.text_column, cfg.data.label_column])
    return ds.select_columns([cfg.data.text_column, cfg.data.label_column]).to_pandas().astype(str)


def _sources(cfg: PipelineConfig, home: Path) -> dict[str, dict[str, Any]]:
    d, local = cfg.data, data_root() is not None
    return {
        "corpus": {"from_train": True} if d.corpus_from_train else _source_identity(d.corpus if local else d.corpus_url, home=home),
        "train": _source_identity(d.train if local else f"{d.sst2_hub}:train", home=home),
        "dev": _source_identity(d.dev if local else f"{d.sst2_hub}:validation", home=home),
    }


def _corpus_text(cfg: PipelineConfig, sources: dict[str, dict[str, Any]]) -> str:
    d = cfg.data
    if d.corpus_from_train:
        src = sources["train"]
        table = read_table(Path(src["file"])).frame if "file" in src else _hub_table(d.sst2_hub, "train", cfg)
        if d.text_column not in table.columns:
            raise UserError(f"data.corpus_from_train: training data has no column {d.text_column!r} (columns: {list(table.columns)})")
        text = "\n".join(t.strip() for t in table[d.text_column]) + "\n"
    elif "file" in sources["corpus"]:
        text = Path(sources["corpus"]["file"]).read_text(encoding="utf-8", errors="replace")
    else:
        with urllib.request.urlopen(d.corpus_url, timeout=60) as resp:  # noqa: S310 (fixed https URL from config)
            text = resp.read().decode("utf-8", errors="replace")
    return text if d.corpus_chars is None else text[: d.corpus_chars]


def _write_split(cfg: PipelineConfig, split: str, src: dict[str, Any], target: Path) -> None:
    """train: a seeded subsample of ``data.train_rows``; dev: its first ``data.dev_rows``."""
    n = cfg.data.train_rows if split == "train" else cfg.data.dev_rows
    if "file" in src and n is None:
        shutil.copyfile(src["file"], target)
        return
    hub_split = "train" if split == "train" else "validation"
    table = read_table(Path(src["file"])).frame if "file" in src else _hub_table(cfg.data.sst2_hub, hub_split, cfg)
    if n is not None and n < len(table):
        table = table.sample(n=n, random_state=cfg.seed).sort_index() if split == "train" else table.head(n)
    _write_table(table, target)


def data_plan(cfg: PipelineConfig, home: Path) -> tuple[Stage, dict[str, dict[str, Any]]]:
    """The data stage (keyed by the data section, the sources' identities and the seed) and those sources."""
    sources = _sources(cfg, home)
    return Stage(home, "data", {"data": cfg.data.model_dump(), "sources": sources, "seed": cfg.seed}), sources


def prepare_data(cfg: PipelineConfig, home: Path) -> StageOutput:
    """Materialise the run's data files (subsampled: exactly what is trained, checked and logged)."""
    stage, sources = data_plan(cfg, home)
    with stage.claim() as (out, out_dir):
        if out is None:
            atomic_write_text(out_dir / "corpus.txt", _corpus_text(cfg, sources))
            for split in ("train", "dev"):
                _write_split(cfg, split, sources[split], out_dir / f"{split}.tsv")
            files = {name: str(out_dir / name) for name in FILES}
            digests = {name: file_digest(Path(p)) for name, p in files.items()}
            out = stage.finish({"files": files, "digests": digests, "digest": digest(digests)[:16], "sources": sources})
    return out.declare(_data_log(cfg, out))


def _data_log(cfg: PipelineConfig, out: StageOutput) -> Logged:
    r = out.result
    datasets = [
        Dataset(
            path=r["files"][file], name=name, context=context, digest=r["digests"][file],
            targets=cfg.data.label_column if file.endswith(".tsv") else None,
        )
        for file, (name, context) in DATASETS.items()
    ]
    return Logged(
        params=cfg.data.model_dump(),
        tags={TAG_DATA_DIGEST: r["digest"], "selfattn.data_key": out.key},
        datasets=datasets,
        pipeline=Logged(tags={TAG_DATA_DIGEST: r["digest"]}),
    )


# --------------------------------------------------------------------------- the gate


def validate_plan(cfg: PipelineConfig, data: StageOutput, home: Path) -> Stage:
    """The gate's stage, keyed by the data digests, the labels and the columns (its marker: the checks passed)."""
    d = cfg.data
    return Stage(home, "validate", {"data": data.result["digests"], "labels": d.labels, "cols": [d.text_column, d.label_column]})


def validate_data(cfg: PipelineConfig, data: StageOutput, home: Path) -> StageOutput:
    """data_checks on the corpus, the training split and the dev split (against train).

    A failed check is not cached (the next run checks again); a passed one is. The result holds
    ``passed``, the failures and the paths of report.json and the GX Data Docs; a file the checks
    cannot read at all holds ``unusable`` (the error) instead.
    """
    stage = validate_plan(cfg, data, home)
    with stage.claim() as (out, out_dir):
        if out is None:
            try:
                result = _check(cfg, data.result["files"], out_dir)
            except UserError as exc:  # unusable file: no report, but recorded
                result = {"passed": False, "unusable": str(exc), "exit_code": exc.exit_code}
            result["given"] = _given(cfg, data.result.get("sources", {}))
            out = stage.finish(result) if result["passed"] else stage.output(result)
    return out.declare(_gate_log(out.result))


# the config key that names each checked file, and the key that fixes a failed column check
FILE_KEYS = {"corpus": "data.corpus", "train": "data.train", "dev": "data.dev"}
FIX_KEYS = {"text_column": "data.text_column", "label_column": "data.label_column"}


def _given(cfg: PipelineConfig, sources: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What the user named for each checked file: their path or hub id (the gate checks copies)."""
    d = cfg.data
    specs = {"corpus": "data.train (data.corpus_from_train)" if d.corpus_from_train else d.corpus, "train": d.train, "dev": d.dev}
    return {name: sources.get(name, {}).get("file") or sources.get(name, {}).get("remote") or spec for name, spec in specs.items()}


def _check(cfg: PipelineConfig, files: dict[str, str], out_dir: Path) -> dict[str, Any]:
    from data_checks import validate

    d = cfg.data
    common = {"text_column": d.text_column, "label_column": d.label_column, "labels": d.labels}
    reports = {
        "corpus": validate(files["corpus.txt"], kind="corpus", output_dir=out_dir / "corpus"),
        "train": validate(files["train.tsv"], kind="labelled", output_dir=out_dir / "train", **common),
    }
    # dev is checked against train (leakage, label distribution) only when train has the columns
    train_ok = not any(c.name in FIX_KEYS for c in reports["train"].failures)
    against = files["train.tsv"] if train_ok else None
    reports["dev"] = validate(files["dev.tsv"], kind="labelled", against=against, output_dir=out_dir / "dev", **common)
    atomic_write_text(out_dir / "report.json", json.dumps({name: r.to_dict() for name, r in reports.items()}, indent=2, default=str))
    return {
        "passed": all(r.passed for r in reports.values()),
        "failures": {name: [f"{c.name}: {c.detail}" for c in r.failures] for name, r in reports.items() if r.failures},
        "warnings": {name: [f"{c.name}: {c.detail}" for c in r.warnings] for name, r in reports.items() if r.warnings},
        "report": str(out_dir / "report.json"),
        "data_docs": {name: str(r.data_docs) for name, r in reports.items() if r.data_docs},
    }


def _gate_log(result: dict[str, Any]) -> Logged:
    """The report and the GX Data Docs on the stage's run; a failed gate's report on the pipeline's run too."""
    if "unusable" in result:
        return Logged(tags={TAG_VALIDATION: "unusable"}, texts={"validation/error.txt": result["unusable"]})
    docs = [Artifact(path=p, to=f"validation/data_docs/{name}") for name, p in result.get("data_docs", {}).items() if Path(p).is_dir()]
    report = Artifact(path=result["report"], to="validation")
    return Logged(
        tags={TAG_VALIDATION: "passed" if result["passed"] else "failed"},
        artifacts=[report, *docs],
        pipeline=None if result["passed"] else Logged(artifacts=[report]),
    )


def require_passed(checked: StageOutput) -> None:
    """The data gate: a UserError naming every failed check unless validation passed."""
    r = checked.result
    if "unusable" in r:
        raise UserError(r["unusable"], exit_code=r["exit_code"])
    if not r["passed"]:
        given = r.get("given", {})
        lines = []
        for name, failures in r["failures"].items():
            for failure in failures:
                check = failure.split(":", 1)[0]
                fix = f"; set {FIX_KEYS[check]} (--set {FIX_KEYS[check]}=NAME) or fix the file's header" if check in FIX_KEYS else ""
                lines.append(f"  {FILE_KEYS.get(name, name)} ({given.get(name, name)}): {failure}{fix}")
        raise UserError("data checks failed, nothing was trained or registered:\n" + "\n".join(lines) + f"\n(report: {r['report']})")
