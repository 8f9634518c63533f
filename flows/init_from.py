"""``init_from``: start the pipeline from an existing model instead of pretraining one.

``init_from: hf:ID_OR_DIR`` imports a Hugging Face checkpoint (a hub id through
``huggingface_hub.snapshot_download``, or a local directory) into a selfattn checkpoint once
(the stage is keyed by the digests of the source files); ``init_from: DIR`` uses a selfattn
checkpoint directory (or a training output directory: its ``best/``) as it is. Either way the
result looks like the pretraining stage's (``best_dir``), so search, fine-tune, evaluate,
register and promote run unchanged, with the imported model's own tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.stages import Stage, StageOutput
from selfattn.errors import UserError

HF_PREFIX = "hf:"


def _source_files(d: Path) -> dict[str, str]:
    from selfattn.data.paths import file_digest

    names = sorted(p.name for p in d.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".txt"))
    return {n: file_digest((d / n).resolve()) for n in names}


def init_from_stage(cfg: Any, home: Path) -> StageOutput:
    """The model ``cfg.init_from`` names, as a selfattn checkpoint: ``result['best_dir']``."""
    from selfattn.io.checkpoint import load_pretrained

    spec = str(cfg.init_from)
    if spec.startswith(HF_PREFIX):
        from selfattn.io.hf import convert_from_hf
        from selfattn.io.sources import resolve_source

        source = resolve_source(spec[len(HF_PREFIX) :])
        stage = Stage(home, "init_from", {"hf": _source_files(source)})
        with stage.claim() as (out, out_dir):
            if out is not None:
                return out
            best = convert_from_hf(source, out_dir / "model")
            pre = load_pretrained(best)
            return stage.finish({"best_dir": str(best), "source": spec, "resolved": str(source), "metrics": {}, **_describe(pre)})
    d = Path(spec).expanduser()
    if not (d / "config.json").is_file() and (d / "best" / "config.json").is_file():
        d = d / "best"
    if not d.is_dir():
        raise UserError(f"init_from {spec!r} is neither hf:ID_OR_DIR nor a selfattn checkpoint directory")
    pre = load_pretrained(d)
    if pre.tokenizer is None:
        raise UserError(f"init_from {d} has no tokenizer/; fine-tuning needs the tokenizer the model was trained with")
    stage = Stage(home, "init_from", {"selfattn": _source_files(d)})
    return StageOutput(stage="init_from", key=stage.key, dir=str(d), cached=False, result={"best_dir": str(d.resolve()), "source": spec, "metrics": {}, **_describe(pre)})


def _describe(pre: Any) -> dict[str, Any]:
    from selfattn.nn.models import num_parameters

    return {"task": pre.task, "n_params": num_parameters(pre.model), "tokenizer": getattr(pre.tokenizer, "kind", None), "vocab_size": pre.config.vocab_size}


def init_from_flow(cfg: Any, ctx: Any) -> StageOutput:
    """The stage under its own MLflow run (same place the pretraining stage logs)."""
    import mlflow

    from flows import tracking

    params = {"init_from": str(cfg.init_from)}
    with tracking.stage_run("init_from", parent_run_id=ctx.parent_run_id, experiment_id=ctx.experiment_id, tags={tracking.TAG_PIPELINE_RUN_ID: ctx.pipeline_run_id}, params=params):
        out = init_from_stage(cfg, Path(ctx.home))
        mlflow.log_metric("n_params", float(out.result["n_params"]))
        mlflow.set_tag("selfattn.init_from", str(cfg.init_from))
        tok = Path(out.result["best_dir"]) / "tokenizer"
        if tok.is_dir():
            mlflow.log_artifacts(str(tok), "tokenizer")
    return out
