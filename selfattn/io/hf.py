"""Hugging Face checkpoints in and out: GPT-2 and Llama-family (Llama, Mistral, Qwen2, Qwen3) decoders.

``import_hf(src)`` reads a Hugging Face model directory (``config.json``, ``model.safetensors`` or a
sharded ``model.safetensors.index.json``, ``tokenizer.json``) and returns a :class:`DecoderLM`
with the same logits, plus the tokenizer as a :class:`~selfattn.data.tokenization.HFTokenizer`.
``export_hf(model, tokenizer, dst)`` writes the reverse (``transformers.AutoModelForCausalLM``
loads it), and ``export_peft(model, dst)`` writes a LoRA-adapted model's adapters in the PEFT
layout (``adapter_config.json`` + ``adapter_model.safetensors``) next to an exported base.

Only JSON and safetensors are read (never pickle). ``transformers`` is not needed at run time:
the configs are plain JSON and the renaming is below. What maps onto the trunk:

=================  ==========================================================================
GPT-2              learned positions, LayerNorm (eps ``layer_norm_epsilon``), tanh GELU
                   (``gelu_new``), biases everywhere, fused ``c_attn`` (Conv1D: weights
                   stored ``[in, out]``, transposed here), tied or untied head
Llama / Mistral    RoPE (``rope_theta``; rope types default, ``linear``, ``llama3`` (Llama
/ Qwen2 / Qwen3    3.1-3.3) and ``yarn``), RMSNorm (``rms_norm_eps``), SwiGLU, GQA, a ``head_dim``
                   apart from ``hidden_size / heads`` (``head_size``), tied or untied head;
                   Qwen2's q/k/v biases (``qkv_bias``); Qwen3's per-head q/k RMSNorm
                   (``qk_norm``); Mistral's ``sliding_window`` (every layer)
=================  ==========================================================================

Encoders (BERT, DistilBERT, RoBERTa) are refused: they are post-norm with token-type embeddings
and an embedding LayerNorm, which the pre-norm trunk does not express (docs/pretrained.md).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor, nn

from selfattn.config import ModelConfig, RopeScaling
from selfattn.data.tokenization import BPE_FILE, HFTokenizer
from selfattn.errors import UserError
from selfattn.io.checkpoint import assign_weights, load_pretrained, save_pretrained
from selfattn.io.sources import resolve_source
from selfattn.nn.lora import LoRALinear, lora_modules, merged_state_dict
from selfattn.nn.models import DecoderLM

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

# model_type -> the architecture name transformers writes in config.json
SUPPORTED: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
_SUPPORTED_TEXT = ", ".join(f"{arch} ({mt})" for mt, arch in SUPPORTED.items())
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.bin", "tf_model.h5", "flax_model.msgpack")


# --------------------------------------------------------------------------- sources




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


def _read_weights(d: Path) -> dict[str, Tensor]:
    """Every tensor of ``model.safetensors`` or of the shards an index names; pickles are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if (d / _WEIGHTS).is_file():
        files = [d / _WEIGHTS]
    elif (d / _INDEX).is_file():
        index = _read_json(d / _INDEX)
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise UserError(f"{d / _INDEX} has an empty weight_map")
        files = [d / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UserError(f"{d / _INDEX} names shards that are missing: {missing}")
    else:
        pickled = [n for n in _PICKLED if (d / n).exists()] + sorted(p.name for p in d.glob("pytorch_model-*.bin"))
        if pickled:
            raise UserError(
                f"{d} holds only pickled weights ({', '.join(pickled)}); selfattn never unpickles. Convert them to "
                f"safetensors once, on a machine with transformers: python -c \"from transformers import "
                f"AutoModelForCausalLM as M; M.from_pretrained('{d}').save_pretrained('{d}-safetensors')\" "
                "(or run the hub's safetensors convert space), then import that directory"
            )
        raise UserError(
            f"{d} has no weights: expected {_WEIGHTS} or {_INDEX} (a hub repo with only pickled pytorch_model.bin "
            "weights must be converted to safetensors first: AutoModelForCausalLM.from_pretrained(id).save_pretrained(dir))"
        )
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{f} is not a readable safetensors file: {exc}") from None
    return tensors


# --------------------------------------------------------------------------- configs


def _model_type(hf: dict[str, Any], where: str) -> str:
    mt = hf.get("model_type")
    arch = (hf.get("architectures") or [None])[0]
    if mt in SUPPORTED:
        return mt
    named = f"{arch} (model_type {mt!r})" if arch else f"model_type {mt!r}"
    why = ""
    if mt in ("bert", "distilbert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2"):
        why = " Encoders are post-norm with token-type embeddings, which the pre-norm trunk does not express (see docs/pretrained.md)."
    raise UserError(f"{where}: architecture {named} is not supported; supported: {_SUPPORTED_TEXT}.{why}")


_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope(hf: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from transformers 5's ``rope_parameters`` or the older ``rope_scaling``
    + ``rope_theta``; a UserError names a rope type the trunk does not compute (dynamic, longrope, ...)."""
    fields = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = fields.get("rope_type") or fields.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise UserError(f"{where}: rope type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    if float(fields.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor {fields.get('partial_rotary_factor', hf.get('partial_rotary_factor'))} is not supported (rotary on every head dimension only)")
    theta = float(fields.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope_type == "default":
        return theta, None
    try:
        if rope_type == "linear":
            return theta, RopeScaling(kind="linear", factor=fields["factor"])
        if rope_type == "yarn":
            return theta, _yarn_scaling(fields, hf)
        return theta, RopeScaling(
            kind="llama3", factor=fields["factor"], low_freq_factor=fields["low_freq_factor"],
            high_freq_factor=fields["high_freq_factor"], original_context_length=fields["original_max_position_embeddings"],
        )  # fmt: skip
    except KeyError as exc:
        raise UserError(f"{where}: rope type {rope_type!r} lacks {exc.args[0]!r}") from None
    except ValidationError as exc:
        raise UserError(f"{where}: rope type {rope_type!r}: {exc.errors()[0]['msg']}") from None


def _yarn_scaling(fields: dict[str, Any], hf: dict[str, Any]) -> RopeScaling:
    """transformers' YaRN parameters, with the attention factor resolved as it resolves it (from
    ``mscale`` / ``mscale_all_dim`` when given; a missing ``factor`` is the context ratio)."""
    import math

    old = fields["original_max_position_embeddings"]
    factor = fields.get("factor") or hf["max_position_embeddings"] / old

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = fields.get("attention_factor")
    if attention is None and fields.get("mscale") and fields.get("mscale_all_dim"):
        attention = mscale(fields["mscale"]) / mscale(fields["mscale_all_dim"])
    return RopeScaling(
        kind="yarn", factor=factor, original_context_length=old, attention_factor=attention,
        beta_fast=fields.get("beta_fast"), beta_slow=fields.get("beta_slow"), truncate=fields.get("truncate"),
    )  # fmt: skip


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``rope_parameters`` (transformers 5) and the older ``rope_scaling`` + ``rope_theta`` keys."""
    sc = cfg.rope_scaling
    extra: dict[str, Any] = {}
    if sc is not None:
        extra = {"factor": sc.factor}
        if sc.kind == "llama3":
            extra.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
                         original_max_position_embeddings=sc.original_context_length)  # fmt: skip
        if sc.kind == "yarn":
            extra["original_max_position_embeddings"] = sc.original_context_length
            given = {"attention_factor": sc.attention_factor, "beta_fast": sc.beta_fast, "beta_slow": sc.beta_slow, "truncate": sc.truncate}
            extra.update({k: v for k, v in given.items() if v is not None})
    kind = "default" if sc is None else sc.kind
    return {
        "rope_parameters": {"rope_type": kind, "rope_theta": cfg.rope_base, **extra},
        "rope_theta": cfg.rope_base,
        "rope_scaling": {"rope_type": kind, **extra} if sc is not None else None,
    }


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json", pad_token_id: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` mapping (a UserError if it does not fit)."""
    mt = _model_type(hf, where)
    pad = pad_token_id if pad_token_id is not None else hf.get("pad_token_id")
    pad = pad if isinstance(pad, int) and pad >= 0 else 0
    try:
        if mt == "gpt2":
            act = hf.get("activation_function", "gelu_new")
            approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
            if approx is None:
                raise UserError(f"{where}: activation_function {act!r} is not supported (gelu_new, gelu_pytorch_tanh or gelu)")
            if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("scale_attn_weights") is False or hf.get("add_cross_attention"):
                raise UserError(f"{where}: GPT-2 variants with scale_attn_by_inverse_layer_idx, unscaled attention or cross-attention are not supported")
            return ModelConfig(
                vocab_size=hf["vocab_size"], context_length=hf.get("n_positions", 1024), n_layers=hf["n_layer"],
                d_model=hf["n_embd"], n_heads=hf["n_head"], d_ff=hf.get("n_inner"), bias=True, position="learned",
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", gelu_approximate=approx,
                tie_embeddings=hf.get("tie_word_embeddings", True), pad_token_id=pad, dropout=0.0,
            )
        d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or d_model // n_heads
        head_size = None if head_dim * n_heads == d_model else head_dim  # Qwen3, Mistral Nemo: heads wider or narrower
        if hf.get("hidden_act", "silu") != "silu":
            raise UserError(f"{where}: hidden_act {hf.get('hidden_act')!r} is not supported (silu = SwiGLU)")
        bias, qkv_bias = False, None
        if mt == "qwen2":
            qkv_bias = True  # Qwen2 always has q/k/v biases, none on o_proj or the MLP
        elif mt == "qwen3" and hf.get("attention_bias"):
            raise UserError(f"{where}: a Qwen3 config with attention_bias (on o_proj but not the MLP) is not supported")
        elif mt == "llama":
            att, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
            if att != mlp:
                raise UserError(f"{where}: attention_bias ({att}) != mlp_bias ({mlp}) is not supported")
            bias = att
        window = None
        if mt == "mistral" and hf.get("sliding_window"):
            window = int(hf["sliding_window"])
        if mt in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
            kinds = set(hf.get("layer_types") or [])
            if kinds == {"sliding_attention"}:
                window = int(hf["sliding_window"])
            elif "sliding_attention" in kinds:
                raise UserError(f"{where}: sliding windows on some layers only (layer_types {sorted(kinds)}) are not supported")
        rope_base, rope_scaling = _rope(hf, where)
        return ModelConfig(
            vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048), n_layers=hf["num_hidden_layers"],
            d_model=d_model, n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_size=head_size, qk_norm=mt == "qwen3",
            d_ff=hf["intermediate_size"], bias=bias, qkv_bias=qkv_bias, position="rope", rope_base=rope_base, rope_scaling=rope_scaling,
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
            attention="sliding_window" if window else "full", window=window,
            tie_embeddings=hf.get("tie_word_embeddings", False), pad_token_id=pad, dropout=0.0,
        )
    except KeyError as exc:
        raise UserError(f"{where}: the {mt} config lacks {exc.args[0]!r}") from None
    except ValidationError as exc:
        raise UserError(f"{where}: the {mt} config does not make a valid model: {exc.errors()[0]['msg']}") from None


def hf_family(cfg: ModelConfig) -> str:
    """Which Hugging Face architecture ``cfg`` is exactly (``gpt2``, ``llama``, ``qwen2``, ``mistral``, ``qwen3``)."""
    misfits: dict[str, list[str]] = {}

    def need(family: str, ok: bool, what: str) -> None:
        if not ok:
            misfits.setdefault(family, []).append(what)

    qkv = cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias
    need("gpt2", cfg.position == "learned", f"position={cfg.position!r} (needs 'learned')")
    need("gpt2", cfg.norm == "layernorm", f"norm={cfg.norm!r} (needs 'layernorm')")
    need("gpt2", cfg.mlp == "gelu", f"mlp={cfg.mlp!r} (needs 'gelu')")
    need("gpt2", cfg.kv_heads == cfg.n_heads, f"n_kv_heads={cfg.kv_heads} (needs n_heads)")
    need("gpt2", cfg.attention == "full", f"attention={cfg.attention!r} (needs 'full')")
    need("gpt2", qkv == cfg.bias, "qkv_bias differs from bias")
    need("gpt2", cfg.head_dim * cfg.n_heads == cfg.d_model, f"head_size={cfg.head_size} (needs d_model / n_heads)")
    need("gpt2", not cfg.qk_norm, "qk_norm=True (needs False)")
    if "gpt2" not in misfits:
        return "gpt2"
    for fam in _LLAMA_LIKE:
        need(fam, cfg.position == "rope", f"position={cfg.position!r} (needs 'rope')")
        need(fam, cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (needs 'rmsnorm')")
        need(fam, cfg.mlp == "swiglu", f"mlp={cfg.mlp!r} (needs 'swiglu')")
        need(fam, cfg.qk_norm == (fam == "qwen3"), f"qk_norm={cfg.qk_norm} (needs {fam == 'qwen3'})")
    need("llama", cfg.attention == "full", f"attention={cfg.attention!r} (needs 'full')")
    need("llama", qkv == cfg.bias, "qkv_bias differs from bias")
    need("qwen2", cfg.attention == "full" and qkv and not cfg.bias, "needs qkv_bias=True, bias=False, attention='full'")
    need("mistral", cfg.attention == "sliding_window" and not cfg.bias and not qkv, "needs attention='sliding_window' and no biases")
    need("qwen3", cfg.attention == "full" and not cfg.bias and not qkv, "needs attention='full' and no biases")
    for fam in ("llama", "qwen2", "mistral", "qwen3"):
        if fam not in misfits:
            return fam
    detail = "; ".join(f"{fam}: {', '.join(m)}" for fam, m in misfits.items() if fam in ("gpt2", "llama", "qwen3"))
    raise UserError(f"this model matches no Hugging Face architecture ({_SUPPORTED_TEXT}): {detail}")


def config_to_hf(cfg: ModelConfig, tokenizer: HFTokenizer | None = None, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` mapping transformers builds the same model from."""
    fam = hf_family(cfg)
    ids = {}
    if tokenizer is not None and isinstance(tokenizer, HFTokenizer):
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    common = {
        "architectures": [SUPPORTED[fam]], "model_type": fam, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "dtype": str(dtype).removeprefix("torch."), **ids,
    }
    if fam == "gpt2":
        return {
            **common, "n_positions": cfg.context_length, "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff, "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
            "layer_norm_epsilon": 1e-5 if cfg.norm_eps is None else cfg.norm_eps,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        }
    out = {
        **common, "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": 1e-6 if cfg.norm_eps is None else cfg.norm_eps,
        **_rope_to_hf(cfg),
        "attention_dropout": cfg.dropout,
    }
    if fam == "llama":
        out.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    elif fam == "mistral":
        out.update(sliding_window=cfg.window)
    else:  # qwen2, qwen3
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
        if fam == "qwen3":
            out.update(attention_bias=False)
    return out


# --------------------------------------------------------------------------- weights

_LLAMA_NAMES = {  # HF suffix inside model.layers.{i}. -> ours inside blocks.{i}.
    "input_layernorm.weight": "norm1.weight",
    "post_attention_layernorm.weight": "norm2.weight",
    "self_attn.o_proj": "attn.out_proj",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.q_norm.weight": "attn.q_norm.weight",  # Qwen3
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_GPT2_LINEAR = {"attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}  # Conv1D [in, out]


def state_dict_from_hf(tensors: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """Rename (and for GPT-2 transpose / split) a HF state dict into DecoderLM names."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    D = cfg.d_model
    if family == "gpt2":
        for key, t in tensors.items():
            k = key.removeprefix("transformer.")
            if k.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
                continue
            if k == "wte.weight":
                out["tok_emb.weight"] = t
            elif k == "wpe.weight":
                out["pos_emb.embedding.weight"] = t
            elif k.startswith("ln_f."):
                out["norm_f." + k[5:]] = t
            elif k == "lm_head.weight":
                out["lm_head.weight"] = t
            elif k.startswith("h."):
                i, rest = k[2:].split(".", 1)
                pre = f"blocks.{i}."
                if rest.startswith(("ln_1.", "ln_2.")):
                    out[pre + ("norm1." if rest[3] == "1" else "norm2.") + rest[5:]] = t
                elif rest.startswith("attn.c_attn."):
                    kind = rest.rsplit(".", 1)[1]
                    parts = (t.t() if kind == "weight" else t).split(D, dim=0)  # [3D, D] / [3D] -> q, k, v
                    for name, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                        out[f"{pre}attn.{name}.{kind}"] = part.contiguous()
                elif rest.rsplit(".", 1)[0] in _GPT2_LINEAR:
                    mod, kind = rest.rsplit(".", 1)
                    out[f"{pre}{_GPT2_LINEAR[mod]}.{kind}"] = t.t().contiguous() if kind == "weight" else t
                else:
                    unknown.append(key)
            else:
                unknown.append(key)
    else:
        for key, t in tensors.items():
            if key.endswith("rotary_emb.inv_freq"):
                continue
            if key == "model.embed_tokens.weight":
                out["tok_emb.weight"] = t
            elif key == "model.norm.weight":
                out["norm_f.weight"] = t
            elif key == "lm_head.weight":
                out["lm_head.weight"] = t
            elif key.startswith("model.layers."):
                i, rest = key[len("model.layers.") :].split(".", 1)
                for hf_name, ours in _LLAMA_NAMES.items():
                    if rest == hf_name or rest.startswith(hf_name + "."):
                        out[f"blocks.{i}.{ours}{rest[len(hf_name):]}"] = t
                        break
                else:
                    unknown.append(key)
            else:
                unknown.append(key)
    if unknown:
        raise UserError(f"{len(unknown)} tensors have no place in a {family} DecoderLM: {sorted(unknown)[:5]}")
    if cfg.tie_embeddings and "lm_head.weight" in out:
        if not torch.equal(out["lm_head.weight"], out["tok_emb.weight"]):
            raise UserError("tie_word_embeddings is true but lm_head.weight differs from the token embedding")
        del out["lm_head.weight"]
    return out


def state_dict_to_hf(state: dict[str, Tensor], cfg: ModelConfig, family: str) -> dict[str, Tensor]:
    """DecoderLM state dict (merged, untied aliases dropped or not) -> the HF architecture's names."""
    out: dict[str, Tensor] = {}
    for i in range(cfg.n_layers):
        pre = f"blocks.{i}."
        if family == "gpt2":
            h = f"transformer.h.{i}."
            zeros = lambda n: torch.zeros(n, dtype=state[pre + "attn.q_proj.weight"].dtype)  # noqa: E731
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[h + theirs + ".weight"] = state[pre + ours + ".weight"]
                out[h + theirs + ".bias"] = state.get(pre + ours + ".bias", zeros(cfg.d_model))
            qkv = [state[f"{pre}attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]
            out[h + "attn.c_attn.weight"] = torch.cat(qkv, dim=0).t().contiguous()  # Conv1D [D, 3D]
            out[h + "attn.c_attn.bias"] = torch.cat(
                [state.get(f"{pre}attn.{n}.bias", zeros(cfg.d_model)) for n in ("q_proj", "k_proj", "v_proj")]
            )
            for theirs, ours in _GPT2_LINEAR.items():
                w = state[f"{pre}{ours}.weight"]
                out[f"{h}{theirs}.weight"] = w.t().contiguous()
                out[f"{h}{theirs}.bias"] = state.get(f"{pre}{ours}.bias", zeros(w.shape[0]))
        else:
            h = f"model.layers.{i}."
            for theirs, ours in _LLAMA_NAMES.items():
                for k in [k for k in state if k.startswith(pre + ours + ".") or k == pre + ours]:
                    out[h + theirs + k[len(pre + ours) :]] = state[k]
    if family == "gpt2":
        out["transformer.wte.weight"] = state["tok_emb.weight"]
        out["transformer.wpe.weight"] = state["pos_emb.embedding.weight"]
        out["transformer.ln_f.weight"] = state["norm_f.weight"]
        out["transformer.ln_f.bias"] = state.get("norm_f.bias", torch.zeros(cfg.d_model, dtype=state["norm_f.weight"].dtype))
    else:
        out["model.embed_tokens.weight"] = state["tok_emb.weight"]
        out["model.norm.weight"] = state["norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


# --------------------------------------------------------------------------- import


def import_hf(src: str | Path, *, dtype: torch.dtype | None = None) -> tuple[DecoderLM, HFTokenizer | None, dict[str, Any]]:
    """``(model, tokenizer, hf_config)`` from a HF directory or hub id; the model is in eval mode.

    ``dtype`` None keeps the file's (one floating dtype) or float32 (mixed). Raises
    :class:`UserError` for an unsupported architecture, pickled weights, a tokenizer larger than
    the embedding, or tensors that do not fit the config.
    """
    d = resolve_source(src)
    hf = _read_json(d / "config.json")
    family = _model_type(hf, str(d / "config.json"))
    tokenizer = HFTokenizer.from_pretrained_dir(d, hf) if (d / BPE_FILE).is_file() else None
    n_rows = hf.get("vocab_size")
    if tokenizer is not None and isinstance(n_rows, int) and tokenizer.vocab_size > n_rows:
        raise UserError(
            f"{d / BPE_FILE}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {n_rows} rows "
            "(vocab_size in config.json); ids past the table would crash - use the tokenizer the model was trained with"
        )
    cfg = config_from_hf(hf, where=str(d / "config.json"), pad_token_id=tokenizer.pad_id if tokenizer else None)
    tensors = state_dict_from_hf(_read_weights(d), cfg, family)
    with torch.device("meta"):  # shapes only: no random init, no float32 copy of a large model
        model = DecoderLM(cfg)
    expected = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise UserError(f"{d}: weights do not fit the {family} config: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise UserError(f"{d}: tensor for {k!r} has shape {tuple(tensors[k].shape)}, the config expects {tuple(ref.shape)}")
    if dtype is None:
        dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    model = assign_weights(model, {k: v.to(dtype) for k, v in tensors.items()}, lambda: DecoderLM(cfg))
    return model, tokenizer, hf


def convert_from_hf(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Import ``src`` (directory or hub id) and save it as a selfattn checkpoint at ``dst``.

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


def export_hf(model: DecoderLM, dst: str | Path, tokenizer: Any = None, *, unmerged: bool = False) -> Path:
    """Write ``model`` as a HF checkpoint (``config.json``, ``model.safetensors``, tokenizer files).

    LoRA adapters are folded in, unless ``unmerged`` (the base weights alone, for
    :func:`export_peft`). An imported tokenizer is written in the HF layout; a selfattn BPE
    tokenizer as its ``tokenizer.json``.
    """
    from safetensors.torch import save_file

    if not isinstance(model, DecoderLM):
        raise UserError(f"only a DecoderLM exports to Hugging Face (AutoModelForCausalLM), got {type(model).__name__}")
    cfg = model.cfg
    family = hf_family(cfg)
    if unmerged:
        state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
        for m in lora_modules(model):
            if m.merged:
                raise UserError("unmerge the LoRA adapters (unmerge_lora) before exporting the base for PEFT")
    else:
        state = merged_state_dict(model)
    w = state["tok_emb.weight"]
    hf_cfg = config_to_hf(cfg, tokenizer, dtype=w.dtype)
    tensors = state_dict_to_hf(state, cfg, family)
    out = Path(dst)
    tmp = _prepare_out(out)
    try:
        save_file(tensors, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n", encoding="utf-8")
        (tmp / "generation_config.json").write_text(
            json.dumps({k: v for k, v in hf_cfg.items() if k.endswith("_token_id")} | {"do_sample": False}, indent=2) + "\n",
            encoding="utf-8",
        )
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save_hf(tmp)
        elif tokenizer is not None and getattr(tokenizer, "kind", None) == "bpe":
            tokenizer.save(tmp)
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_to_hf(src: str | Path, dst: str | Path) -> Path:
    """A selfattn checkpoint directory (an LM) -> a HF directory."""
    pre = load_pretrained(src)
    if pre.task != "lm":
        raise UserError(f"{src} is a {pre.task}; only language models export to Hugging Face (AutoModelForCausalLM)")
    return export_hf(pre.model, dst, pre.tokenizer)


def _hf_module_name(ours: str, family: str) -> str:
    """``blocks.3.attn.q_proj`` -> ``model.layers.3.self_attn.q_proj`` (or GPT-2's name)."""
    if not ours.startswith("blocks."):
        raise UserError(f"LoRA on {ours!r} cannot be exported to PEFT (only the blocks' projections map)")
    i, rest = ours[len("blocks.") :].split(".", 1)
    if family == "gpt2":
        if rest in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):
            return f"transformer.h.{i}.attn.c_attn"
        theirs = {v: k for k, v in _GPT2_LINEAR.items()}.get(rest)
        if theirs is None:
            raise UserError(f"LoRA on {ours!r} has no GPT-2 module to go to")
        return f"transformer.h.{i}.{theirs}"
    theirs = {v: k for k, v in _LLAMA_NAMES.items()}.get(rest)
    if theirs is None:
        raise UserError(f"LoRA on {ours!r} has no {family} module to go to")
    return f"model.layers.{i}.{theirs}"


def export_peft(model: DecoderLM, dst: str | Path, *, base_model_name_or_path: str = "") -> Path:
    """Write ``model``'s LoRA adapters in the PEFT layout (``adapter_config.json`` + ``adapter_model.safetensors``).

    Load them with ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), dst)``
    where ``base`` is ``export_hf(model, base, unmerged=True)``. GPT-2's fused ``c_attn`` takes
    the q/k/v adapters stacked: rank ``n * r`` with a block-structured ``B`` (same update).
    """
    from safetensors.torch import save_file

    mods = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    if not mods:
        raise UserError("the model has no LoRA adapters to export")
    family = hf_family(model.cfg)
    first = next(iter(mods.values()))
    if any(m.rank != first.rank or m.alpha != first.alpha for m in mods.values()):
        raise UserError("export_peft needs one rank and alpha for every adapter")
    r, alpha = first.rank, first.alpha
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    tensors: dict[str, Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    grouped: dict[str, list[tuple[str, LoRALinear]]] = {}
    for name, m in mods.items():
        grouped.setdefault(_hf_module_name(name, family), []).append((name, m))
    for theirs, items in grouped.items():
        key = f"base_model.model.{theirs}"
        if family == "gpt2" and theirs.endswith("attn.c_attn"):
            D = model.cfg.d_model
            order = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
            items = sorted(items, key=lambda it: order[it[0].rsplit(".", 1)[1]])
            A = torch.cat([m.lora_A.detach() for _, m in items], dim=0)  # [n r, D]
            B = torch.zeros(3 * D, r * len(items), dtype=A.dtype)  # [3D, n r]
            for j, (name, m) in enumerate(items):
                row = order[name.rsplit(".", 1)[1]] * D
                B[row : row + D, j * r : (j + 1) * r] = m.lora_B.detach()
            if len(items) > 1:  # same scaling alpha / r at the stacked rank
                rank_pattern[theirs] = r * len(items)
                alpha_pattern[theirs] = alpha * len(items)
        else:
            (_, m), = items
            A, B = m.lora_A.detach(), m.lora_B.detach()
        tensors[f"{key}.lora_A.weight"] = A.cpu().contiguous().clone()
        tensors[f"{key}.lora_B.weight"] = B.cpu().contiguous().clone()
    targets = sorted({t.split(".", 3)[-1] if family != "gpt2" else ".".join(t.split(".")[-2:]) for t in grouped})
    conf = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "bias": "none", "target_modules": targets,
        "fan_in_fan_out": family == "gpt2", "inference_mode": True, "init_lora_weights": True,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": None,
    }
    out = Path(dst)
    tmp = _prepare_out(out)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n", encoding="utf-8")
        _finish_out(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
