"""``init_from``: start the pipeline from an existing model instead of pretraining one.

``init_from: hf:ID_OR_DIR`` imports a Hugging Face checkpoint (a hub id through
``huggingface_hub.snapshot_download``, or a local directory) and ``init_from: gguf:FILE`` a GGUF
file (also ``gguf:pkg:PACKAGE/file.gguf``) into a selfattn checkpoint once (the stage is keyed by
the digests of the source files); ``init_from: DIR`` uses a selfattn
checkpoint directory (or a training output directory: its ``best/``) as it is. Either way the
result looks like the pretraining stage's (``best_dir``), so search, fine-tune, evaluate,
register and promote run unchanged, with the imported model's own tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from flows.stages.base import Artifact, Logged, Stage, StageOutput
from selfattn.data.paths import file_digest
from selfattn.errors import UserError
from selfattn.io.checkpoint import Pretrained, load_pretrained
from selfattn.io.gguf import GGUF_PREFIX
from selfattn.nn.models import num_parameters

HF_PREFIX = "hf:"


def _source_files(d: Path) -> dict[str, str]:
    names = sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"))
    return {n: file_digest((d / n).resolve()) for n in names}


def init_from_stage(cfg: PipelineConfig, home: Path) -> StageOutput:
    """The model ``cfg.init_from`` names, as a selfattn checkpoint: ``result['best_dir']``."""
    spec = str(cfg.init_from)
    if spec.startswith(HF_PREFIX):
        out = _import_hf(spec, home)
    elif spec.startswith(GGUF_PREFIX):
        out = _import_gguf(spec, home)
    else:
        out = _existing(spec, home)
    r = out.result
    tokenizer = Path(r["best_dir"]) / "tokenizer"
    return out.declare(
        Logged(
            params={"init_from": spec},
            metrics={"n_params": float(r["n_params"])},
            tags={"selfattn.init_from": spec},
            artifacts=[Artifact(path=str(tokenizer), to="tokenizer")] if tokenizer.is_dir() else [],
        )
    )


def _hf_plan(spec: str, home: Path) -> tuple[Stage, Path]:
    """The import of a Hugging Face checkpoint, keyed by the digests of its files, and its directory."""
    from selfattn.io.sources import resolve_source

    source = resolve_source(spec[len(HF_PREFIX) :])
    return Stage(home, "init_from", {"hf": _source_files(source)}), source


def init_from_done(cfg: PipelineConfig, home: Path) -> StageOutput | None:
    """The stage's stored output when its import finished earlier (an existing checkpoint: always),
    else None; converts and writes nothing."""
    spec = str(cfg.init_from)
    if spec.startswith(HF_PREFIX):
        return _hf_plan(spec, home)[0].done()
    if spec.startswith(GGUF_PREFIX):
        return _gguf_plan(spec, home)[0].done()
    return _existing(spec, home)


def _import_hf(spec: str, home: Path) -> StageOutput:
    """A Hugging Face checkpoint converted once into the stage's directory."""
    from selfattn.io.hf import convert_from_hf

    stage, source = _hf_plan(spec, home)
    with stage.claim() as (out, out_dir):
        if out is None:
            best = convert_from_hf(source, out_dir / "model")
            out = stage.finish({"best_dir": str(best), "source": spec, "resolved": str(source), "metrics": {}, **_describe(load_pretrained(best))})
    return out


def _gguf_plan(spec: str, home: Path) -> tuple[Stage, Path]:
    """The import of a GGUF file, keyed by the file's digest, and the file."""
    from selfattn.io.sources import resolve_file

    source = resolve_file(spec[len(GGUF_PREFIX) :])
    return Stage(home, "init_from", {"gguf": {source.name: file_digest(source.resolve())}}), source


def _import_gguf(spec: str, home: Path) -> StageOutput:
    """A GGUF file converted once into the stage's directory (keyed by the file's digest)."""
    from selfattn.io.gguf import convert_from_gguf

    stage, source = _gguf_plan(spec, home)
    with stage.claim() as (out, out_dir):
        if out is None:
            best = convert_from_gguf(source, out_dir / "model")
            out = stage.finish({"best_dir": str(best), "source": spec, "resolved": str(source), "metrics": {}, **_describe(load_pretrained(best))})
    return out


def _existing(spec: str, home: Path) -> StageOutput:
    """A selfattn checkpoint directory used where it is (nothing written)."""
    d = Path(spec).expanduser()
    if not (d / "config.json").is_file() and (d / "best" / "config.json").is_file():
        d = d / "best"
    if not d.is_dir():
        raise UserError(f"init_from {spec!r} is neither hf:ID_OR_DIR, gguf:FILE nor a selfattn checkpoint directory")
    pre = load_pretrained(d)
    if pre.tokenizer is None:
        raise UserError(f"init_from {d} has no tokenizer/; fine-tuning needs the tokenizer the model was trained with")
    stage = Stage(home, "init_from", {"selfattn": _source_files(d)})
    result = {"best_dir": str(d.resolve()), "source": spec, "metrics": {}, **_describe(pre)}
    return StageOutput(stage="init_from", key=stage.key, dir=str(d), cached=False, result=result)


def _describe(pre: Pretrained) -> dict[str, Any]:
    return {"task": pre.task, "n_params": num_parameters(pre.model), "tokenizer": getattr(pre.tokenizer, "kind", None), "vocab_size": pre.config.vocab_size}
