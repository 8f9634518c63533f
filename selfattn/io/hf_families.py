"""The Hugging Face families selfattn maps onto its trunk: one :class:`Family` entry each.

An entry holds everything that differs between families: the ``model_type`` values, the
architecture class per task, how ``config.json`` maps onto :class:`ModelConfig` and back, the
tensor names (the base model's prefix, its layer list, a module map for the trunk, for one layer
and for each task's head) and the quirks (GPT-2's Conv1D ``[in, out]`` weights and fused
``c_attn``; biases the HF model always has). Adding a family is adding an entry to ``FAMILIES``;
:mod:`selfattn.io.hf` reads the files and applies the entry.

Module maps go from a HF module path to ours; the tensor's last part (``.weight`` / ``.bias``)
carries over. A tuple of our modules is one fused HF module, stacked along its output rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from pydantic import ValidationError

from selfattn.config import ModelConfig, RopeScaling
from selfattn.errors import UserError

__all__ = ["Family", "FAMILIES", "HFConfig", "family_of_model_type", "family_of_config", "supported_text"]

_REQUIRED = object()


class HFConfig:
    """A ``config.json`` mapping read through typed getters: a missing required key or a value of the
    wrong type is a :class:`UserError` naming the file, the key and the value (never a traceback)."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data, self.where = data, where

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def _value(self, key: str, default: Any, nullable: bool) -> Any:
        if key not in self.data or (self.data[key] is None and nullable):
            if default is _REQUIRED:
                raise UserError(f"{self.where}: the config lacks {key!r}")
            return default
        return self.data[key]

    def _bad(self, key: str, value: Any, want: str) -> UserError:
        return UserError(f"{self.where}: {key} must be {want}, got {value!r}")

    def int(self, key: str, default: Any = _REQUIRED, *, minimum: int | None = None, nullable: bool = True) -> Any:
        value = self._value(key, default, nullable)
        if value is default and default is not _REQUIRED:
            return value
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        want = "an integer" if minimum is None else f"an integer >= {minimum}"
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            raise self._bad(key, value, want)
        return value

    def float(self, key: str, default: Any = _REQUIRED, *, positive: bool = False, nullable: bool = True) -> Any:
        value = self._value(key, default, nullable)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise self._bad(key, value, "a finite number")
        if positive and value <= 0:
            raise self._bad(key, value, "a number > 0")
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self._value(key, default, True)
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._value(key, default, True)
        if value is default and default is not _REQUIRED:
            return value
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def mapping(self, key: str) -> dict[str, Any]:
        """A JSON object (``{}`` when absent or null)."""
        value = self._value(key, {}, True)
        if not isinstance(value, dict):
            raise self._bad(key, value, "a JSON object")
        return value

    def model_config(self, fields: dict[str, Any]) -> ModelConfig:
        try:
            return ModelConfig(**fields)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise UserError(f"{self.where}: the config does not make a valid model: {where}: {err['msg']} (got {err.get('input')!r})") from None


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture family (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    architectures: dict[str, str]  # our task ("lm", "encoder", "mlm", "classifier") -> HF class
    config_in: Callable[[HFConfig], dict[str, Any]]  # -> ModelConfig fields
    config_out: Callable[[ModelConfig], dict[str, Any]]  # -> config.json fields (besides the common ones)
    misfits: Callable[[ModelConfig], list[str]]  # why a config is not exactly this family ([] = it is)
    prefix: str  # the base model's attribute in the task models ("model.", "transformer.", "bert.")
    layers: str  # the layer list inside the base model ("layers", "h", "encoder.layer")
    trunk: dict[str, str]  # base-model module (outside the layers) -> ours
    layer: dict[str, str | tuple[str, ...]]  # module inside layer i -> ours inside blocks.{i}
    heads: dict[str, dict[str, str]]  # task -> top-level module -> ours
    skip: tuple[str, ...] = ()  # tensor-name endings that hold no weights (buffers, unused heads)
    aliases: dict[str, str] = field(default_factory=dict)  # HF tensor -> the HF tensor it is tied to
    conv1d: tuple[str, ...] = ()  # layer modules stored [in, out] (GPT-2's Conv1D)
    zero_biases: bool = False  # the HF model has a bias on every linear and norm: write zeros where ours has none
    unprefixed: tuple[str, ...] = ()  # tasks whose HF class is the base model itself (no prefix)
    pooler: str = "none"  # the activation of the family's pooler (BERT's dense + tanh), "none" = no pooler

    def tasks(self) -> tuple[str, ...]:
        return tuple(self.architectures)


# --------------------------------------------------------------------------- decoders: config


def _gpt2_in(c: HFConfig) -> dict[str, Any]:
    act = c.str("activation_function", "gelu_new")
    approx = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}.get(act)
    if approx is None:
        raise UserError(f"{c.where}: activation_function {act!r} is not supported (gelu_new, gelu_pytorch_tanh or gelu)")
    if c.get("scale_attn_by_inverse_layer_idx") or c.get("scale_attn_weights") is False or c.get("add_cross_attention"):
        raise UserError(f"{c.where}: GPT-2 variants with scale_attn_by_inverse_layer_idx, unscaled attention or cross-attention are not supported")
    return dict(
        vocab_size=c.int("vocab_size"), context_length=c.int("n_positions", 1024), n_layers=c.int("n_layer"),
        d_model=c.int("n_embd"), n_heads=c.int("n_head", minimum=1), d_ff=c.int("n_inner", None), bias=True, position="learned",
        norm="layernorm", norm_eps=c.float("layer_norm_epsilon", 1e-5), mlp="gelu", gelu_approximate=approx,
        tie_embeddings=c.bool("tie_word_embeddings", True),
    )  # fmt: skip


def _gpt2_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "n_positions": cfg.context_length, "n_layer": cfg.n_layers, "n_embd": cfg.d_model, "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff, "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
        "layer_norm_epsilon": 1e-5 if cfg.norm_eps is None else cfg.norm_eps,
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
    }  # fmt: skip


def _qkv_bias(cfg: ModelConfig) -> bool:
    return cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias


def _common_misfits(cfg: ModelConfig) -> list[str]:
    """What every family here needs: none of the encoder options, full-width rotary or none."""
    out = []
    if cfg.attention == "low_rank":
        out.append("attention='low_rank' (no HF family has Linformer projections)")
    return out


def _gpt2_misfits(cfg: ModelConfig) -> list[str]:
    checks = [
        (cfg.position == "learned", f"position={cfg.position!r} (needs 'learned')"),
        (cfg.norm == "layernorm", f"norm={cfg.norm!r} (needs 'layernorm')"),
        (cfg.mlp == "gelu", f"mlp={cfg.mlp!r} (needs 'gelu')"),
        (cfg.kv_heads == cfg.n_heads, f"n_kv_heads={cfg.kv_heads} (needs n_heads)"),
        (cfg.attention == "full", f"attention={cfg.attention!r} (needs 'full')"),
        (_qkv_bias(cfg) == cfg.bias, "qkv_bias differs from bias"),
        (cfg.head_dim * cfg.n_heads == cfg.d_model, f"head_size={cfg.head_size} (needs d_model / n_heads)"),
        (not cfg.qk_norm, "qk_norm=True (needs False)"),
    ]
    return [what for ok, what in checks if not ok] + _decoder_trunk_misfits(cfg)


def _decoder_trunk_misfits(cfg: ModelConfig) -> list[str]:
    """What every decoder family needs: none of the encoder options."""
    checks = [
        (cfg.norm_position == "pre", f"norm_position={cfg.norm_position!r} (needs 'pre')"),
        (cfg.type_vocab_size == 0, f"type_vocab_size={cfg.type_vocab_size} (needs 0)"),
        (not cfg.embedding_norm, "embedding_norm=True (needs False)"),
        (cfg.position_offset == 0, f"position_offset={cfg.position_offset} (needs 0)"),
        (cfg.pooler == "none", f"pooler={cfg.pooler!r} (needs 'none')"),
    ]
    return [what for ok, what in checks if not ok]


# ---- Llama-like (Llama, Mistral, Qwen2, Qwen3)

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _rope(c: HFConfig) -> tuple[float, RopeScaling | None]:
    """``(rope_theta, scaling)`` from transformers 5's ``rope_parameters`` or the older ``rope_scaling``
    + ``rope_theta``; a UserError names a rope type the trunk does not compute (dynamic, longrope, ...)."""
    fields = HFConfig({**c.mapping("rope_scaling"), **c.mapping("rope_parameters")}, c.where + " rope_parameters")
    rope_type = fields.get("rope_type") or fields.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise UserError(f"{c.where}: rope type {rope_type!r} is not supported; supported: {', '.join(_ROPE_TYPES)}")
    source = fields if "partial_rotary_factor" in fields.data else c
    partial = source.float("partial_rotary_factor", 1.0, nullable=False)
    if partial != 1.0:
        raise UserError(f"{c.where}: partial_rotary_factor {partial} is not supported (rotary on every head dimension only)")
    theta = fields.float("rope_theta", None, positive=True) or c.float("rope_theta", 10000.0, positive=True)
    if rope_type == "default":
        return theta, None
    try:
        if rope_type == "linear":
            return theta, RopeScaling(kind="linear", factor=fields.data["factor"])
        if rope_type == "yarn":
            return theta, _yarn_scaling(fields, c)
        return theta, RopeScaling(
            kind="llama3", factor=fields.data["factor"], low_freq_factor=fields.data["low_freq_factor"],
            high_freq_factor=fields.data["high_freq_factor"], original_context_length=fields.data["original_max_position_embeddings"],
        )  # fmt: skip
    except KeyError as exc:
        raise UserError(f"{c.where}: rope type {rope_type!r} lacks {exc.args[0]!r}") from None
    except ValidationError as exc:
        raise UserError(f"{c.where}: rope type {rope_type!r}: {exc.errors()[0]['msg']}") from None


def _yarn_scaling(fields: HFConfig, c: HFConfig) -> RopeScaling:
    """transformers' YaRN parameters, with the attention factor resolved as it resolves it (from
    ``mscale`` / ``mscale_all_dim`` when given; a missing ``factor`` is the context ratio)."""
    old = fields.int("original_max_position_embeddings", minimum=1)
    factor = fields.float("factor", None, positive=True) or c.int("max_position_embeddings", minimum=1) / old

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    attention = fields.get("attention_factor")
    if attention is None and fields.get("mscale") and fields.get("mscale_all_dim"):
        attention = mscale(fields.float("mscale")) / mscale(fields.float("mscale_all_dim"))
    return RopeScaling(
        kind="yarn", factor=factor, original_context_length=old, attention_factor=attention,
        beta_fast=fields.get("beta_fast"), beta_slow=fields.get("beta_slow"), truncate=fields.get("truncate"),
    )  # fmt: skip


def _rope_out(cfg: ModelConfig) -> dict[str, Any]:
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


# hidden_act values transformers runs as SiLU (ACT2FN["swish"] is nn.SiLU)
_SILU = ("silu", "swish")


def _llama_like_in(c: HFConfig) -> dict[str, Any]:
    """The fields every Llama-like config shares; the family functions add biases and windows."""
    d_model, n_heads = c.int("hidden_size", minimum=1), c.int("num_attention_heads", minimum=1)
    head_dim = c.int("head_dim", None, minimum=1) or d_model // n_heads
    act = c.str("hidden_act", "silu")
    if act not in _SILU:
        raise UserError(f"{c.where}: hidden_act {act!r} is not supported (silu or swish = SwiGLU)")
    rope_base, rope_scaling = _rope(c)
    return dict(
        vocab_size=c.int("vocab_size"), context_length=c.int("max_position_embeddings", 2048), n_layers=c.int("num_hidden_layers", minimum=1),
        d_model=d_model, n_heads=n_heads, n_kv_heads=c.int("num_key_value_heads", None, minimum=1) or n_heads,
        head_size=None if head_dim * n_heads == d_model else head_dim,  # Qwen3, Mistral Nemo: heads wider or narrower
        d_ff=c.int("intermediate_size", minimum=1), position="rope", rope_base=rope_base, rope_scaling=rope_scaling,
        norm="rmsnorm", norm_eps=c.float("rms_norm_eps", 1e-6, positive=True), mlp="swiglu",
        tie_embeddings=c.bool("tie_word_embeddings", False),
    )  # fmt: skip


def _llama_in(c: HFConfig) -> dict[str, Any]:
    att, mlp = c.bool("attention_bias", False), c.bool("mlp_bias", False)
    if att != mlp:
        raise UserError(f"{c.where}: attention_bias ({att}) != mlp_bias ({mlp}) is not supported")
    return {**_llama_like_in(c), "bias": att}


def _mistral_in(c: HFConfig) -> dict[str, Any]:
    window = c.int("sliding_window", None, minimum=1)
    return {**_llama_like_in(c), **({"attention": "sliding_window", "window": window} if window else {})}


def _qwen_window(c: HFConfig) -> dict[str, Any]:
    """Qwen2/Qwen3 windows: per layer from ``layer_types``, or (configs written before transformers
    4.53) as transformers derives them: windowed iff ``use_sliding_window`` and ``i >= max_window_layers``.
    A window on every layer maps onto the trunk; a mix of windowed and full layers is refused."""
    if not c.bool("use_sliding_window", False) or c.get("sliding_window") is None:
        return {}  # transformers sets sliding_window to None: full attention on every layer
    window = c.int("sliding_window", minimum=1)
    n_layers = c.int("num_hidden_layers", minimum=1)
    types = c.get("layer_types")
    if types is None:
        first = c.int("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or not all(t in ("sliding_attention", "full_attention") for t in types):
        raise UserError(f"{c.where}: layer_types must be a list of 'sliding_attention' / 'full_attention', got {types!r}")
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not windowed:
        return {}
    if len(windowed) != len(types):
        full = [i for i, t in enumerate(types) if t == "full_attention"]
        raise UserError(
            f"{c.where}: sliding windows on some layers only are not supported: layers {windowed} windowed ({window} keys), "
            f"layers {full} full (use_sliding_window with max_window_layers={c.get('max_window_layers')}, layer_types "
            f"{'given' if c.get('layer_types') is not None else 'derived as transformers does'})"
        )
    return {"attention": "sliding_window", "window": window}


def _qwen2_in(c: HFConfig) -> dict[str, Any]:
    return {**_llama_like_in(c), "qkv_bias": True, **_qwen_window(c)}  # q/k/v biases always; none on o_proj or the MLP


def _qwen3_in(c: HFConfig) -> dict[str, Any]:
    if c.bool("attention_bias", False):
        raise UserError(f"{c.where}: a Qwen3 config with attention_bias (on o_proj but not the MLP) is not supported")
    return {**_llama_like_in(c), "qk_norm": True, **_qwen_window(c)}


def _llama_like_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ff_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": 1e-6 if cfg.norm_eps is None else cfg.norm_eps, **_rope_out(cfg), "attention_dropout": cfg.dropout,
    }  # fmt: skip


def _qwen_out(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.attention == "sliding_window":
        windows = {"use_sliding_window": True, "sliding_window": cfg.window, "max_window_layers": 0,
                   "layer_types": ["sliding_attention"] * cfg.n_layers}  # fmt: skip
    else:
        windows = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    return {**_llama_like_out(cfg), **windows}


def _llama_like_misfits(cfg: ModelConfig, family: str) -> list[str]:
    qkv = _qkv_bias(cfg)
    checks = [
        (cfg.position == "rope", f"position={cfg.position!r} (needs 'rope')"),
        (cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (needs 'rmsnorm')"),
        (cfg.mlp == "swiglu", f"mlp={cfg.mlp!r} (needs 'swiglu')"),
        (cfg.qk_norm == (family == "qwen3"), f"qk_norm={cfg.qk_norm} (needs {family == 'qwen3'})"),
    ]
    if family == "llama":
        checks += [(cfg.attention == "full", f"attention={cfg.attention!r} (needs 'full')"), (qkv == cfg.bias, "qkv_bias differs from bias")]
    elif family == "qwen2":
        checks.append((qkv and not cfg.bias, "needs qkv_bias=True, bias=False"))
    elif family == "mistral":
        checks.append((cfg.attention == "sliding_window" and not cfg.bias and not qkv, "needs attention='sliding_window' and no biases"))
    else:  # qwen3
        checks.append((not cfg.bias and not qkv, "needs no biases"))
    if family in ("qwen2", "qwen3"):
        checks.append((cfg.attention in ("full", "sliding_window"), f"attention={cfg.attention!r} (needs 'full' or 'sliding_window')"))
    return [what for ok, what in checks if not ok] + _decoder_trunk_misfits(cfg)


# --------------------------------------------------------------------------- decoders: names

_LLAMA_LAYER: dict[str, str | tuple[str, ...]] = {
    "input_layernorm": "norm1",
    "post_attention_layernorm": "norm2",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.out_proj",
    "self_attn.q_norm": "attn.q_norm",  # Qwen3
    "self_attn.k_norm": "attn.k_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def _llama_like(name: str, arch: str, config_in: Callable[[HFConfig], dict[str, Any]], config_out: Callable[[ModelConfig], dict[str, Any]]) -> Family:
    return Family(
        name=name, model_types=(name,), architectures={"lm": arch}, config_in=config_in, config_out=config_out,
        misfits=lambda cfg: _llama_like_misfits(cfg, name), prefix="model.", layers="layers",
        trunk={"embed_tokens": "tok_emb", "norm": "norm_f"}, layer=_LLAMA_LAYER, heads={"lm": {"lm_head": "lm_head"}},
        skip=("rotary_emb.inv_freq",),
    )  # fmt: skip


GPT2 = Family(
    name="gpt2", model_types=("gpt2",), architectures={"lm": "GPT2LMHeadModel"}, config_in=_gpt2_in, config_out=_gpt2_out,
    misfits=_gpt2_misfits, prefix="transformer.", layers="h",
    trunk={"wte": "tok_emb", "wpe": "pos_emb.embedding", "ln_f": "norm_f"},
    layer={"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
           "attn.c_proj": "attn.out_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"},
    heads={"lm": {"lm_head": "lm_head"}},
    skip=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of old checkpoints
    conv1d=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), zero_biases=True,
)  # fmt: skip

LLAMA = _llama_like("llama", "LlamaForCausalLM", _llama_in, lambda cfg: {**_llama_like_out(cfg), "attention_bias": cfg.bias, "mlp_bias": cfg.bias})
QWEN2 = _llama_like("qwen2", "Qwen2ForCausalLM", _qwen2_in, _qwen_out)
MISTRAL = _llama_like("mistral", "MistralForCausalLM", _mistral_in, lambda cfg: {**_llama_like_out(cfg), "sliding_window": cfg.window})
QWEN3 = _llama_like("qwen3", "Qwen3ForCausalLM", _qwen3_in, lambda cfg: {**_qwen_out(cfg), "attention_bias": False})

# --------------------------------------------------------------------------- encoders: config

# hidden_act -> gelu_approximate (transformers: "gelu" is the exact erf GELU)
_GELU = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _gelu(c: HFConfig, key: str) -> str:
    act = c.str(key, "gelu")
    if act not in _GELU:
        raise UserError(f"{c.where}: {key} {act!r} is not supported ({', '.join(_GELU)}; 'gelu' is the exact erf GELU)")
    return _GELU[act]


def _bert_in(c: HFConfig) -> dict[str, Any]:
    """BERT (and MiniLM, which is one): post-norm blocks, token types, LayerNorm on the embeddings."""
    if c.str("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{c.where}: position_embedding_type {c.get('position_embedding_type')!r} is not supported (absolute only)")
    if c.bool("is_decoder", False) or c.bool("add_cross_attention", False):
        raise UserError(f"{c.where}: a BERT decoder (is_decoder / add_cross_attention) is not supported; encoders only")
    return dict(
        vocab_size=c.int("vocab_size"), context_length=c.int("max_position_embeddings", 512, minimum=1),
        n_layers=c.int("num_hidden_layers", minimum=1), d_model=c.int("hidden_size", minimum=1),
        n_heads=c.int("num_attention_heads", minimum=1), d_ff=c.int("intermediate_size", minimum=1), bias=True,
        position="learned", norm="layernorm", norm_eps=c.float("layer_norm_eps", 1e-12, positive=True), mlp="gelu",
        gelu_approximate=_gelu(c, "hidden_act"), norm_position="post", embedding_norm=True,
        type_vocab_size=c.int("type_vocab_size", 2, minimum=1), tie_embeddings=c.bool("tie_word_embeddings", True),
        causal=False, pooling="first",
    )  # fmt: skip


def _roberta_in(c: HFConfig) -> dict[str, Any]:
    """RoBERTa: BERT's layout; positions start at pad_token_id + 1 and pad tokens take pad_token_id."""
    fields = _bert_in(c)
    offset = c.int("pad_token_id", 1, minimum=0) + 1
    n_positions = fields["context_length"]
    if n_positions <= offset:
        raise UserError(f"{c.where}: max_position_embeddings ({n_positions}) must exceed pad_token_id + 1 ({offset})")
    return {**fields, "context_length": n_positions - offset, "position_offset": offset, "type_vocab_size": c.int("type_vocab_size", 1, minimum=1)}


def _distilbert_in(c: HFConfig) -> dict[str, Any]:
    """DistilBERT: BERT without token types; LayerNorm eps fixed at 1e-12 in transformers."""
    return dict(
        vocab_size=c.int("vocab_size"), context_length=c.int("max_position_embeddings", 512, minimum=1),
        n_layers=c.int("n_layers", minimum=1), d_model=c.int("dim", minimum=1), n_heads=c.int("n_heads", minimum=1),
        d_ff=c.int("hidden_dim", minimum=1), bias=True, position="learned", norm="layernorm", norm_eps=1e-12, mlp="gelu",
        gelu_approximate=_gelu(c, "activation"), norm_position="post", embedding_norm=True,
        tie_embeddings=c.bool("tie_word_embeddings", True), causal=False, pooling="first",
    )  # fmt: skip


def _gelu_name(cfg: ModelConfig) -> str:
    return "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu"


def _bert_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ff_dim, "hidden_act": _gelu_name(cfg), "max_position_embeddings": cfg.context_length + cfg.position_offset,
        "type_vocab_size": cfg.type_vocab_size, "layer_norm_eps": 1e-5 if cfg.norm_eps is None else cfg.norm_eps,
        "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout, "position_embedding_type": "absolute",
        "pad_token_id": cfg.pad_token_id,
    }  # fmt: skip


def _distilbert_out(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "dim": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "hidden_dim": cfg.ff_dim,
        "activation": _gelu_name(cfg), "max_position_embeddings": cfg.context_length, "sinusoidal_pos_embds": False,
        "dropout": cfg.dropout, "attention_dropout": cfg.dropout, "pad_token_id": cfg.pad_token_id,
    }  # fmt: skip


def _encoder_misfits(cfg: ModelConfig, family: str) -> list[str]:
    pooler = ("none", "relu" if family == "distilbert" else "tanh")
    checks = [
        (cfg.norm_position == "post", f"norm_position={cfg.norm_position!r} (needs 'post')"),
        (cfg.embedding_norm, "embedding_norm=False (needs True)"),
        (cfg.position == "learned", f"position={cfg.position!r} (needs 'learned')"),
        (cfg.norm == "layernorm" and cfg.mlp == "gelu" and cfg.bias, "needs norm='layernorm', mlp='gelu', bias=True"),
        (_qkv_bias(cfg) and cfg.kv_heads == cfg.n_heads and cfg.head_dim * cfg.n_heads == cfg.d_model, "needs plain multi-head attention with biases"),
        (cfg.attention == "full" and not cfg.qk_norm and not cfg.causal, f"attention={cfg.attention!r}, causal={cfg.causal} (needs 'full', bidirectional)"),
        (cfg.pooler in pooler, f"pooler={cfg.pooler!r} (needs one of {pooler})"),
    ]
    if family == "bert":
        checks += [(cfg.type_vocab_size > 0, "type_vocab_size=0 (needs token types)"), (cfg.position_offset == 0, f"position_offset={cfg.position_offset} (needs 0)")]
    elif family == "roberta":
        checks += [(cfg.type_vocab_size > 0, "type_vocab_size=0 (needs token types)"),
                   (cfg.position_offset == cfg.pad_token_id + 1, f"position_offset={cfg.position_offset} (needs pad_token_id + 1)")]  # fmt: skip
    else:
        checks += [(cfg.type_vocab_size == 0, f"type_vocab_size={cfg.type_vocab_size} (needs 0)"), (cfg.position_offset == 0, f"position_offset={cfg.position_offset} (needs 0)"),
                   (cfg.norm_eps == 1e-12, f"norm_eps={cfg.norm_eps} (DistilBERT's is fixed at 1e-12)")]  # fmt: skip
    return [what for ok, what in checks if not ok]


# --------------------------------------------------------------------------- encoders: names

_BERT_LAYER: dict[str, str | tuple[str, ...]] = {
    "attention.self.query": "attn.q_proj",
    "attention.self.key": "attn.k_proj",
    "attention.self.value": "attn.v_proj",
    "attention.output.dense": "attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "mlp.up_proj",
    "output.dense": "mlp.down_proj",
    "output.LayerNorm": "norm2",
}
_BERT_TRUNK = {
    "embeddings.word_embeddings": "tok_emb",
    "embeddings.position_embeddings": "pos_emb.embedding",
    "embeddings.token_type_embeddings": "type_emb",
    "embeddings.LayerNorm": "emb_norm",
    "pooler.dense": "pooler",
}
# integer buffers some checkpoints carry (transformers recreates them); not weights
_EMBEDDING_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _bert_like(name: str, arch: str, config_in: Callable[[HFConfig], dict[str, Any]], mlm: str, mlm_head: dict[str, str], classifier: dict[str, str]) -> Family:
    """BERT and RoBERTa: the same trunk names under their own prefix; ``mlm`` is the MLM head whose
    own ``bias`` parameter the decoder's bias is tied to."""
    return Family(
        name=name, model_types=(name,), config_in=config_in, config_out=_bert_out, misfits=lambda cfg: _encoder_misfits(cfg, name),
        architectures={"encoder": f"{arch}Model", "mlm": f"{arch}ForMaskedLM", "classifier": f"{arch}ForSequenceClassification"},
        prefix=f"{name}.", layers="encoder.layer", trunk=_BERT_TRUNK, layer=_BERT_LAYER,
        heads={"encoder": {}, "mlm": mlm_head, "classifier": classifier},
        skip=(*_EMBEDDING_BUFFERS, "cls.seq_relationship.weight", "cls.seq_relationship.bias"),  # + BERT's NSP head, unused
        aliases={f"{mlm}.decoder.bias": f"{mlm}.bias"}, unprefixed=("encoder",), pooler="tanh",
    )  # fmt: skip


BERT = _bert_like(
    "bert", "Bert", _bert_in, "cls.predictions",
    mlm_head={"cls.predictions.transform.dense": "mlm_head.dense", "cls.predictions.transform.LayerNorm": "mlm_head.norm",
              "cls.predictions.decoder": "mlm_head.decoder", "cls.predictions.bias": "mlm_head.decoder.bias"},
    classifier={"classifier": "head"},  # BertForSequenceClassification: the base model's pooler, then this
)  # fmt: skip
ROBERTA = _bert_like(
    "roberta", "Roberta", _roberta_in, "lm_head",
    mlm_head={"lm_head.dense": "mlm_head.dense", "lm_head.layer_norm": "mlm_head.norm", "lm_head.decoder": "mlm_head.decoder",
              "lm_head.bias": "mlm_head.decoder.bias"},
    classifier={"classifier.dense": "pooler", "classifier.out_proj": "head"},  # RobertaClassificationHead: dense + tanh over <s>
)  # fmt: skip
DISTILBERT = Family(
    name="distilbert", model_types=("distilbert",), config_in=_distilbert_in, config_out=_distilbert_out,
    misfits=lambda cfg: _encoder_misfits(cfg, "distilbert"),
    architectures={"encoder": "DistilBertModel", "mlm": "DistilBertForMaskedLM", "classifier": "DistilBertForSequenceClassification"},
    prefix="distilbert.", layers="transformer.layer",
    trunk={"embeddings.word_embeddings": "tok_emb", "embeddings.position_embeddings": "pos_emb.embedding", "embeddings.LayerNorm": "emb_norm"},
    layer={"attention.q_lin": "attn.q_proj", "attention.k_lin": "attn.k_proj", "attention.v_lin": "attn.v_proj",
           "attention.out_lin": "attn.out_proj", "sa_layer_norm": "norm1", "ffn.lin1": "mlp.up_proj", "ffn.lin2": "mlp.down_proj",
           "output_layer_norm": "norm2"},
    heads={"encoder": {}, "mlm": {"vocab_transform": "mlm_head.dense", "vocab_layer_norm": "mlm_head.norm", "vocab_projector": "mlm_head.decoder"},
           "classifier": {"pre_classifier": "pooler", "classifier": "head"}},
    skip=_EMBEDDING_BUFFERS, unprefixed=("encoder",), pooler="relu",
)  # fmt: skip

# export tries them in this order: the first family a config fits exactly
FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, QWEN2, MISTRAL, QWEN3, BERT, ROBERTA, DISTILBERT)}
ENCODERS = ("bert", "roberta", "distilbert")


def supported_text() -> str:
    return ", ".join(f"{arch} ({fam.name})" for fam in FAMILIES.values() for arch in fam.architectures.values())


def family_of_model_type(model_type: Any, architecture: Any, where: str) -> Family:
    """The family whose ``model_type`` this is; a UserError listing the supported architectures."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    named = f"{architecture} (model_type {model_type!r})" if architecture else f"model_type {model_type!r}"
    raise UserError(f"{where}: architecture {named} is not supported; supported: {supported_text()}")


def family_of_config(cfg: ModelConfig) -> Family:
    """The first family ``cfg`` is exactly; a UserError listing what does not fit the main ones."""
    misfits: dict[str, list[str]] = {}
    for fam in FAMILIES.values():
        misfits[fam.name] = _common_misfits(cfg) + fam.misfits(cfg)
        if not misfits[fam.name]:
            return fam
    detail = "; ".join(f"{name}: {', '.join(m)}" for name, m in misfits.items() if name in ("gpt2", "llama", "qwen3", "bert"))
    raise UserError(f"this model matches no Hugging Face architecture ({supported_text()}): {detail}")
