"""Pipeline configuration: one pydantic model per YAML file, presets in ``flows/presets/``.

``load_pipeline_config("smoke", ["search.n_trials=3"])`` reads a preset (or a YAML path),
applies dotted overrides (``selfattn.config``'s one mechanism; unknown keys refused, naming
them) and validates everything before any work starts. ``pretrain`` / ``finetune`` are the
engine's own ``PretrainConfig`` / ``FinetuneConfig`` from load time, with the keys the pipeline
owns (data files, the pretrained checkpoint) set to placeholders that each run fills in
(:mod:`flows.stages`). Numbers are numbers after loading (YAML 1.1 reads ``1e-4`` as text), so
stage keys hash the validated values.

Precedence: a ``--set finetune.<key>=V`` of a key that ``search.space`` searches *fixes* it: the
key leaves the space and is recorded in ``search.fixed`` (logged to MLflow as
``search.fixed.<key>``); trials and the final fine-tune use V. Search ranges are set with the
key in brackets: ``--set 'search.space[optim.lr].high=0.01'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from selfattn.config import StrictModel, check_key_path, override_model, parse_override, read_mapping, set_dotted, split_key, validate_config
from selfattn.errors import UserError
from selfattn.train.config import FinetuneConfig, PretrainConfig
from selfattn.utils import deep_merge, flatten

from flows.paths import JOURNAL_SCHEME, check_within_roots, data_root, optuna_storage_url, resolve_local_path

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
    storage: str | None = Field(default=None, description="Optuna storage: an SQLAlchemy URL (RDB) or journal:///<file>; None = journal:///<home>/optuna.journal")
    n_trials: int = Field(default=8, ge=0, description="finished trials the study should hold (a re-run continues)")
    timeout_s: float | None = Field(default=None, gt=0)
    seed: int = 0
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_steps: int = Field(default=0, ge=0)
    metric: str = "accuracy"
    direction: Literal["maximize", "minimize"] = "maximize"
    trial_overrides: dict[str, Any] = Field(default_factory=dict, description="finetune keys set for trials (short budget)")
    space: dict[str, SearchSpace] = Field(default_factory=dict, description="finetune key (dotted) -> range")
    fixed: dict[str, Any] = Field(
        default_factory=dict,
        description="finetune key (dotted) -> value: not searched, set for trials and the final fine-tune (a --set of a searched key lands here)",
    )
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
    slices: dict[str, float] = Field(
        default_factory=dict,
        description="slice name -> the most accuracy it may lose against the champion, e.g. {negation: 0.02} (off when empty)",
    )


class EvaluationSection(StrictModel):
    """Calibration and behavioural evaluation in the evaluate stage (docs/evaluation.md)."""

    calibrate: bool = Field(default=True, description="fit a temperature on the fine-tune's held-out rows; served probabilities use it")
    behaviour: bool = Field(default=True, description="run the behavioural tests and the dev slices")
    behaviour_seed: int = 0
    behaviour_cases: int = Field(default=200, gt=0, description="cases per test from templates, and up to as many from dev")
    length_bins: list[int] = Field(default_factory=lambda: [12, 24], description="word-count edges of the length slices")


class PipelineConfig(StrictModel):
    """The whole nightly job: data -> validate -> pretrain -> search -> finetune -> evaluate -> register -> promote."""

    name: str = "pipeline"
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    init_from: str | None = Field(default=None, description="hf:ID_OR_DIR or a selfattn checkpoint dir: replaces the pretrain stage")
    pretrain: PretrainConfig = Field(default_factory=lambda: PretrainConfig.model_validate(PIPELINE_OWNED["pretrain"]))
    finetune: FinetuneConfig = Field(default_factory=lambda: FinetuneConfig.model_validate(PIPELINE_OWNED["finetune"]))
    search: SearchSection = Field(default_factory=SearchSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)
    promotion: PromotionSection = Field(default_factory=PromotionSection)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError(f"name ({v!r}) must be a plain name (no slashes, not starting with '.')")
        return v

    @model_validator(mode="before")
    @classmethod
    def _fill_owned_and_fixed(cls, data: Any) -> Any:
        """Placeholders for the pipeline-owned engine keys; ``search.fixed`` keys leave the space
        and set the finetune section."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section in ("pretrain", "finetune"):
            raw = data.get(section, {})
            if isinstance(raw, dict):
                data[section] = deep_merge(raw, PIPELINE_OWNED[section])
        search = data.get("search")
        if isinstance(search, dict) and isinstance(search.get("fixed"), dict) and search["fixed"]:
            search = dict(search)
            space = dict(search.get("space") or {})
            ft = data["finetune"]
            for key, value in search["fixed"].items():
                space.pop(key, None)
                if isinstance(ft, dict):
                    ft = set_dotted(ft, split_key(key), value)
            data["finetune"], search["space"], data["search"] = ft, space, search
        return data

    @model_validator(mode="after")
    def _check_search(self) -> "PipelineConfig":
        """Trial keys and every search-space key checked against FinetuneConfig; values normalised."""
        base = _trial_base(self).model_dump(mode="json")
        normal: dict[str, Any] = {}
        for key in flatten(self.search.trial_overrides):
            normal = set_dotted(normal, split_key(key), _get(base, split_key(key)))
        trial = trial_template(self)
        trial_dump = trial.model_dump(mode="json")
        fixed = {key: _get(trial_dump, split_key(key)) for key in self.search.fixed}
        for key, sp in self.search.space.items():
            probes = sp.choices if sp.type == "categorical" else [sp.low, sp.high]
            probes = [int(v) if sp.type == "int" else v for v in probes]  # type: ignore[arg-type]
            checked = [_get(_override(trial, key, v).model_dump(mode="json"), split_key(key)) for v in probes]
            if sp.type == "categorical":
                object.__setattr__(sp, "choices", checked)
        # object.__setattr__: normalising in place, not an assignment to re-validate
        object.__setattr__(self.search, "trial_overrides", normal)
        object.__setattr__(self.search, "fixed", fixed)
        return self


# The engine keys each run fills in (data files, the pretrained checkpoint); placeholders at load
# time so the sections validate as the engine's configs.
PIPELINE_OWNED: dict[str, dict[str, Any]] = {
    "pretrain": {"data": {"path": "<corpus.txt>"}},
    "finetune": {"data": {"train_path": "<train.tsv>", "val_path": None}, "init_from": "<pretrained>"},
}


def _get(data: dict[str, Any], parts: Sequence[str]) -> Any:
    node: Any = data
    for k in parts:
        node = node.get(k) if isinstance(node, dict) else None
    return node


def _override(model: FinetuneConfig, key: str, value: Any) -> FinetuneConfig:
    """``model`` with a search-space key set to a probe value; errors name the space key."""
    try:
        check_key_path(FinetuneConfig, split_key(key), f"{key}={value!r}")
    except UserError as exc:
        raise UserError(f"search.space[{key}] is not a finetune key: {exc}") from None
    return override_model(model, {key: value}, where=f"search.space[{key}] (value {value!r})")


def _trial_base(cfg: PipelineConfig) -> FinetuneConfig:
    data = deep_merge(cfg.finetune.model_dump(mode="json"), cfg.search.trial_overrides)
    return validate_config(FinetuneConfig, data, source="search.trial_overrides")


def trial_template(cfg: PipelineConfig) -> FinetuneConfig:
    """The finetune section as trials see it: ``search.trial_overrides``, then ``search.fixed``
    (a fixed value wins for trials as for the final fine-tune)."""
    return override_model(_trial_base(cfg), cfg.search.fixed, where="search.fixed")


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
    out-of-range values, wrong types and local paths outside the allowed roots raise a
    ``UserError`` naming the key and the value.
    """
    path = preset_path(name_or_path)
    data = read_mapping(path)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[:2] == ["search", "space"] and len(parts) > 3:
            _check_space_key(data, parts[2], text)
        if parts[:2] == ["search", "fixed"] and len(parts) > 3:
            raise UserError(f"override {text!r}: a fixed key goes in brackets, e.g. --set 'search.fixed[optim.lr]=0.001' (or --set finetune.optim.lr=0.001)")
        check_key_path(PipelineConfig, parts, text)
        if parts[0] == "finetune":
            data = _fix_searched(data, parts[1:], value)
        data = set_dotted(data, parts, value)
    cfg = validate_config(PipelineConfig, data, source=str(path))
    check_config_paths(cfg)  # paths escaping SELFATTN_DATA_DIR / SELFATTN_HOME / cwd: refused now
    return cfg


def _check_space_key(data: dict[str, Any], key: str, text: str) -> None:
    """``search.space[KEY].field=...`` needs KEY in the space (a new KEY needs its whole range)."""
    space = (data.get("search") or {}).get("space") or {}
    if key not in space:
        raise UserError(
            f"override {text!r}: {key!r} is not a key of search.space ({', '.join(sorted(space)) or 'empty'}); "
            "keys with dots go in brackets, e.g. --set 'search.space[optim.lr].high=0.01', and a new key "
            "needs its whole range, e.g. --set 'search.space[optim.lr]={type: float, low: 1e-4, high: 1e-2}'"
        )


def _fix_searched(data: dict[str, Any], parts: Sequence[str], value: Any) -> dict[str, Any]:
    """A ``--set finetune.<key>`` that sets a searched key (or a mapping holding one) fixes it."""
    search = data.get("search") or {}
    for key in list(search.get("space") or {}):
        kp = split_key(key)
        if list(parts) == kp:
            data = set_dotted(data, ["search", "fixed", key], value)
        elif kp[: len(parts)] == list(parts) and isinstance(value, dict):
            inner = _get(value, kp[len(parts) :])
            if inner is not None:
                data = set_dotted(data, ["search", "fixed", key], inner)
    return data


def check_config_paths(cfg: PipelineConfig, *, home: Path | None = None) -> dict[str, Path]:
    """Check every local path of a ``PipelineConfig`` before any work starts.

    With ``SELFATTN_DATA_DIR`` set, ``data.corpus`` / ``data.train`` / ``data.dev`` must resolve
    inside the allowed roots and exist; a ``sqlite:///`` or ``journal:///`` Optuna storage must live inside them too.
    Returns ``{key: resolved path}``.
    """
    checked: dict[str, Path] = {}
    if data_root() is not None:
        for key in ("corpus", "train", "dev"):
            checked[f"data.{key}"] = resolve_local_path(getattr(cfg.data, key), what=f"data.{key}", home=home)
    storage = cfg.search.storage
    for scheme in ("sqlite:///", JOURNAL_SCHEME):
        if storage and storage.startswith(scheme):
            checked["search.storage"] = check_within_roots(storage.removeprefix(scheme), what="search.storage", home=home)
    return checked


def study_storage_url(cfg: PipelineConfig, home: Path | None = None) -> str:
    """The Optuna storage URL of this config's study."""
    return optuna_storage_url(cfg.search.storage, home)
