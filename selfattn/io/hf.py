"""Hugging Face checkpoints in and out, one table entry per family (:mod:`selfattn.io.hf_families`).

``import_hf(src)`` reads a Hugging Face model directory (``config.json``, ``model.safetensors`` or a
sharded ``model.safetensors.index.json``, ``tokenizer.json``) and returns the selfattn model with
the same outputs, plus the tokenizer as a :class:`~selfattn.data.tokenization.HFTokenizer`.
``export_hf(model, dst, tokenizer)`` writes the reverse (transformers' ``Auto*`` classes load it),
and ``export_peft(model, dst)`` writes a LoRA-adapted model's adapters in the PEFT layout
(``adapter_config.json`` + ``adapter_model.safetensors``) next to an exported base.

Only JSON and safetensors are read (never pickle). ``transformers`` is not needed at run time:
the configs are plain JSON and the renaming is a table. What maps onto the trunk:

=================  ==========================================================================
GPT-2              learned positions, LayerNorm (eps ``layer_norm_epsilon``), tanh GELU
                   (``gelu_new``), biases everywhere, fused ``c_attn`` (Conv1D: weights
                   stored ``[in, out]``, transposed here), tied or untied head
Llama / Mistral    RoPE (``rope_theta``; rope types default, ``linear``, ``llama3`` (Llama
/ Qwen2 / Qwen3    3.1-3.3) and ``yarn``), RMSNorm (``rms_norm_eps``), SwiGLU, GQA, a ``head_dim``
                   apart from ``hidden_size / heads`` (``head_size``), tied or untied head;
                   Qwen2's q/k/v biases (``qkv_bias``); Qwen3's per-head q/k RMSNorm
                   (``qk_norm``); Mistral's ``sliding_window`` and Qwen's on every layer
=================  ==========================================================================
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from selfattn.config import ModelConfig
from selfattn.data.tokenization import BPE_FILE, HFTokenizer
from selfattn.errors import UserError
from selfattn.io.checkpoint import (
    assign_weights,
    check_tokenizer_fits,
    load_pretrained,
    save_pretrained,
)
from selfattn.io.hf_families import (
    FAMILIES,
    Family,
    HFConfig,
    family_of_config,
    family_of_model_type,
)
from selfattn.io.sources import resolve_source
from selfattn.nn.lora import LoRALinear, lora_modules, merged_state_dict
from selfattn.nn.models import TASKS, DecoderLM, task_of

__all__ = [
    "SUPPORTED",
    "resolve_source",
    "config_from_hf",
    "config_to_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
    "import_hf",
    "convert_from_hf",
    "export_hf",
    "convert_to_hf",
    "export_peft",
    "hf_family",
]

# model_type -> the architecture name transformers writes in config.json (decoders: the LM)
SUPPORTED: dict[str, str] = {mt: next(iter(f.architectures.values())) for f in FAMILIES.values() for mt in f.model_types}
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5", "flax_model.msgpack")
# our names of a head tied to the token embedding (cfg.tie_embeddings): the LM head, the MLM decoder
_TIED = ("lm_head.weight", "mlm_head.decoder.weight")


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path.parent} is not a Hugging Face model directory: {path.name} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a JSON object")
    return data


def _weight_files(d: Path) -> list[Path]:
    """``model.safetensors``, or the shards an index names; pickles are refused, naming the fix."""
    if (d / _WEIGHTS).is_file():
        return [d / _WEIGHTS]
    if (d / _INDEX).is_file():
        weight_map = _read_json(d / _INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{d / _INDEX}: weight_map must map tensor names to shard file names, got {str(weight_map)[:80]}")
        shards = sorted(set(weight_map.values()))
        if not shards:
            raise UserError(f"{d / _INDEX} has an empty weight_map")
        files = [d / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{d / _INDEX} names shards that are missing: {missing}")
        return files
    pickled = [n for n in _PICKLED if (d / n).exists()] + sorted(p.name for p in d.glob("pytorch_model-*.bin"))
    if pickled:
        raise UserError(
            f"{d} holds only pickled weights ({', '.join(pickled)}); selfattn never unpickles. Convert them to "
            f"safetensors once, on a machine with transformers: python -c \"from transformers import "
            f"AutoModel as M; M.from_pretrained('{d}').save_pretrained('{d}-safetensors')\" "
            "(or run the hub's safetensors convert space), then import that directory"
        )
    raise UserError(
        f"{d} has no weights: expected {_WEIGHTS} or {_INDEX} (a hub repo with only pickled pytorch_model.bin "
        "weights must be converted to safetensors first: AutoModel.from_pretrained(id).save_pretrained(dir))"
    )


def _read_weights(d: Path) -> dict[str, Tensor]:
    """Every tensor of the checkpoint; a NaN or Inf anywhere is refused, naming the tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors: dict[str, Tensor] = {}
    for f in _weight_files(d):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{f} is not a readable safetensors file: {exc}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{d}: tensor {name!r} holds {bad} NaN/Inf values of {t.numel()}; the checkpoint is corrupt (re-download or re-export it)")
    return tensors


def _read_tokenizer(d: Path, hf: dict[str, Any], template: bool = False) -> HFTokenizer | None:
    """The directory's ``tokenizer.json`` as an HFTokenizer; None when it has no tokenizer files at all.

    A tokenizer that is there but unusable (a dangling symlink, a directory of that name, only a
    SentencePiece ``tokenizer.model``) is refused now rather than found missing at fine-tune time.
    """
    path = d / BPE_FILE
    if path.is_symlink() and not path.exists():
        raise UserError(f"{path} is a symlink to {os.readlink(path)!r}, which does not exist (a partial download?)")
    if path.exists() and not path.is_file():
        raise UserError(f"{path} is not a file (a directory of that name?); expected the tokenizer's JSON")
    if not path.exists():
        others = [n for n in ("tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model") if (d / n).exists()]
        if others:
            raise UserError(
                f"{d} has tokenizer files ({', '.join(others)}) but no {BPE_FILE}, the only format selfattn reads; write one "
                f"once with transformers: AutoTokenizer.from_pretrained('{d}').save_pretrained('{d}') (it adds {BPE_FILE})"
            )
        return None
    tokenizer = HFTokenizer.from_pretrained_dir(d, hf, template=template)
    n_rows = hf.get("vocab_size")
    if isinstance(n_rows, int) and tokenizer.vocab_size > n_rows:
        raise UserError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {n_rows} rows "
            "(vocab_size in config.json); ids past the table would crash - use the tokenizer the model was trained with"
        )
    return tokenizer


# --------------------------------------------------------------------------- configs


def _family(hf: dict[str, Any], where: str) -> Family:
    return family_of_model_type(hf.get("model_type"), (hf.get("architectures") or [None])[0], where)


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json", pad_token_id: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` mapping (a UserError if it does not fit)."""
    fam = _family(hf, where)
    c = HFConfig(hf, where)
    fields = fam.config_in(c)
    pad = pad_token_id if pad_token_id is not None else hf.get("pad_token_id")
    pad = pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 0
    return c.model_config({**fields, "pad_token_id": pad, "dropout": 0.0})


def hf_family(cfg: ModelConfig) -> str:
    """Which Hugging Face family ``cfg`` is exactly (``gpt2``, ``llama``, ``qwen2``, ``mistral``, ``qwen3``)."""
    return family_of_config(cfg).name


def config_to_hf(cfg: ModelConfig, tokenizer: HFTokenizer | None = None, dtype: torch.dtype = torch.float32, *, task: str = "lm") -> dict[str, Any]:
    """The ``config.json`` mapping transformers builds the same model from."""
    fam = family_of_config(cfg)
    ids = {}
    if tokenizer is not None and isinstance(tokenizer, HFTokenizer):
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    common = {
        "architectures": [fam.architectures[task]], "model_type": fam.model_types[0], "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "dtype": str(dtype).removeprefix("torch."),
    }  # fmt: skip
    if task == "classifier" and cfg.n_classes:
        labels = {str(i): f"LABEL_{i}" for i in range(cfg.n_classes)}
        common.update(id2label=labels, label2id={v: int(k) for k, v in labels.items()}, classifier_dropout=None)
    return {**common, **fam.config_out(cfg), **ids}


# --------------------------------------------------------------------------- weights


def _match(name: str, table: dict[str, Any]) -> tuple[str, Any, str] | None:
    """``(module, value, rest)`` for the longest module of ``table`` that ``name`` is or starts with."""
    for module in sorted(table, key=len, reverse=True):
        if name == module or name.startswith(module + "."):
            return module, table[module], name[len(module) :]
    return None


def _reverse(table: dict[str, str | tuple[str, ...]]) -> dict[str, tuple[str, int, int]]:
    """ours -> ``(HF module, index in the fused module, number fused)``."""
    out = {}
    for theirs, ours in table.items():
        parts = ours if isinstance(ours, tuple) else (ours,)
        for j, o in enumerate(parts):
            out[o] = (theirs, j, len(parts))
    return out


def _fused_sizes(parts: tuple[str, ...], cfg: ModelConfig) -> list[int]:
    """Output rows of each projection stacked in a fused q/k/v module."""
    return [(cfg.n_heads if p.endswith("q_proj") else cfg.kv_heads) * cfg.head_dim for p in parts]


def _drop_aliases(tensors: dict[str, Tensor], fam: Family) -> dict[str, Tensor]:
    """Tied copies (e.g. BERT's ``cls.predictions.decoder.bias``) checked equal to their source and dropped."""
    out = dict(tensors)
    for alias, source in fam.aliases.items():
        if alias not in out:
            continue
        t = out.pop(alias)
        if source not in out:
            out[source] = t
        elif not torch.equal(t, out[source]):
            raise UserError(f"{alias} should be tied to {source} but differs from it")
    return out


def state_dict_from_hf(tensors: dict[str, Tensor], cfg: ModelConfig, family: str, task: str = "lm") -> dict[str, Tensor]:
    """Rename (and transpose / split where the family says so) a HF state dict into our names."""
    fam = FAMILIES[family]
    heads = fam.heads.get(task, {})
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, t in _drop_aliases(tensors, fam).items():
        if key.endswith(fam.skip):
            continue
        if (head := _match(key, heads)) is not None:
            out[head[1] + head[2]] = t
            continue
        k = key[len(fam.prefix) :] if key.startswith(fam.prefix) else key
        if k.startswith(fam.layers + "."):
            i, rest = k[len(fam.layers) + 1 :].split(".", 1)
            found = _match(rest, fam.layer)
            if found is None:
                unknown.append(key)
                continue
            module, ours, kind = found
            if module in fam.conv1d and kind == ".weight":
                t = t.t()
            parts = ours if isinstance(ours, tuple) else (ours,)
            pieces = t.split(_fused_sizes(parts, cfg), dim=0) if len(parts) > 1 else (t,)
            for name, piece in zip(parts, pieces):
                out[f"blocks.{i}.{name}{kind}"] = piece.contiguous()
        elif (found := _match(k, fam.trunk)) is not None:
            out[found[1] + found[2]] = t
        else:
            unknown.append(key)
    if unknown:
        raise UserError(f"{len(unknown)} tensors have no place in a {family} model: {sorted(unknown)[:5]}")
    for tied in _TIED:
        if cfg.tie_embeddings and tied in out:
            if not torch.equal(out[tied], out["tok_emb.weight"]):
                raise UserError(f"tie_word_embeddings is true but {tied} differs from the token embedding")
            del out[tied]
    return out


def _with_zero_biases(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A zero bias for every block and final-norm weight that has none (GPT-2 has them everywhere)."""
    out = dict(state)
    for key, t in state.items():
        bias = key[: -len("weight")] + "bias"
        if key.endswith(".weight") and key.startswith(("blocks.", "norm_f.")) and bias not in state:
            out[bias] = torch.zeros(t.shape[0], dtype=t.dtype)
    return out


def state_dict_to_hf(state: dict[str, Tensor], cfg: ModelConfig, family: str, task: str = "lm") -> dict[str, Tensor]:
    """Our state dict (merged; tied aliases dropped or not) -> the HF architecture's names."""
    fam = FAMILIES[family]
    prefix = "" if task in fam.unprefixed else fam.prefix
    state = _with_zero_biases(state) if fam.zero_biases else state
    layer, trunk, heads = _reverse(fam.layer), _reverse(fam.trunk), _reverse(fam.heads.get(task, {}))
    out: dict[str, Tensor] = {}
    fused: dict[str, tuple[str, list[Tensor | None]]] = {}
    for key, t in state.items():
        if cfg.tie_embeddings and key in _TIED:
            continue
        if key.startswith("blocks."):
            i, rest = key[len("blocks.") :].split(".", 1)
            found = _match(rest, layer)
            if found is None:
                raise UserError(f"{key} has no place in a {family} model")
            _, (module, j, n), kind = found
            name = f"{prefix}{fam.layers}.{i}.{module}{kind}"
            if n > 1:
                fused.setdefault(name, (module, [None] * n))[1][j] = t
            else:
                out[name] = t.t() if module in fam.conv1d and kind == ".weight" else t
        elif (found := _match(key, heads)) is not None:
            out[found[1][0] + found[2]] = t
        elif (found := _match(key, trunk)) is not None:
            out[prefix + found[1][0] + found[2]] = t
        else:
            raise UserError(f"{key} has no place in a {family} model")
    for name, (module, parts) in fused.items():
        if any(p is None for p in parts):
            raise UserError(f"{name} is fused from {len(parts)} projections but only some are in the model")
        t = torch.cat(parts, dim=0)  # type: ignore[arg-type]
        out[name] = t.t() if module in fam.conv1d and name.endswith(".weight") else t
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


# --------------------------------------------------------------------------- import


def import_hf(src: str | Path, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, HFTokenizer | None, dict[str, Any]]:
    """``(model, tokenizer, hf_config)`` from a HF directory, ``pkg:`` path or hub id; the model is in eval mode.

    A decoder family gives a :class:`DecoderLM`; an encoder family an :class:`Encoder` (``*Model``),
    a :class:`MaskedLM` (MLM head in the file) or a :class:`SequenceClassifier` (classifier head).
    ``dtype`` None keeps the file's (one floating dtype) or float32 (mixed). Raises
    :class:`UserError` for an unsupported architecture, pickled weights, NaN/Inf weights, a
    tokenizer larger than the embedding, or tensors that do not fit the config.
    """
    d = resolve_source(src)
    hf = _read_json(d / "config.json")
    where = str(d / "config.json")
    fam = _family(hf, where)
    encoder = "lm" not in fam.architectures
    tokenizer = _read_tokenizer(d, hf, template=encoder)
    cfg = config_from_hf(hf, where=where, pad_token_id=None if encoder or tokenizer is None else tokenizer.pad_id)
    if encoder and tokenizer is not None and tokenizer.pad_id != cfg.pad_token_id:
        raise UserError(f"{d}: the tokenizer's pad token is id {tokenizer.pad_id} but config.json's pad_token_id is {cfg.pad_token_id}")
    raw = _read_weights(d)
    task = _task_of_tensors(raw, fam)
    tensors = state_dict_from_hf(raw, cfg, fam.name, task)
    cfg = _head_config(cfg, tensors, fam, task, d)
    return _assemble(TASKS[task], cfg, tensors, d, fam, dtype), tokenizer, hf


def _task_of_tensors(tensors: dict[str, Tensor], fam: Family) -> str:
    """``lm`` for a decoder family; for an encoder the head its tensors hold: classifier, mlm or none."""
    if "lm" in fam.architectures:
        return "lm"
    for task in ("classifier", "mlm"):
        if any(_match(k, fam.heads[task]) for k in tensors):
            return task
    return "encoder"


def _head_config(cfg: ModelConfig, tensors: dict[str, Tensor], fam: Family, task: str, d: Path) -> ModelConfig:
    """An encoder's pooler (when the file has one), classes (classifier) and pooling (a
    sentence-transformers directory's own), from the renamed ``tensors``."""
    if task == "lm":
        return cfg
    updates: dict[str, Any] = {"pooler": fam.pooler if "pooler.weight" in tensors else "none"}
    if task == "classifier":
        updates["n_classes"] = tensors["head.weight"].shape[0]
    if task == "encoder":
        updates["pooling"] = _sentence_pooling(d) or cfg.pooling
    return HFConfig({}, str(d / "config.json")).model_config({**cfg.model_dump(), **updates})


def _sentence_pooling(d: Path) -> str | None:
    """The pooling a sentence-transformers directory declares (``1_Pooling/config.json``), if any."""
    path = d / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    conf = _read_json(path)
    for key, pooling in (("pooling_mode_mean_tokens", "mean"), ("pooling_mode_cls_token", "first"), ("pooling_mode_max_tokens", "max")):
        if conf.get(key) is True:
            return pooling
    return None


def _assemble(build: type[nn.Module], cfg: ModelConfig, tensors: dict[str, Tensor], d: Path, fam: Family, dtype: torch.dtype | None) -> nn.Module:
    """``build(cfg)`` holding ``tensors`` (checked against its state dict first; no random init)."""
    with torch.device("meta"):  # shapes only: no random init, no float32 copy of a large model
        model = build(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k in _TIED)}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{d}: weights do not fit the {fam.name} config: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise UserError(f"{d}: tensor for {k!r} has shape {tuple(tensors[k].shape)}, the config expects {tuple(ref.shape)}")
    if dtype is None:
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    return assign_weights(model, {k: v.to(dtype) for k, v in tensors.items()}, lambda: build(cfg))


def convert_from_hf(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Import ``src`` (directory, ``pkg:`` path or hub id) and save it as a selfattn checkpoint at ``dst``.

    Everything is read and checked before anything is written; ``dst`` loads with
    :func:`selfattn.load_pretrained`.
    """
    model, tokenizer, hf = import_hf(src, dtype=dtype)
    source = {"hf_source": str(src), "hf_model_type": hf.get("model_type"), "hf_architectures": hf.get("architectures")}
    return save_pretrained(model, dst, tokenizer=tokenizer, extra={"imported": source})


# --------------------------------------------------------------------------- export


def _prepare_out(dst: Path) -> Path:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UserError(f"refusing to write into {dst}: it exists and is not empty")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _finish_out(tmp: Path, dst: Path) -> None:
    if dst.exists():
        dst.rmdir()  # empty, checked in _prepare_out
    os.replace(tmp, dst)


def _write_out(dst: str | Path, write: Any) -> Path:
    """Call ``write(tmp)`` on a hidden sibling of ``dst`` that then becomes ``dst`` (removed on an error)."""
    out = Path(dst)
    tmp = _prepare_out(out)
    try:
        write(tmp)
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _export_state(model: nn.Module, unmerged: bool) -> dict[str, Tensor]:
    if not unmerged:
        return merged_state_dict(model)
    for m in lora_modules(model):
        if m.merged:
            raise UserError("unmerge the LoRA adapters (unmerge_lora) before exporting the base for PEFT")
    return {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}


def _export_task(model: nn.Module, fam: Family) -> str:
    """The HF class ``model`` exports as; a UserError when that family has none or the head differs."""
    try:
        task = task_of(model)
    except ValueError as exc:
        raise UserError(f"cannot export to Hugging Face: {exc}") from None
    if task not in fam.architectures:
        kinds = ", ".join(f"{t} -> {a}" for t, a in fam.architectures.items())
        raise UserError(f"a {task} of the {fam.name} family has no Hugging Face class here ({kinds})")
    cfg = model.cfg
    if task == "classifier" and (cfg.pooling != "first" or cfg.pooler == "none"):
        raise UserError(
            f"{fam.architectures[task]} classifies the first token through its pooler; this classifier uses "
            f"pooling={cfg.pooling!r}, pooler={cfg.pooler!r}. Fine-tune with head.pooling=first from an encoder with a "
            "pooler to export it, or export the encoder alone"
        )
    if task == "encoder" and cfg.pooler != "none" and "pooler" not in fam.trunk.values():
        raise UserError(f"{fam.architectures[task]} has no pooler; this encoder has pooler={cfg.pooler!r}")
    return task


def export_hf(model: nn.Module, dst: str | Path, tokenizer: Any = None, *, unmerged: bool = False) -> Path:
    """Write ``model`` as a HF checkpoint (``config.json``, ``model.safetensors``, tokenizer files).

    A DecoderLM loads with ``AutoModelForCausalLM``; an encoder-family Encoder / MaskedLM /
    SequenceClassifier with ``AutoModel`` / ``AutoModelForMaskedLM`` /
    ``AutoModelForSequenceClassification``. LoRA adapters are folded in, unless ``unmerged`` (the
    base weights alone, for :func:`export_peft`). An imported tokenizer is written in the HF layout;
    a selfattn BPE tokenizer as its ``tokenizer.json``.
    """
    from safetensors.torch import save_file

    cfg = model.cfg
    check_tokenizer_fits(tokenizer, cfg.vocab_size, dst)
    fam = family_of_config(cfg)
    task = _export_task(model, fam)
    state = _export_state(model, unmerged)
    hf_cfg = config_to_hf(cfg, tokenizer, dtype=state["tok_emb.weight"].dtype, task=task)
    tensors = state_dict_to_hf(state, cfg, fam.name, task)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
        if task == "lm":
            generation = {k: v for k, v in hf_cfg.items() if k.endswith("_token_id")} | {"do_sample": False}
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        if isinstance(tokenizer, HFTokenizer):
            types = ["token_type_ids"] if cfg.type_vocab_size and fam.name == "bert" else []
            tokenizer.save_hf(tmp, model_input_names=None if task == "lm" else ["input_ids", *types, "attention_mask"])
        elif tokenizer is not None and getattr(tokenizer, "kind", None) == "bpe":
            tokenizer.save(tmp)

    return _write_out(dst, write)


def convert_to_hf(src: str | Path, dst: str | Path) -> Path:
    """A selfattn checkpoint directory -> a HF directory (the class follows the model: see :func:`export_hf`)."""
    pre = load_pretrained(src)
    return export_hf(pre.model, dst, pre.tokenizer)


# --------------------------------------------------------------------------- PEFT


def _peft_module(ours: str, fam: Family, cfg: ModelConfig) -> tuple[str, str, int, list[int]]:
    """``blocks.3.attn.q_proj`` -> ``(model.layers.3.self_attn.q_proj, self_attn.q_proj, index in a fused
    module, output rows of each fused part)``."""
    if not ours.startswith("blocks."):
        raise UserError(f"LoRA on {ours!r} cannot be exported to PEFT (only the blocks' projections map)")
    i, rest = ours[len("blocks.") :].split(".", 1)
    found = _match(rest, _reverse(fam.layer))
    if found is None or found[2]:
        raise UserError(f"LoRA on {ours!r} has no {fam.name} module to go to")
    module, j, _ = found[1]
    parts = fam.layer[module]
    sizes = _fused_sizes(parts, cfg) if isinstance(parts, tuple) else [0]
    return f"{fam.prefix}{fam.layers}.{i}.{module}", module, j, sizes


def _peft_tensors(items: list[tuple[int, LoRALinear]], sizes: list[int]) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of one HF module. The adapters of a fused module (GPT-2's c_attn) are stacked: rank
    ``n * r``, ``B`` block-structured at each part's rows (the same update)."""
    if len(sizes) == 1:
        (_, m), = items
        return m.lora_A.detach(), m.lora_B.detach()
    items = sorted(items, key=lambda it: it[0])
    r = items[0][1].rank
    A = torch.cat([m.lora_A.detach() for _, m in items], dim=0)  # [n r, D]
    B = torch.zeros(sum(sizes), r * len(items), dtype=A.dtype)  # [out, n r]
    for k, (j, m) in enumerate(items):
        row = sum(sizes[:j])
        B[row : row + sizes[j], k * r : (k + 1) * r] = m.lora_B.detach()
    return A, B


def export_peft(model: DecoderLM, dst: str | Path, *, base_model_name_or_path: str = "") -> Path:
    """Write ``model``'s LoRA adapters in the PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``).

    Load them with ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dst)``
    where ``base`` is ``export_hf(model, base, unmerged=True)``. GPT-2's fused ``c_attn`` takes
    the q/k/v adapters stacked: rank ``n * r`` with a block-structured ``B`` (same update).
    """
    from safetensors.torch import save_file

    if not isinstance(model, DecoderLM):
        raise UserError(f"export_peft writes a causal LM's adapters (AutoModelForCausalLM); got a {type(model).__name__}: merge them and export_hf it instead")
    mods = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not mods:
        raise UserError("the model has no LoRA adapters to export")
    fam = family_of_config(model.cfg)
    first = next(iter(mods.values()))
    if any(m.rank != first.rank or m.alpha != first.alpha for m in mods.values()):
        raise UserError("export_peft needs one rank and alpha for every adapter")
    grouped: dict[str, list[tuple[int, LoRALinear]]] = {}
    sizes: dict[str, list[int]] = {}
    targets: set[str] = set()
    for name, m in mods.items():
        theirs, module, j, sizes[theirs] = _peft_module(name, fam, model.cfg)
        grouped.setdefault(theirs, []).append((j, m))
        targets.add(module)
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for theirs, items in grouped.items():
        A, B = _peft_tensors(items, sizes[theirs])
        tensors[f"base_model.model.{theirs}.lora_A.weight"] = A.cpu().contiguous().clone()
        tensors[f"base_model.model.{theirs}.lora_B.weight"] = B.cpu().contiguous().clone()
        if len(items) > 1:  # same scaling alpha / r at the stacked rank
            rank_pattern[theirs] = first.rank * len(items)
            alpha_pattern[theirs] = first.alpha * len(items)
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0,
        "bias": "none", "target_modules": sorted(targets), "fan_in_fan_out": bool(fam.conv1d), "inference_mode": True,
        "init_lora_weights": True, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": None,
    }  # fmt: skip

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")

    return _write_out(dst, write)


# --------------------------------------------------------------------------- embedding tables


def load_embedding_table(weights: str | Path, tokenizer_json: str | Path, *, key: str | None = None, bos_token_id: int | None = None, eos_token_id: int | None = None) -> tuple[Tensor, HFTokenizer]:
    """A pretrained token-embedding table ``[V, D]`` (safetensors) and its ``tokenizer.json``.

    For tables shipped without a model (e.g. wordllama's, derived from Llama-2's embeddings).
    ``key`` names the tensor when the file holds several.
    """
    import tempfile

    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    if key is None:
        if len(tensors) != 1:
            raise UserError(f"{weights} holds {len(tensors)} tensors ({sorted(tensors)[:5]}); pass key=")
        key = next(iter(tensors))
    if key not in tensors or tensors[key].dim() != 2:
        raise UserError(f"{weights}: no 2-D tensor {key!r} (found {sorted(tensors)[:5]})")
    with tempfile.TemporaryDirectory() as d:  # the import path reads <dir>/tokenizer.json
        shutil.copyfile(tokenizer_json, Path(d) / BPE_FILE)
        tok = HFTokenizer.from_pretrained_dir(d, {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id})
    table = tensors[key].float()
    if tok.vocab_size > table.shape[0]:
        raise UserError(f"{tokenizer_json}: the tokenizer has {tok.vocab_size} tokens but the table only {table.shape[0]} rows")
    return table, tok


@torch.no_grad()
def init_embeddings(model: nn.Module, table: Tensor, *, std: float | None = 0.02) -> nn.Module:
    """Copy ``table [V', D]`` into ``model.tok_emb`` (rows ``0..V'-1``), rescaled to ``std`` (None = as is).

    A table's scale rarely matches a fresh trunk's (N(0, 0.02) init): wordllama's rows have
    std ~0.1 after its own projection, so raw copies swamp the residual stream.
    """
    emb = model.tok_emb.weight  # [V, D]
    if table.dim() != 2 or table.shape[1] != emb.shape[1] or table.shape[0] > emb.shape[0]:
        raise ValueError(f"embedding table {tuple(table.shape)} does not fit tok_emb {tuple(emb.shape)} (same D, at most V rows)")
    t = table.to(emb.dtype)
    if std is not None:
        t = (t - t.mean()) / t.std().clamp(min=1e-12) * std
    emb[: t.shape[0]].copy_(t.to(emb.device))
    return model
