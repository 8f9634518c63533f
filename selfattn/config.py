"""Configuration objects: one validated, JSON/YAML-serializable model per thing.

``ModelConfig`` describes an architecture and is saved beside every checkpoint.
``load_config`` reads any pydantic config from YAML/JSON and applies dotted
``key=value`` overrides, refusing unknown keys with a message that names them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from selfattn.errors import UserError
from selfattn.utils import deep_merge

AttentionKind = Literal["full", "sliding_window", "low_rank"]
PositionKind = Literal["rope", "learned", "alibi", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu"]
PoolingKind = Literal["mean", "max", "last", "first"]
GeluApprox = Literal["none", "tanh"]
NormPosition = Literal["pre", "post"]
PoolerKind = Literal["none", "tanh", "relu"]


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class RopeScaling(StrictModel):
    """Rotary frequencies stretched for a longer context, as Hugging Face's ``rope_type`` does.

    ``kind="linear"``: every inverse frequency divided by ``factor`` (position interpolation).
    ``kind="llama3"`` (Llama 3.1 / 3.2 / 3.3): wavelengths longer than ``original_context_length /
    low_freq_factor`` divided by ``factor``, shorter than ``original_context_length /
    high_freq_factor`` kept, and a smooth interpolation between the two.
    ``kind="yarn"`` (Qwen2.5 / Qwen3 long context): a linear ramp between interpolated and kept
    frequencies over the dimensions that turn ``beta_slow`` .. ``beta_fast`` times within
    ``original_context_length``, and cos/sin multiplied by ``attention_factor`` (default
    ``0.1 ln(factor) + 1``).
    """

    kind: Literal["linear", "llama3", "yarn"]
    factor: float = Field(gt=0)
    original_context_length: int | None = Field(default=None, gt=0, description="llama3, yarn: the pretraining context")
    low_freq_factor: float | None = Field(default=None, gt=0, description="llama3")
    high_freq_factor: float | None = Field(default=None, gt=0, description="llama3")
    attention_factor: float | None = Field(default=None, gt=0, description="yarn: cos/sin scale; None = 0.1 ln(factor) + 1")
    beta_fast: float | None = Field(default=None, gt=0, description="yarn: None = 32")
    beta_slow: float | None = Field(default=None, gt=0, description="yarn: None = 1")
    truncate: bool | None = Field(default=None, description="yarn: round the ramp's ends outwards; None = True")

    @model_validator(mode="after")
    def _check(self) -> "RopeScaling":
        llama3 = {"low_freq_factor": self.low_freq_factor, "high_freq_factor": self.high_freq_factor}
        yarn = {"attention_factor": self.attention_factor, "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "truncate": self.truncate}
        if self.kind != "linear" and self.original_context_length is None:
            raise ValueError(f"rope_scaling kind={self.kind!r} needs original_context_length (the pretraining context)")
        if self.kind == "llama3" and None in llama3.values():
            raise ValueError(
                f"rope_scaling kind='llama3' needs low_freq_factor and high_freq_factor, got {self.low_freq_factor}, {self.high_freq_factor}"
            )
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:  # type: ignore[operator]
            raise ValueError(f"rope_scaling high_freq_factor ({self.high_freq_factor}) must be > low_freq_factor ({self.low_freq_factor})")
        foreign = {**({} if self.kind == "llama3" else llama3), **({} if self.kind == "yarn" else yarn)}
        if self.kind == "linear" and self.original_context_length is not None:
            foreign["original_context_length"] = self.original_context_length
        given = sorted(k for k, v in foreign.items() if v is not None)
        if given:
            raise ValueError(f"rope_scaling kind={self.kind!r} does not take {', '.join(given)}")
        return self


class ModelConfig(StrictModel):
    """Architecture of a decoder LM, an encoder (plain, masked LM) or a sequence classifier: one trunk."""

    vocab_size: int = Field(gt=0)
    context_length: int = Field(default=256, gt=0)
    n_layers: int = Field(default=2, gt=0)
    d_model: int = Field(default=64, gt=0)
    n_heads: int = Field(default=4, gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0, description="None = n_heads (plain MHA); 1 = multi-query")
    head_size: int | None = Field(
        default=None, gt=0, description="per-head q/k/v size; None = d_model // n_heads (Qwen3 and some Llamas set it apart)"
    )
    qk_norm: bool = Field(default=False, description="RMSNorm over each head's queries and keys before RoPE (Qwen3)")
    d_ff: int | None = Field(default=None, gt=0, description="MLP hidden size; None = 4 * d_model")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = False
    qkv_bias: bool | None = Field(default=None, description="bias on q/k/v only (Qwen2); None = follow bias")
    attention: AttentionKind = "full"
    window: int | None = Field(default=None, gt=0, description="sliding_window: keys per query (incl. itself)")
    low_rank_k: int | None = Field(default=None, gt=0, description="low_rank: projected key/value length")
    position: PositionKind = "rope"
    rope_base: float = Field(default=10000.0, gt=0)
    rope_scaling: RopeScaling | None = Field(default=None, description="position='rope': frequencies stretched (llama3, yarn, linear)")
    norm: NormKind = "layernorm"
    norm_eps: float | None = Field(default=None, gt=0, description="None = 1e-5 (layernorm) / 1e-6 (rmsnorm)")
    mlp: MLPKind = "gelu"
    gelu_approximate: GeluApprox = Field(default="none", description="'tanh' = GPT-2's gelu_new")
    tie_embeddings: bool = True
    # encoder options (BERT, RoBERTa, DistilBERT); the defaults are the decoder trunk
    norm_position: NormPosition = Field(
        default="pre", description="pre: x + f(norm(x)) and a final norm (GPT-2, Llama); post: norm(x + f(x)), no final norm (BERT)"
    )
    type_vocab_size: int = Field(default=0, ge=0, description="token-type (segment) embeddings added to every token (BERT: 2); 0 = none")
    embedding_norm: bool = Field(default=False, description="a norm over the summed embeddings (BERT, RoBERTa, DistilBERT)")
    position_offset: int = Field(
        default=0, ge=0, description="learned positions: table row of the first token (RoBERTa: pad_token_id + 1; pad tokens take row position_offset - 1)"
    )
    # classifier head (ignored by the LM)
    n_classes: int | None = Field(default=None, ge=2)
    pooling: PoolingKind = "mean"
    pooler: PoolerKind = Field(
        default="none", description="a dense layer + activation over the pooled vector before the head (BERT, RoBERTa: tanh; DistilBERT: relu)"
    )
    causal: bool = Field(default=False, description="classifier trunk: causal (as pretrained LM) or bidirectional")
    pad_token_id: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.head_size is None and self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}), or set head_size")
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads})")
        if self.attention == "sliding_window" and self.window is None:
            raise ValueError("attention='sliding_window' needs window (keys per query), e.g. window=64")
        if self.attention == "low_rank" and self.low_rank_k is None:
            raise ValueError("attention='low_rank' needs low_rank_k (projected length), e.g. low_rank_k=32")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(f"rope_scaling needs position='rope', got position={self.position!r}")
        if self.position_offset and self.position != "learned":
            raise ValueError(f"position_offset ({self.position_offset}) needs position='learned', got position={self.position!r}")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be < vocab_size ({self.vocab_size})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    def to_json(self, path: str | Path | None = None) -> str:
        text = self.model_dump_json(indent=2)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> "ModelConfig":
        p = Path(path_or_text) if not str(path_or_text).lstrip().startswith("{") else None
        text = p.read_text(encoding="utf-8") if p is not None else str(path_or_text)
        return cls.model_validate_json(text)


# --------------------------------------------------------------------------- loading

C = TypeVar("C", bound=BaseModel)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file holding a mapping; a UserError if it cannot be used."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {p} is not valid YAML/JSON: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def split_key(key: str) -> list[str]:
    """``'a.b[c.d].e'`` -> ``['a', 'b', 'c.d', 'e']``: dots separate keys, brackets hold a key that has dots."""
    parts: list[str] = []
    buf, i = "", 0
    while i < len(key):
        c = key[i]
        if c == "[":
            end = key.find("]", i)
            if end < 0:
                raise UserError(f"key {key!r} has an unclosed '['")
            if buf:
                parts.append(buf)
            parts.append(key[i + 1 : end])
            buf, i = "", end + 1
            if i < len(key) and key[i] not in ".[":
                raise UserError(f"key {key!r}: expected '.' or '[' after ']'")
            if i < len(key) and key[i] == ".":
                i += 1
            continue
        if c == ".":
            parts.append(buf)
            buf = ""
        else:
            buf += c
        i += 1
    if buf or not parts or key.endswith("."):
        parts.append(buf)
    if not all(p.strip() for p in parts):
        raise UserError(f"key {key!r} has an empty key segment")
    return [p.strip() for p in parts]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'optim.lr=3e-4'`` -> ``(['optim', 'lr'], 0.0003)``; the value is parsed as YAML.

    A key that itself holds dots goes in brackets: ``'search.space[optim.lr].high=0.01'``.
    YAML 1.1 reads ``1e-4`` (no dot) as text; the pydantic validation that follows makes it a float.
    """
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value (dotted keys allowed, e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    try:
        parts = split_key(key.strip())
    except UserError as exc:
        raise UserError(f"override {text!r}: {exc}") from None
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def set_dotted(data: dict[str, Any], parts: Sequence[str], value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``data[parts[0]]...[parts[-1]] = value`` (missing levels created)."""
    out = json.loads(json.dumps(data, default=str))
    node = out
    for k in parts[:-1]:
        nxt = node.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            node[k] = nxt
        node = nxt
    node[parts[-1]] = json.loads(json.dumps(value, default=str))
    return out


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied.

    With ``schema``, every key path is checked against the pydantic model's fields first,
    so ``--set optim.lrr=1`` fails naming ``optim.lrr`` and the keys that exist.
    """
    out = json.loads(json.dumps(data, default=str))
    for text in overrides:
        parts, value = parse_override(text)
        if schema is not None:
            check_key_path(schema, parts, text)
        out = set_dotted(out, parts, value)
    return out


def override_model(model: C, params: dict[str, Any], where: str = "config") -> C:
    """A validated copy of ``model`` with dotted keys set to values (``{"optim.lr": 0.01}``).

    The same key check and validation as :func:`apply_overrides`, for values that are already
    typed (search parameters, programmatic settings) instead of ``key=value`` text.
    """
    data = model.model_dump(mode="json")
    for key, value in params.items():
        parts = split_key(key)
        check_key_path(type(model), parts, f"{key}={value!r}")
        data = set_dotted(data, parts, value)
    return validate_config(type(model), data, source=where)


def check_key_path(schema: type[BaseModel], parts: Sequence[str], text: str) -> None:
    """A UserError unless ``parts`` names a field path of ``schema`` (free-form values end the check)."""
    model: Any = schema
    i = 0
    while i < len(parts):
        k = parts[i]
        fields = getattr(model, "model_fields", None)
        if fields is None:
            # reached a free-form value (Any): anything below is allowed
            return
        if k not in fields:
            where = ".".join(parts[:i]) or "<top level>"
            raise UserError(
                f"unknown config key {'.'.join(parts[: i + 1])!r} in override {text!r}; "
                f"keys under {where}: {', '.join(sorted(fields))}"
            )
        annotation = fields[k].annotation
        value_type = _mapping_value(annotation)
        if value_type is not None:  # dict[str, X]: the next part is a free key, then X's fields
            i += 1
            annotation = value_type
        model = _submodel(annotation)
        i += 1


def _mapping_value(annotation: Any) -> Any:
    """``X`` for ``dict[str, X]`` (also inside ``| None``), else None."""
    import typing

    if typing.get_origin(annotation) is dict:
        return typing.get_args(annotation)[1]
    for arg in typing.get_args(annotation):
        if typing.get_origin(arg) is dict:
            return typing.get_args(arg)[1]
    return None


def _submodel(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as ``Foo | None``, else None."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            return found
    return None


def format_validation_error(exc: ValidationError, source: str = "config", overrides: Sequence[str] = ()) -> str:
    """One message naming every bad key and value of a pydantic ``ValidationError``.

    A bad value that came from an override names that ``--set``, not the file it overrode.
    """
    parsed = [(parse_override(text)[0], text) for text in overrides if "=" in text]
    lines, from_set = [], []
    for err in exc.errors():
        loc_parts = [str(p) for p in err["loc"]]
        loc = ".".join(loc_parts) or "<top level>"
        value = err.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        given = next((text for parts, text in reversed(parsed) if loc_parts[: len(parts)] == parts), None)
        if given is not None and given not in from_set:
            from_set.append(given)
        where = f" from --set {given}" if given is not None else ""
        if err["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key (value {shown}){where}")
        else:
            lines.append(f"  {loc}: {err['msg']} (got {shown}){where}")
    if from_set and len(from_set) == len(lines):
        head = f"invalid --set {', '.join(from_set)} (applied to {source})"
    else:
        head = f"invalid {source}"
    return f"{head}:\n" + "\n".join(lines)


def validate_config(schema: type[C], data: dict[str, Any], source: str = "config", overrides: Sequence[str] = ()) -> C:
    """Validate ``data`` against ``schema``; a UserError naming every bad key and value (and the ``--set`` that gave it)."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source, overrides)) from None


def load_config(schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> C:
    """Build a config: ``base`` mapping, then the file at ``path``, then ``overrides``."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = deep_merge(data, read_mapping(path))
    data = apply_overrides(data, overrides, schema)
    return validate_config(schema, data, source=str(path) if path else "config", overrides=overrides)


class LoRAConfig(StrictModel):
    """Rank, scale (``alpha / rank``), dropout on the adapter input, and which Linear layers to adapt.

    ``targets`` match a module by its attribute name (``"q_proj"``) or by a dotted suffix of its
    full name (``"blocks.0.attn.q_proj"``). Hugging Face names of an imported model also work:
    ``c_attn`` (= q/k/v), ``attn.c_proj`` / ``o_proj`` (= out_proj), ``c_fc``, ``mlp.c_proj``.
    """

    rank: int = Field(default=8, gt=0)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)

    @field_validator("targets")
    @classmethod
    def _non_empty_names(cls, value: list[str]) -> list[str]:
        bad = [t for t in value if not t or t.strip() != t]
        if bad:
            raise ValueError(f"targets must be non-empty module names without spaces, got {bad!r}")
        return value
