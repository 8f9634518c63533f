"""Pipeline configuration: one pydantic model per YAML file, presets in ``flows/presets/``.

``load_pipeline_config("smoke", ["search.n_trials=3"])`` reads a preset (or a YAML path),
applies dotted overrides (unknown keys refused, naming them) and validates everything, including
the training-engine sections, before any work starts. Also: where things live (``SELFATTN_HOME``,
the MLflow and Optuna stores) and which paths a config may point at.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from selfattn.config import StrictModel, load_config, read_mapping
from selfattn.errors import UserError

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = ("demo", "smoke", "gpt2")

# public sources used when SELFATTN_DATA_DIR is not set (users with internet)
HUB_SST2 = "stanfordnlp/sst2"
TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


# --------------------------------------------------------------------------- sections


class DataSection(StrictModel):
    """Where the data comes from and how much of it a run uses.

    Paths are relative to ``SELFATTN_DATA_DIR`` (absolute paths must stay inside the data dir,
    ``SELFATTN_HOME`` or the working directory). Without ``SELFATTN_DATA_DIR`` the public
    sources are downloaded (``sst2_hub`` / ``corpus_url``).
    """

    corpus: str = "tinyshakespeare/input.txt"
    train: str = "sst2/train.tsv"
    dev: str = "sst2/dev.tsv"
    sst2_hub: str = HUB_SST2
    corpus_url: str = TINY_SHAKESPEARE_URL
    text_column: str = "sentence"
    label_column: str = "label"
    labels: list[int] = Field(default_factory=lambda: [0, 1])
    train_rows: int | None = Field(default=None, gt=0, description="subsample of the training rows (seeded)")
    dev_rows: int | None = Field(default=None, gt=0, description="first N dev rows (None = all)")
    corpus_chars: int | None = Field(default=None, gt=0, description="first N characters of the corpus")
    corpus_from_train: bool = Field(
        default=False, description="pretrain on the training split's sentences (in-domain, labels unused) instead of `corpus`"
    )


class SearchSpace(StrictModel):
    """One hyper-parameter: a float/int range or a categorical list."""

    type: Literal["float", "int", "categorical"] = "float"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical search space needs a non-empty 'choices' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"{self.type} search space needs low and high, got low={self.low} high={self.high}")
            if self.low > self.high:
                raise ValueError(f"search space low ({self.low}) must be <= high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"log search space needs low > 0, got {self.low}")
        return self


class SearchSection(StrictModel):
    """Optuna study: trials fine-tune from the pretrained checkpoint with a short budget."""

    enabled: bool = True
    study_name: str = "selfattn-sst2"
    storage: str | None = Field(default=None, description="Optuna RDB URL; None = sqlite:///<home>/optuna.db")
    n_trials: int = Field(default=8, ge=0, description="finished trials the study should hold (a re-run continues)")
    timeout_s: float | None = Field(default=None, gt=0)
    seed: int = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_steps: int = Field(default=0, ge=0)
    metric: str = "accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"
    trial_overrides: dict[str, Any] = Field(default_factory=dict, description="finetune keys set for trials (short budget)")
    space: dict[str, SearchSpace] = Field(default_factory=dict, description="finetune key (dotted) -> range")
    heartbeat_interval_s: int = Field(default=30, gt=0)
    grace_period_s: int = Field(default=120, gt=0)
    max_retry: int = Field(default=1, ge=0)


class TrackingSection(StrictModel):
    experiment: str = "selfattn"
    log_every: int = Field(default=20, gt=0, description="flush batched step metrics every N steps")
    system_metrics: bool = True
    attention_example: str = "a gripping , beautifully acted film ."


class RegistrySection(StrictModel):
    model_name: str = "selfattn-sst2"
    enabled: bool = Field(default=True, description="register the model (and run the champion gate)")


class PromotionSection(StrictModel):
    metric: str = "accuracy"
    margin: float = Field(default=0.0, ge=0.0)


class PipelineConfig(StrictModel):
    """The whole nightly job: data -> validate -> pretrain -> search -> finetune -> evaluate -> register -> promote."""

    name: str = "pipeline"
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    init_from: str | None = Field(default=None, description="hf:ID_OR_DIR or a selfattn checkpoint dir: replaces the pretrain stage")
    pretrain: dict[str, Any] = Field(default_factory=dict, description="selfattn.train.PretrainConfig fields")
    finetune: dict[str, Any] = Field(default_factory=dict, description="selfattn.train.FinetuneConfig fields")
    search: SearchSection = Field(default_factory=SearchSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    promotion: PromotionSection = Field(default_factory=PromotionSection)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError(f"name ({v!r}) must be a plain name (no slashes, not starting with '.')")
        return v


# --------------------------------------------------------------------------- loading


def preset_path(name_or_path: str | Path) -> Path:
    """``'demo'`` / ``'smoke'`` -> the shipped preset; anything else is a YAML path."""
    if str(name_or_path) in PRESETS:
        return PRESETS_DIR / f"{name_or_path}.yaml"
    p = Path(name_or_path)
    if not p.is_file():
        raise UserError(f"config {str(name_or_path)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    return p


def load_pipeline_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a preset or YAML file, apply ``key=value`` overrides, validate all sections.

    Everything is checked here, before any work: unknown keys (also inside ``pretrain`` /
    ``finetune`` / ``search.space``, checked against the training engine's own configs),
    out-of-range values and wrong types raise a ``UserError`` naming the key and the value.
    """
    path = preset_path(name_or_path)
    read_mapping(path)  # a clear error for unreadable files before pydantic sees anything
    cfg = load_config(PipelineConfig, path, overrides)
    check_engine_sections(cfg)
    from flows.recovery import check_config_paths

    check_config_paths(cfg)  # paths escaping SELFATTN_DATA_DIR / SELFATTN_HOME / cwd: refused now
    return cfg


def _engine():
    try:
        from selfattn import train
    except ImportError as exc:  # pragma: no cover - the engine ships with the package
        raise UserError(f"the training engine selfattn.train is not importable: {exc}") from None
    return train


def _validate_section(schema: Any, data: dict[str, Any], where: str) -> Any:
    from pydantic import ValidationError

    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join([where, *(str(p) for p in err["loc"])])
            value = err.get("input")
            shown = repr(value) if not isinstance(value, dict) else "{...}"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg} (got {shown})")
        raise UserError("invalid pipeline config:\n" + "\n".join(lines)) from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    from selfattn.config import apply_overrides

    import yaml

    return apply_overrides(data, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])


def check_engine_sections(cfg: PipelineConfig) -> None:
    """Validate ``pretrain``/``finetune`` against the engine configs, and every search key.

    Data fields are filled in by the pipeline at run time, so placeholders are used here.
    """
    train = _engine()
    placeholders = engine_data_placeholders()
    _validate_section(train.PretrainConfig, merge(cfg.pretrain, placeholders["pretrain"]), "pretrain")
    ft = merge(cfg.finetune, placeholders["finetune"])
    _validate_section(train.FinetuneConfig, ft, "finetune")
    trial = merge(ft, cfg.search.trial_overrides)
    _validate_section(train.FinetuneConfig, trial, "search.trial_overrides")
    for key, space in cfg.search.space.items():
        probe = space.choices[0] if space.type == "categorical" else (int(space.low) if space.type == "int" else space.low)
        _validate_section(train.FinetuneConfig, _set_dotted(trial, key, probe), f"search.space[{key}]")


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of two mappings (``b`` wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def engine_data_placeholders() -> dict[str, dict[str, Any]]:
    """Data-path fields of the engine configs, set by the pipeline (filled per run)."""
    return engine_data_fields(corpus="corpus.txt", train="train.tsv", dev="dev.tsv", init_from=".")


def engine_data_fields(*, corpus: str, train: str, dev: str, init_from: str) -> dict[str, dict[str, Any]]:
    """The engine keys the pipeline owns: data files and the pretrained checkpoint."""
    return {
        "pretrain": {"data": {"path": corpus}},
        "finetune": {"data": {"train_path": train, "val_path": dev}, "init_from": init_from},
    }


# --------------------------------------------------------------------------- where things live


def selfattn_home() -> Path:
    """``SELFATTN_HOME`` (default ``./.selfattn``), absolute. Not created here."""
    from selfattn.data import selfattn_home as library_home

    return library_home().expanduser().resolve()


def data_root() -> Path | None:
    """``SELFATTN_DATA_DIR`` or None (then the public sources are used)."""
    from selfattn.data import data_dir

    d = data_dir()
    return d.expanduser().resolve() if d else None


def mlflow_tracking_uri(home: Path | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` when set (the standard variable wins), else SQLite under home."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{(home or selfattn_home()) / 'mlflow.db'}"


def mlflow_artifact_root(home: Path | None = None) -> str:
    return str((home or selfattn_home()) / "mlartifacts")


def optuna_storage_url(cfg: PipelineConfig, home: Path | None = None) -> str:
    # SELFATTN_OPTUNA_STORAGE: the team stack's database (infra/), set in the worker's environment
    return cfg.search.storage or os.environ.get("SELFATTN_OPTUNA_STORAGE") or f"sqlite:///{(home or selfattn_home()) / 'optuna.db'}"


def allowed_roots(home: Path | None = None) -> list[Path]:
    roots = [home or selfattn_home(), Path.cwd().resolve()]
    d = data_root()
    if d is not None:
        roots.insert(0, d)
    return roots


def resolve_local_path(spec: str, *, home: Path | None = None) -> Path:
    """A config path -> an absolute path inside the allowed roots, else a UserError."""
    base = data_root()
    p = Path(spec).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    p = p.resolve()
    roots = allowed_roots(home)
    if not any(p == r or r in p.parents for r in roots):
        raise UserError(
            f"path {spec!r} resolves to {p}, outside the allowed roots ({', '.join(map(str, roots))}); "
            "put the file under SELFATTN_DATA_DIR or SELFATTN_HOME"
        )
    if not p.is_file():
        raise UserError(f"data file {spec!r} not found (looked at {p})")
    return p
