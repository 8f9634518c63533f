"""Pipeline configuration: one pydantic model per YAML file, presets in ``flows/presets/``.

``load_pipeline_config("smoke", ["search.n_trials=3"])`` reads a preset (or a YAML path),
applies dotted overrides (``selfattn.config``'s one mechanism; unknown keys refused, naming
them) and validates everything before any work starts. ``pretrain`` / ``finetune`` are the
engine's own ``PretrainConfig`` / ``FinetuneConfig`` from load time, with the keys the pipeline
owns (data files, the pretrained checkpoint) set to placeholders that each run fills in
(:mod:`flows.stages`). Numbers are numbers after loading (YAML 1.1 reads ``1e-4`` as text), so
stage keys hash the validated values.

Precedence (preset < file < ``--set`` < search) is resolved once, in :func:`resolve`, before
validation; the validators only validate. A ``--set finetune.<key>=V`` of a key that
``search.space`` searches *fixes* it: the key leaves the space and is recorded in
``search.fixed`` (logged to MLflow as ``search.fixed.<key>``); trials and the final fine-tune
use V. Search ranges are set with the key in brackets: ``--set 'search.space[optim.lr].high=0.01'``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import Field, field_validator, model_validator

from flows.paths import (
    JOURNAL_SCHEME,
    check_within_roots,
    data_root,
    optuna_storage_url,
    resolve_local_path,
)
from selfattn.config import (
    StrictModel,
    apply_overrides,
    check_key_path,
    override_model,
    parse_override,
    read_mapping,
    set_dotted,
    split_key,
    validate_config,
)
from selfattn.errors import UserError
from selfattn.train.config import FinetuneConfig, PretrainConfig
from selfattn.utils import deep_merge

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
PRESETS = ("demo", "scratch", "smoke", "gpt2", "smollm2")

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
    init_from: str | None = Field(default=None, description="hf:ID_OR_DIR, gguf:FILE (also gguf:pkg:PACKAGE/file.gguf) or a selfattn checkpoint dir: replaces the pretrain stage")
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

    @model_validator(mode="after")
    def _check_search(self) -> "PipelineConfig":
        """Trial keys and every search-space key (each end of a range, each choice) checked against FinetuneConfig."""
        trial = trial_template(self)
        for key, sp in self.search.space.items():
            for value in _probes(sp):
                typed_value(trial, key, value)
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


def _probes(sp: SearchSpace) -> list[Any]:
    """The values a search space can take at its edges: every choice, or low and high."""
    probes = sp.choices if sp.type == "categorical" else [sp.low, sp.high]
    return [int(v) if sp.type == "int" else v for v in probes]  # type: ignore[arg-type]


def typed_value(model: FinetuneConfig, key: str, value: Any) -> Any:
    """``value`` as the engine's config types it at ``key`` (dotted); errors name the space key."""
    try:
        check_key_path(FinetuneConfig, split_key(key), f"{key}={value!r}")
    except UserError as exc:
        raise UserError(f"search.space[{key}] is not a finetune key: {exc}") from None
    typed = override_model(model, {key: value}, where=f"search.space[{key}] (value {value!r})")
    return _get(typed.model_dump(mode="json"), split_key(key))


def trial_template(cfg: PipelineConfig) -> FinetuneConfig:
    """The finetune section as trials see it: with ``search.trial_overrides`` on top (fixed keys
    are in the finetune section and never in the overrides: :func:`resolve`)."""
    data = deep_merge(cfg.finetune.model_dump(mode="json"), cfg.search.trial_overrides)
    return validate_config(FinetuneConfig, data, source="search.trial_overrides")


# --------------------------------------------------------------------------- precedence, once


def resolve(data: dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The config to validate, precedence resolved: preset < file < ``--set`` < search.

    The one place that decides where a value goes (``data``: the file with ``overrides`` applied):

    1. the engine keys each run fills in (data files, the pretrained checkpoint) get placeholders;
    2. a ``--set finetune.<key>`` of a key that ``search.space`` searches (or of a mapping holding
       one) fixes it: ``search.fixed[<key>]`` gets the value;
    3. every ``search.fixed`` key leaves ``search.space`` and ``search.trial_overrides`` and sets
       ``finetune.<key>``, which trials and the final fine-tune both start from;
    4. ``search.fixed``, ``search.trial_overrides`` and categorical choices are typed as the engine
       reads them (numbers, not YAML 1.1's text ``'1e-4'``), so stage keys hash what runs.
    """
    data = copy.deepcopy(data)
    for section, owned in PIPELINE_OWNED.items():
        if isinstance(data.get(section, {}), dict):
            data[section] = deep_merge(data.get(section, {}), owned)
    search = data.setdefault("search", {})
    if not isinstance(search, dict) or not isinstance(data["finetune"], dict):
        return data  # validation says what is wrong with it
    space = search.get("space") or {}
    fixed = {**(search.get("fixed") or {}), **_fixed_by_overrides(space, overrides)}
    if fixed:
        search["fixed"] = fixed
        search["space"] = {k: v for k, v in space.items() if k not in fixed}
        search["trial_overrides"] = _without(search.get("trial_overrides") or {}, fixed)
        for key, value in fixed.items():
            data["finetune"] = set_dotted(data["finetune"], split_key(key), value)
    return _typed(data)


def _fixed_by_overrides(space: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``{searched key: value}`` for each ``--set finetune.<key>`` (or mapping holding one) of a searched key."""
    fixed: dict[str, Any] = {}
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] != "finetune":
            continue
        for key in space:
            kp, rest = split_key(key), parts[1:]
            if rest == kp:
                fixed[key] = value
            elif kp[: len(rest)] == rest and isinstance(value, dict) and (inner := _get(value, kp[len(rest) :])) is not None:
                fixed[key] = inner
    return fixed


def _without(tree: dict[str, Any], keys: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``tree`` without the dotted ``keys`` (and without mappings they leave empty)."""
    out = copy.deepcopy(tree)
    for key in keys:
        *parents, leaf = split_key(key)
        node = _get(out, parents) if parents else out
        if isinstance(node, dict):
            node.pop(leaf, None)
    return _pruned(out)


def _pruned(tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` without the mappings left empty."""
    out = {k: _pruned(v) if isinstance(v, dict) else v for k, v in tree.items()}
    return {k: v for k, v in out.items() if v != {}}


def _typed(data: dict[str, Any]) -> dict[str, Any]:
    """Step 4 of :func:`resolve`; values that do not validate are left as they are (validation names them)."""
    search = data["search"]
    try:
        final = validate_config(FinetuneConfig, data["finetune"])
        trial = validate_config(FinetuneConfig, deep_merge(final.model_dump(mode="json"), search.get("trial_overrides") or {}))
    except UserError:
        return data
    final_dump, trial_dump = final.model_dump(mode="json"), trial.model_dump(mode="json")
    search["fixed"] = {key: _get(final_dump, split_key(key)) for key in search.get("fixed") or {}}
    search["trial_overrides"] = _typed_tree(search.get("trial_overrides") or {}, trial_dump)
    for key, sp in (search.get("space") or {}).items():
        if isinstance(sp, dict) and sp.get("type") == "categorical" and isinstance(sp.get("choices"), list):
            try:
                sp["choices"] = [typed_value(trial, key, v) for v in sp["choices"]]
            except UserError:
                pass  # validation reports it, naming the space key
    return data


def _typed_tree(tree: dict[str, Any], typed: dict[str, Any]) -> dict[str, Any]:
    """``tree``'s keys with the values ``typed`` (the validated config) holds there."""
    return {k: _typed_tree(v, typed.get(k) or {}) if isinstance(v, dict) else typed.get(k, v) for k, v in tree.items()}


# --------------------------------------------------------------------------- loading


def preset_path(name_or_path: str | Path) -> Path:
    """A shipped preset's name (``'demo'``, ``'smoke'``, ...) -> its file; anything else is a YAML path."""
    if str(name_or_path) in PRESETS:
        return PRESETS_DIR / f"{name_or_path}.yaml"
    p = Path(name_or_path)
    if not p.is_file():
        raise UserError(f"config {str(name_or_path)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing file")
    return p


def load_pipeline_config(name_or_path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    """Read a preset or YAML file, apply ``key=value`` overrides, resolve precedence, validate all sections.

    Everything is checked here, before any work: unknown keys (also inside ``pretrain`` /
    ``finetune`` / ``search.space``, checked against the training engine's own configs),
    out-of-range values, wrong types and local paths outside the allowed roots raise a
    ``UserError`` naming the key and the value.
    """
    path = preset_path(name_or_path)
    data = read_mapping(path)
    check_override_forms(data, overrides)
    data = resolve(apply_overrides(data, overrides, PipelineConfig), overrides)
    cfg = validate_config(PipelineConfig, data, source=str(path), overrides=overrides)
    check_config_paths(cfg)  # paths escaping SELFATTN_DATA_DIR / SELFATTN_HOME / cwd: refused now
    return cfg


def as_config(config: str | Path | PipelineConfig, overrides: Sequence[str] | None = None) -> PipelineConfig:
    """A ``PipelineConfig`` from a preset name, a YAML path, or itself (then without overrides)."""
    if isinstance(config, PipelineConfig):
        if overrides:
            raise UserError("overrides apply to a preset or a file; pass an already-resolved PipelineConfig without them")
        return config
    return load_pipeline_config(config, overrides or [])


def check_override_forms(data: dict[str, Any], overrides: Sequence[str]) -> None:
    """Keys with dots inside ``search.space`` / ``search.fixed`` go in brackets, and
    ``search.space[KEY].field=...`` needs KEY in the space (a new KEY needs its whole range)."""
    space = set((data.get("search") or {}).get("space") or {})
    for text in overrides:
        parts, value = parse_override(text)
        if parts[:2] == ["search", "space"] and len(parts) > 3 and parts[2] not in space:
            raise UserError(
                f"override {text!r}: {parts[2]!r} is not a key of search.space ({', '.join(sorted(space)) or 'empty'}); "
                "keys with dots go in brackets, e.g. --set 'search.space[optim.lr].high=0.01', and a new key "
                "needs its whole range, e.g. --set 'search.space[optim.lr]={type: float, low: 1e-4, high: 1e-2}'"
            )
        if parts[:2] == ["search", "fixed"] and len(parts) > 3:
            raise UserError(f"override {text!r}: a fixed key goes in brackets, e.g. --set 'search.fixed[optim.lr]=0.001' (or --set finetune.optim.lr=0.001)")
        if parts[:2] == ["search", "space"]:  # a whole space or a whole key: known from here on
            space = set(value) if len(parts) == 2 and isinstance(value, dict) else space | ({parts[2]} if len(parts) == 3 else set())


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
