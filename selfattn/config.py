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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from selfattn.errors import UserError

AttentionKind = Literal["full", "sliding_window", "low_rank"]
PositionKind = Literal["rope", "learned", "alibi", "none"]
NormKind = Literal["layernorm", "rmsnorm"]
MLPKind = Literal["gelu", "swiglu"]
PoolingKind = Literal["mean", "max", "last", "first"]
GeluApprox = Literal["none", "tanh"]


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ModelConfig(StrictModel):
    """Architecture of a decoder LM or a sequence classifier (same trunk)."""

    vocab_size: int = Field(gt=0)
    context_length: int = Field(default=256, gt=0)
    n_layers: int = Field(default=2, gt=0)
    d_model: int = Field(default=64, gt=0)
    n_heads: int = Field(default=4, gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0, description="None = n_heads (plain MHA); 1 = multi-query")
    d_ff: int | None = Field(default=None, gt=0, description="MLP hidden size; None = 4 * d_model")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    bias: bool = False
    qkv_bias: bool | None = Field(default=None, description="bias on q/k/v only (Qwen2); None = follow bias")
    attention: AttentionKind = "full"
    window: int | None = Field(default=None, gt=0, description="sliding_window: keys per query (incl. itself)")
    low_rank_k: int | None = Field(default=None, gt=0, description="low_rank: projected key/value length")
    position: PositionKind = "rope"
    rope_base: float = Field(default=10000.0, gt=0)
    norm: NormKind = "layernorm"
    norm_eps: float | None = Field(default=None, gt=0, description="None = 1e-5 (layernorm) / 1e-6 (rmsnorm)")
    mlp: MLPKind = "gelu"
    gelu_approximate: GeluApprox = Field(default="none", description="'tanh' = GPT-2's gelu_new")
    tie_embeddings: bool = True
    # classifier head (ignored by the LM)
    n_classes: int | None = Field(default=None, ge=2)
    pooling: PoolingKind = "mean"
    causal: bool = Field(default=False, description="classifier trunk: causal (as pretrained LM) or bidirectional")
    pad_token_id: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        kv = self.kv_heads
        if self.n_heads % kv:
            raise ValueError(f"n_kv_heads ({kv}) must divide n_heads ({self.n_heads})")
        if self.attention == "sliding_window" and self.window is None:
            raise ValueError("attention='sliding_window' needs window (keys per query), e.g. window=64")
        if self.attention == "low_rank" and self.low_rank_k is None:
            raise ValueError("attention='low_rank' needs low_rank_k (projected length), e.g. low_rank_k=32")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head_dim, got {self.head_dim}")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id ({self.pad_token_id}) must be < vocab_size ({self.vocab_size})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

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


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.lr=3e-4'`` -> ``(['train', 'lr'], 0.0003)``; the value is parsed as YAML."""
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key=value (dotted keys allowed, e.g. train.lr=3e-4)")
    key, raw = text.split("=", 1)
    parts = [k for k in key.strip().split(".")]
    if not all(parts):
        raise UserError(f"override {text!r} has an empty key segment")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], schema: type[BaseModel] | None = None) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied.

    With ``schema``, every key path is checked against the pydantic model's fields first,
    so ``--set train.lrr=1`` fails naming ``train.lrr`` and the keys that exist.
    """
    out = json.loads(json.dumps(data, default=str))
    for text in overrides:
        parts, value = parse_override(text)
        if schema is not None:
            _check_key_path(schema, parts, text)
        node = out
        for k in parts[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {}
                node[k] = nxt
            node = nxt
        node[parts[-1]] = value
    return out


def _check_key_path(schema: type[BaseModel], parts: list[str], text: str) -> None:
    model: Any = schema
    for i, k in enumerate(parts):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            # reached a free-form value (dict / Any): anything below is allowed
            return
        if k not in fields:
            where = ".".join(parts[:i]) or "<top level>"
            raise UserError(
                f"unknown config key {'.'.join(parts[: i + 1])!r} in override {text!r}; "
                f"keys under {where}: {', '.join(sorted(fields))}"
            )
        model = _submodel(fields[k].annotation)


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


def validate_config(schema: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate ``data`` against ``schema``; a UserError naming every bad key and value."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
            value = err.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            if err["type"] == "extra_forbidden":
                lines.append(f"  {loc}: unknown key (value {shown})")
            else:
                lines.append(f"  {loc}: {err['msg']} (got {shown})")
        raise UserError(f"invalid {source}:\n" + "\n".join(lines)) from None


def load_config(schema: type[C], path: str | Path | None = None, overrides: Sequence[str] = (), base: dict[str, Any] | None = None) -> C:
    """Build a config: ``base`` mapping, then the file at ``path``, then ``overrides``."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _deep_merge(data, read_mapping(path))
    data = apply_overrides(data, overrides, schema)
    return validate_config(schema, data, source=str(path) if path else "config")


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
