"""Save and load a model as one directory: safetensors weights, a JSON config, the tokenizer.

Layout written by :func:`save_pretrained`::

    out_dir/
      model.safetensors   # tensors only (no pickle); a tied lm_head is stored once
      config.json         # {"format_version": 1, "task": "lm" | "classifier" | "encoder" | "mlm", "model": {...},
                          #  "classifier": {"n_classes", "pooling", "causal"} | null, "extra": {...},
                          #  "weights_sha256": "<hex digest of model.safetensors>"}
      tokenizer/          # tokenizer.json (BPE) or vocab.json (char), if a tokenizer was given

Saving is atomic: everything is written into a hidden sibling directory which then replaces
``out_dir``, so a crash never leaves a half-written checkpoint (nor loses the previous one).
A model carrying LoRA adapters is saved merged, as the equivalent plain model.

:func:`load_pretrained` reads JSON and safetensors only (never ``torch.load``) and refuses a
directory holding anything else, a tensor that is missing or unexpected, or a shape that does not
match the config, or a weights file whose SHA-256 is not the one recorded at save time (a
truncated or zeroed file), with a :class:`~selfattn.errors.UserError` naming the file or tensor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from selfattn.config import ModelConfig, format_validation_error
from selfattn.data.tokenization import BPETokenizer, CharTokenizer, load_tokenizer
from selfattn.errors import UserError
from selfattn.nn.lora import merged_state_dict
from selfattn.nn.models import (
    TASKS,
    DecoderLM,
    Encoder,
    MaskedLM,
    SequenceClassifier,
    task_of,
    tied_aliases,
)
from selfattn.utils import atomic_dir, read_json_object, sha256_file

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
README_NAMES = {"README", "README.md", "README.txt"}
TOKENIZER_SUFFIXES = {".json", ".txt"}


@dataclass
class Pretrained:
    """What :func:`load_pretrained` returns. ``model`` is in eval mode on ``map_location``."""

    model: DecoderLM | SequenceClassifier | Encoder | MaskedLM
    tokenizer: CharTokenizer | BPETokenizer | None
    config: ModelConfig
    task: str  # "lm" | "classifier" | "encoder" | "mlm"
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- config digest

# fields that do not change what a saved model computes in eval mode: editing them is allowed
_DIGEST_EXEMPT = ("dropout",)
META_CONFIG, META_DIGEST = "selfattn_config", "selfattn_config_sha256"


# fields added after digests were first recorded, with the value that means "as before": left out
# of the digest while they hold it, so every model saved before they existed keeps its digest
_DIGEST_ADDED: dict[str, Any] = {
    "rope_scaling": None, "head_size": None, "qk_norm": False,
    "norm_position": "pre", "type_vocab_size": 0, "embedding_norm": False, "position_offset": 0, "pooler": "none",
}  # fmt: skip


def _digest_fields(cfg: ModelConfig) -> dict[str, Any]:
    dumped = cfg.model_dump(mode="json")
    return {
        k: v for k, v in dumped.items() if k not in _DIGEST_EXEMPT and not (k in _DIGEST_ADDED and v == _DIGEST_ADDED[k])
    }


def config_digest(cfg: ModelConfig) -> str:
    """sha256 of the architecture fields (canonical JSON), recorded in the weights file's metadata."""
    import hashlib

    return hashlib.sha256(json.dumps(_digest_fields(cfg), sort_keys=True).encode()).hexdigest()


def config_metadata(cfg: ModelConfig) -> dict[str, str]:
    """safetensors metadata (str -> str) holding the config and its digest."""
    return {META_CONFIG: json.dumps(_digest_fields(cfg), sort_keys=True), META_DIGEST: config_digest(cfg)}


def check_config_digest(cfg: ModelConfig, metadata: dict[str, str] | None, path: Path) -> None:
    """UserError when config.json no longer describes the weights (e.g. n_heads edited by hand).

    Files written before digests were recorded carry none and are accepted.
    """
    if not metadata or META_DIGEST not in metadata or metadata[META_DIGEST] == config_digest(cfg):
        return
    changed: list[str] = []
    try:
        saved = json.loads(metadata.get(META_CONFIG, "{}"))
        now = _digest_fields(cfg)
        changed = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now) - set(_DIGEST_EXEMPT)) if saved.get(k) != now.get(k)]
    except (json.JSONDecodeError, AttributeError):
        pass
    detail = "; changed: " + ", ".join(changed) if changed else ""
    raise UserError(
        f"{path}: config.json does not match the config these weights were saved with (digest "
        f"{metadata[META_DIGEST][:12]} != {config_digest(cfg)[:12]}){detail}. The model would load with different "
        "logits; restore config.json or re-save the model from code"
    )


# --------------------------------------------------------------------------- saving


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, where: str | Path) -> None:
    """A ``UserError`` naming both sizes when ``tokenizer`` makes ids past an embedding of ``vocab_size`` rows."""
    if tokenizer is not None and tokenizer.vocab_size > vocab_size:
        raise UserError(
            f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only {vocab_size} rows "
            "(vocab_size); ids past the table would crash - use the tokenizer the model was trained with"
        )


def save_pretrained(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: CharTokenizer | BPETokenizer | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a DecoderLM, SequenceClassifier, Encoder or MaskedLM), its config, and ``tokenizer`` to ``out_dir``.

    ``extra`` is any JSON-serializable mapping (metrics, data hashes, training config) stored under
    ``"extra"`` in ``config.json``. An existing ``out_dir`` is replaced only if it is a checkpoint
    (holds ``config.json``) or empty. Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    task = _task_of(model)
    out = Path(out_dir)
    check_tokenizer_fits(tokenizer, model.cfg.vocab_size, out)
    _check_replaceable(out)
    try:
        extra_json = json.loads(json.dumps(extra or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"extra must be JSON-serializable: {exc}") from None

    cfg: ModelConfig = model.cfg
    meta = {
        "format_version": FORMAT_VERSION,
        "task": task,
        "model": cfg.model_dump(mode="json"),
        "classifier": (
            {"n_classes": cfg.n_classes, "pooling": cfg.pooling, "causal": cfg.causal} if task == "classifier" else None
        ),
        "extra": extra_json,
    }
    tensors = _tensors_to_save(model)

    need = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_dir(out, need_bytes=need, what="a model checkpoint") as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "task": task, **config_metadata(cfg)})
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_DIR)
    return out


def copy_pretrained(src: str | Path, dst: str | Path) -> Path:
    """Copy the checkpoint directory ``src`` to ``dst`` atomically (an existing ``dst`` is replaced).

    ``src`` must have the layout :func:`load_pretrained` accepts; the copy is byte-identical, so a
    caller can change the copy (e.g. store a temperature in its ``config.json``) and leave ``src``
    as it was. As for :func:`save_pretrained`, ``dst`` may only be a checkpoint or empty. Returns
    ``dst``.
    """
    src, out = Path(src), Path(dst)
    _check_layout(src)
    _check_replaceable(out)
    with atomic_dir(out, what="a model checkpoint") as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return out


def _check_replaceable(out: Path) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
        raise UserError(f"refusing to overwrite {out}: it exists and is not a checkpoint directory")


def _task_of(model: nn.Module) -> str:
    try:
        return task_of(model)
    except ValueError as exc:
        raise ValueError(f"save_pretrained: {exc}") from None


def _tensors_to_save(model: nn.Module) -> dict[str, Tensor]:
    """Plain (LoRA-merged) state dict, each storage once: tied aliases such as lm_head are dropped."""
    state = merged_state_dict(model)
    tied = set(_tied_aliases(model))
    for key in tied:
        if not torch.equal(state[key], state["tok_emb.weight"]):
            # e.g. LoRA on a tied lm_head: the merged head no longer equals the embedding
            raise ValueError(f"{key} differs from tok_emb.weight although cfg.tie_embeddings is True")
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if k not in tied}


def _tied_aliases(model: nn.Module) -> list[str]:
    """State-dict keys that are the same tensor as an earlier key (recreated by the constructor)."""
    return tied_aliases(model)


def assign_weights(model: nn.Module, tensors: dict[str, Tensor], rebuild: Callable[[], nn.Module]) -> nn.Module:
    """``model``, built on the meta device and checked against ``tensors``, with the tensors as its
    parameters: no random init and about one copy of the weights in memory, in the tensors' dtype.

    A tied head is tied again (assigning replaced the shared parameter). A model with buffers
    (ALiBi's slopes: non-persistent, not in any file) is built for real by ``rebuild()`` on the
    tensors' device and loaded by copy. Returns the model in eval mode.
    """
    if any(True for _ in model.buffers()):
        first = next(iter(tensors.values()))
        model = rebuild().to(first.device)
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        if len(dtypes) == 1:
            model.to(dtypes.pop())  # a checkpoint saved in bf16 loads in bf16
        model.load_state_dict(tensors, strict=False)  # strictness checked by the caller; ties kept
    else:
        model.load_state_dict(tensors, strict=False, assign=True)
        if "lm_head.weight" in _tied_aliases(model):
            model.lm_head.weight = model.tok_emb.weight  # type: ignore[union-attr]
        if "mlm_head.decoder.weight" in _tied_aliases(model):
            model.mlm_head.decoder.weight = model.tok_emb.weight  # type: ignore[union-attr]
    return model.eval()


# --------------------------------------------------------------------------- loading


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> Pretrained:
    """Rebuild the model saved by :func:`save_pretrained` (bitwise the same weights)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    d = Path(path)
    _check_layout(d)
    meta = _read_meta(d / CONFIG_FILE)
    task = meta["task"]
    try:
        cfg = ModelConfig.model_validate(meta["model"])
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, f"model config in {d / CONFIG_FILE}")) from None

    _check_weights_digest(d / WEIGHTS_FILE, meta.get("weights_sha256"))
    try:
        tensors = load_file(str(d / WEIGHTS_FILE), device=str(map_location))
        with safe_open(str(d / WEIGHTS_FILE), framework="pt") as fh:
            file_meta = fh.metadata()
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{d / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None

    build = TASKS[task]
    try:
        with torch.device("meta"):  # shapes only: no random init, no second copy of the weights
            model: nn.Module = build(cfg)
    except ValueError as exc:  # e.g. an LM asking for attention='low_rank' (bidirectional only)
        raise UserError(f"{d / CONFIG_FILE}: this {task} config cannot be built: {exc}") from None
    _check_tensors(model, tensors, d / WEIGHTS_FILE)
    check_config_digest(cfg, file_meta, d / CONFIG_FILE)
    if len({t.dtype for t in tensors.values() if t.is_floating_point()}) > 1:  # mixed: all float32, as built
        tensors = {k: t.float() if t.is_floating_point() else t for k, t in tensors.items()}
    model = assign_weights(model, tensors, lambda: build(cfg))

    tokenizer = load_tokenizer(d / TOKENIZER_DIR) if (d / TOKENIZER_DIR).is_dir() else None
    check_tokenizer_fits(tokenizer, cfg.vocab_size, d / TOKENIZER_DIR)
    return Pretrained(model=model, tokenizer=tokenizer, config=cfg, task=task, extra=meta.get("extra") or {})


def _check_layout(d: Path) -> None:
    if not d.is_dir():
        raise UserError(f"checkpoint directory not found: {d}")
    for p in sorted(d.iterdir()):
        if p.name in (WEIGHTS_FILE, CONFIG_FILE) and p.is_file():
            continue
        if p.name in README_NAMES and p.is_file():
            continue
        if p.name == TOKENIZER_DIR and p.is_dir():
            for q in sorted(p.iterdir()):
                if not (q.is_file() and q.suffix in TOKENIZER_SUFFIXES):
                    raise UserError(
                        f"refusing to load {d}: unexpected file {q} (tokenizer/ may hold only .json/.txt files)"
                    )
            continue
        raise UserError(
            f"refusing to load {d}: unexpected file {p} (a checkpoint holds only {WEIGHTS_FILE}, "
            f"{CONFIG_FILE}, {TOKENIZER_DIR}/ and a README)"
        )
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (d / name).is_file():
            raise UserError(f"{d} is not a checkpoint: {name} is missing")


def _check_weights_digest(path: Path, recorded: Any) -> None:
    """UserError when the weights file's SHA-256 is not the one recorded at save time (a truncated or
    zeroed file after a crash, a disk error). Checkpoints saved before digests were recorded carry none."""
    if recorded is None:
        return
    actual = sha256_file(path)
    if actual != recorded:
        raise UserError(
            f"{path} is corrupt: its SHA-256 ({actual[:12]}..., {path.stat().st_size} bytes) is not the one recorded in "
            f"{path.parent / CONFIG_FILE} when it was saved ({str(recorded)[:12]}...). Restore the checkpoint from a "
            "copy or save it again"
        )


def _read_meta(path: Path) -> dict[str, Any]:
    meta = read_json_object(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format_version {version!r} is not supported (expected {FORMAT_VERSION})")
    if meta.get("task") not in TASKS:
        raise UserError(f"{path}: task {meta.get('task')!r} must be one of {', '.join(repr(t) for t in TASKS)}")
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"{path}: 'model' must be a mapping of ModelConfig fields")
    return meta


def _check_tensors(model: nn.Module, tensors: dict[str, Tensor], path: Path) -> None:
    expected = {k: v for k, v in model.state_dict().items() if k not in set(_tied_aliases(model))}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        k = missing[0]
        raise UserError(
            f"{path}: tensor {k!r} is missing (expected shape {tuple(expected[k].shape)}); "
            f"{len(missing)} missing in all: {missing[:5]}; was it saved from a different config?"
        )
    if unexpected:
        k = unexpected[0]
        raise UserError(
            f"{path}: unexpected tensor {k!r} with shape {tuple(tensors[k].shape)}; "
            f"{len(unexpected)} unexpected in all: {unexpected[:5]}; was it saved from a different config?"
        )
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise UserError(
                f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)} in the file but the config "
                f"expects {tuple(ref.shape)}; was it saved from a different config?"
            )
