"""The training engine: one loop for causal-LM pretraining and classifier fine-tuning.

Shape of a run (``pretrain`` / ``finetune``)::

    setup      device, DDP, seeds, tokenizer, data, model (+ LoRA), AdamW, warmup+cosine schedule
    resume     from the newest good checkpoint in out_dir/checkpoints/ (SHA-256 checked; config must match)
    train      micro-batches -> backward (grad accumulation, DDP no_sync) -> clip -> step
               every log_every: loss read-out (NaN/Inf -> TrainingDiverged), on_step
               every eval_every: evaluate, keep the best model (out_dir/best), early stopping, on_eval
               every checkpoint_every and at the end: atomic training checkpoint (the newest
               keep_checkpoints are kept), on_checkpoint
    finish     evaluate the best model (out_dir/eval), history.json, metrics.json, plots, on_train_end

Output directory::

    out_dir/config.yaml  tokenizer/  checkpoints/step-<N>/{state.pt, manifest.json}  best/ (save_pretrained)
            history.json  metrics.json  plots/learning_curves.png  eval/{metrics.json, plots/}

Training checkpoints (:mod:`selfattn.train.checkpoints`) are written with ``torch.save`` into a
staged directory, their SHA-256 recorded in a manifest, then renamed into place; resume reads them
with ``torch.load(weights_only=True)`` (tensors and plain containers only; no arbitrary
unpickling) after checking the digest, and falls back to the previous checkpoint when the newest
is corrupt. A full disk stops the run with :class:`~selfattn.errors.DiskFull` (exit code 5). Batches are a pure function of (seed, data position), so a resumed run
continues the loss curve of an uninterrupted one exactly (on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from selfattn.devices import amp_dtype, resolve_device
from selfattn.errors import UserError
from selfattn.train.callbacks import Callback, ProgressBar, StopTraining
from selfattn.train.checkpoints import (
    STATE_FILE,
    read_latest,
    set_aside,
    step_dir,
    write_checkpoint,
)
from selfattn.train.config import FinetuneConfig, PretrainConfig
from selfattn.utils import atomic_write_text, autocast_context, flatten

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# train.* keys that may change between a run and its resumption
_RESUMABLE_TRAIN_KEYS = {
    "max_steps", "eval_every", "eval_batches", "eval_batch_size", "checkpoint_every", "early_stopping_patience",
    "early_stopping_metric", "log_every", "device", "precision", "compile", "progress", "resume", "keep_checkpoints",
}
_LOWER_IS_BETTER = ("loss", "perplexity", "ece")


class TrainingDiverged(UserError):
    """The loss became NaN or Inf; the last good checkpoint is kept."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


@dataclass
class TrainResult:
    """What ``pretrain`` / ``finetune`` return."""

    out_dir: Path
    best_dir: Path  # a save_pretrained directory (the best model by the early-stopping metric)
    last_ckpt: Path | None  # the newest training checkpoint's state file (resumable)
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: str | None = None  # "early_stopping" | "callback" | None


@dataclass
class TrainState:
    """Exactly what a training checkpoint (``out_dir/checkpoints/step-<N>/state.pt``) holds, besides its format
    and config: a run restored from it continues the loss curve of an uninterrupted one.

    The counters move as the run goes; ``model``, ``optimizer``, ``scheduler`` and ``rng`` are
    state dicts captured when a checkpoint is written and loaded back on resume.
    """

    step: int = 0  # optimizer steps done
    position: int = 0  # micro-batches drawn: batches are a pure function of (seed, position)
    history: list[dict[str, Any]] = field(default_factory=list)  # read-out and evaluation rows
    best: float | None = None  # best value of the early-stopping metric so far
    bad_evals: int = 0  # evaluations since it last improved (the patience counter)
    best_step: int | None = None  # the step whose model is in best/
    tokens_total: int = 0  # training tokens drawn
    train_time: float = 0.0  # seconds spent training (evaluation and checkpoints excluded)
    model: dict[str, Any] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, list[Any]] = field(default_factory=lambda: {"cpu": [], "cuda": []})  # per rank (dropout streams)

    def to_checkpoint(self, config: dict[str, Any]) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "config": json.dumps(config), **asdict(self)}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "TrainState":
        state = cls(**{f.name: saved[f.name] for f in fields(cls)})
        state.history = list(state.history)
        return state


@dataclass
class _SinceReadout:
    """Accumulators between two loss read-outs (``train.log_every``); never checkpointed."""

    loss: Any  # a device tensor: the sum of micro-losses (one host sync per read-out, not per step)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    last_step: int = 0  # step of the previous read-out (named in divergence messages)


# --------------------------------------------------------------------------- tasks


class _LMTask:
    kind = "lm"
    metric_names = ("val_loss", "val_perplexity")

    def __init__(self, *, cfg: PretrainConfig, model: Any, tokenizer: Any, lm_data: Any) -> None:
        from selfattn.data.lm import LMBatcher

        self.cfg, self.model, self.tokenizer, self.data = cfg, model, tokenizer, lm_data
        t = cfg.train
        self.batcher = LMBatcher(ids=lm_data.train_ids, block_size=cfg.data.block_size, batch_size=t.batch_size, seed=t.seed, sampling=cfg.data.sampling)
        self.tokens_per_batch = t.batch_size * cfg.data.block_size

    def train_batch(self, position: int) -> tuple[dict[str, "torch.Tensor"], int]:
        x, y = self.batcher.get(position)  # [B, T] each
        return {"input_ids": x, "targets": y}, self.tokens_per_batch

    @staticmethod
    def loss(model: Any, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        return model(batch["input_ids"], targets=batch["targets"]).loss

    def evaluate(self, model: Any, device: "torch.device", dtype: "torch.dtype | None") -> dict[str, float]:
        from selfattn.data.lm import lm_eval_batches
        from selfattn.eval.evaluate import lm_loss, perplexity

        t = self.cfg.train
        batches = lm_eval_batches(self.data.val_ids, block_size=self.cfg.data.block_size, batch_size=t.eval_batch_size or t.batch_size, n_batches=t.eval_batches, seed=t.seed)
        loss = lm_loss(model, batches, device=device, amp_dtype=dtype)
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}


class _MLMTask(_LMTask):
    """Masked-LM pretraining of an encoder: the LM windows, masked per position (:mod:`selfattn.data.mlm`)."""

    kind = "mlm"

    def __init__(self, *, cfg: PretrainConfig, model: Any, tokenizer: Any, lm_data: Any) -> None:
        from selfattn.data.mlm import MLMMasking

        super().__init__(cfg=cfg, model=model, tokenizer=tokenizer, lm_data=lm_data)
        self.masking = MLMMasking.for_tokenizer(tokenizer, cfg.mlm_probability)

    def train_batch(self, position: int) -> tuple[dict[str, "torch.Tensor"], int]:
        from selfattn.utils import seeded_generator

        x, _ = self.batcher.get(position)  # [B, T]
        inputs, labels = self.masking.apply(x, seeded_generator(self.cfg.train.seed, "mlm", position))
        return {"input_ids": inputs, "labels": labels}, self.tokens_per_batch

    @staticmethod
    def loss(model: Any, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        return model(batch["input_ids"], labels=batch["labels"]).loss

    def evaluate(self, model: Any, device: "torch.device", dtype: "torch.dtype | None") -> dict[str, float]:
        from selfattn.data.mlm import mlm_eval_batches
        from selfattn.eval.evaluate import masked_lm_loss, perplexity

        t = self.cfg.train
        batches = mlm_eval_batches(self.data.val_ids, self.masking, block_size=self.cfg.data.block_size, batch_size=t.eval_batch_size or t.batch_size, n_batches=t.eval_batches, seed=t.seed)
        loss = masked_lm_loss(model, batches, device=device, amp_dtype=dtype)
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}


class _ClassifierTask:
    kind = "classifier"
    metric_names = ("val_loss", "val_accuracy", "val_f1", "val_ece")

    def __init__(self, *, cfg: FinetuneConfig, model: Any, tokenizer: Any, train_data: Any, val_data: Any) -> None:
        from selfattn.data.classification import ClassificationBatcher

        self.cfg, self.model, self.tokenizer, self.train_data, self.val_data = cfg, model, tokenizer, train_data, val_data
        self.batcher = ClassificationBatcher(
            data=train_data, batch_size=cfg.train.batch_size, seed=cfg.train.seed, pad_id=tokenizer.pad_id,
            token_dropout=cfg.data.token_dropout, unk_id=tokenizer.unk_id,
        )

    def train_batch(self, position: int) -> tuple[dict[str, "torch.Tensor"], int]:
        b = self.batcher.get(position)
        return b, int(b["attention_mask"].sum())

    @staticmethod
    def loss(model: Any, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def evaluate(self, model: Any, device: "torch.device", dtype: "torch.dtype | None") -> dict[str, float]:
        from selfattn.data.classification import classification_eval_batches
        from selfattn.eval.evaluate import (
            classification_metrics,
            classifier_predictions,
        )

        t = self.cfg.train
        batches = classification_eval_batches(self.val_data, batch_size=t.eval_batch_size or t.batch_size, pad_id=self.tokenizer.pad_id)
        probs, y, loss = classifier_predictions(model, batches, len(self.val_data), device=device, amp_dtype=dtype)
        m = classification_metrics(y, probs)
        return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_f1": m["macro_f1"], "val_ece": m["ece"]}


# --------------------------------------------------------------------------- public entry points


def pretrain(cfg: PretrainConfig, out_dir: str | Path, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a DecoderLM (``cfg.objective="clm"``) or a MaskedLM (``"mlm"``) on ``cfg.data``'s corpus, from
    scratch or from ``cfg.init_from``; outputs under ``out_dir`` (see module docstring)."""
    return _Run(cfg, Path(out_dir), callbacks, _build_lm_task).run()


def finetune(cfg: FinetuneConfig, out_dir: str | Path, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a SequenceClassifier (from scratch or ``cfg.init_from``, fully or with LoRA)."""
    return _Run(cfg, Path(out_dir), callbacks, _build_classifier_task).run()


def _shared_tokenizer(run: "_Run", make: Callable[[], Any]) -> Any:
    """Train the tokenizer on rank 0 (or reload it when resuming); other ranks load out_dir/tokenizer."""
    from selfattn.data.tokenization import load_tokenizer
    from selfattn.train.distributed import barrier

    tok_dir = run.out_dir / "tokenizer"
    if run.resuming and tok_dir.is_dir():
        return load_tokenizer(tok_dir)
    if run.dist.is_main:
        tok = make()
        tok.save(tok_dir)
    barrier(run.dist)
    return load_tokenizer(tok_dir) if not run.dist.is_main else tok


def _build_lm_task(run: "_Run") -> _LMTask:
    import torch

    from selfattn.data.lm import load_corpus, prepare_lm_data
    from selfattn.data.tokenization import train_tokenizer
    from selfattn.nn.models import DecoderLM, MaskedLM
    from selfattn.train.distributed import barrier

    cfg: PretrainConfig = run.cfg
    docs: list[str] | None = None
    torch.manual_seed(cfg.train.seed)
    if cfg.init_from:
        model, tok = _pretrained_for(run, cfg)
    else:
        def make_tokenizer() -> Any:
            nonlocal docs
            docs = load_corpus(cfg.data)
            return train_tokenizer(cfg.data.tokenizer, docs, cfg.data.vocab_size)

        tok = _shared_tokenizer(run, make_tokenizer)
        mcfg = _model_config(lambda: cfg.model.to_model_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, context_length=cfg.data.block_size))
        torch.manual_seed(cfg.train.seed)
        model = _model_config(lambda: (MaskedLM if cfg.objective == "mlm" else DecoderLM)(mcfg))
    if run.dist.is_main:
        lm_data = prepare_lm_data(cfg.data, tok, docs)
    barrier(run.dist)
    if not run.dist.is_main:
        lm_data = prepare_lm_data(cfg.data, tok)
    return (_MLMTask if cfg.objective == "mlm" else _LMTask)(cfg=cfg, model=model, tokenizer=tok, lm_data=lm_data)


def _pretrained_for(run: "_Run", cfg: PretrainConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``cfg.init_from`` for continued pretraining with ``cfg.objective``."""
    from selfattn.nn.models import MaskedLM

    pre = _load_init(cfg.init_from or "")
    if pre.tokenizer is None:
        raise UserError(f"init_from {cfg.init_from} has no tokenizer/; continued pretraining needs the tokenizer the model was trained with")
    wanted = ("encoder", "mlm") if cfg.objective == "mlm" else ("lm",)
    if cfg.objective == "clm" and pre.task in ("encoder", "mlm"):
        raise UserError(
            f"init_from {cfg.init_from} is a bidirectional encoder ({pre.task}): it cannot learn or generate text left to "
            "right (objective='clm'). Continue its pretraining with objective=mlm, or fine-tune it as a classifier"
        )
    if pre.task not in wanted:
        raise UserError(f"init_from {cfg.init_from} is a {pre.task}; objective={cfg.objective!r} continues a {' or '.join(wanted)}")
    if cfg.data.block_size > pre.config.context_length:
        raise UserError(f"data.block_size ({cfg.data.block_size}) exceeds init_from's context_length ({pre.config.context_length})")
    model = MaskedLM.from_encoder(pre.model) if pre.task == "encoder" else pre.model
    if run.dist.is_main and not (run.out_dir / "tokenizer").is_dir():
        pre.tokenizer.save(run.out_dir / "tokenizer")
    return model.train(), pre.tokenizer


def _build_classifier_task(run: "_Run") -> _ClassifierTask:
    import torch

    from selfattn.data.classification import prepare_classification_data, read_labelled
    from selfattn.data.tokenization import train_tokenizer
    from selfattn.nn.models import SequenceClassifier
    from selfattn.train.config import ArchConfig
    from selfattn.train.distributed import barrier

    cfg: FinetuneConfig = run.cfg
    n_classes = len(cfg.data.labels)
    torch.manual_seed(cfg.train.seed)
    if cfg.init_from:
        pre = _load_init(cfg.init_from)
        if pre.tokenizer is None:
            raise UserError(f"init_from {cfg.init_from} has no tokenizer/; fine-tuning needs the tokenizer the model was trained with")
        tok = pre.tokenizer
        if pre.task == "lm":
            model = SequenceClassifier.from_decoder(
                pre.model, n_classes, pooling=cfg.head.pooling or "last", causal=True if cfg.head.causal is None else cfg.head.causal, dropout=cfg.head.dropout
            )
        elif pre.task in ("encoder", "mlm"):
            if cfg.head.causal:
                raise UserError(f"init_from {cfg.init_from} is a bidirectional encoder; head.causal=true does not apply")
            model = SequenceClassifier.from_encoder(pre.model, n_classes, pooling=cfg.head.pooling, dropout=cfg.head.dropout)
        else:
            if pre.config.n_classes != n_classes:
                raise UserError(f"init_from {cfg.init_from} is a classifier with {pre.config.n_classes} classes but data.labels has {n_classes}: {cfg.data.labels}")
            updates = {k: v for k, v in (("pooling", cfg.head.pooling), ("dropout", cfg.head.dropout), ("causal", cfg.head.causal)) if v is not None}
            model = SequenceClassifier(pre.config.model_copy(update=updates))
            model.load_state_dict(pre.model.state_dict())
        mcfg = model.cfg
        if run.dist.is_main and not (run.out_dir / "tokenizer").is_dir():
            tok.save(run.out_dir / "tokenizer")
    else:
        def make_tokenizer() -> Any:
            texts, _ = read_labelled(cfg.data.train_path, split=cfg.data.split, text_column=cfg.data.text_column, label_column=cfg.data.label_column, labels=cfg.data.labels, max_rows=cfg.data.max_examples)
            return train_tokenizer(cfg.data.tokenizer, texts, cfg.data.vocab_size)

        tok = _shared_tokenizer(run, make_tokenizer)
        arch = cfg.model or ArchConfig()
        head = {k: v for k, v in (("pooling", cfg.head.pooling), ("dropout", cfg.head.dropout), ("causal", cfg.head.causal)) if v is not None}
        mcfg = _model_config(lambda: arch.to_model_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, context_length=cfg.data.max_length, n_classes=n_classes, **head))
        model = _model_config(lambda: SequenceClassifier(mcfg))
    if cfg.lora is not None:
        from selfattn.nn.lora import apply_lora

        try:
            apply_lora(model, cfg.lora, trainable_extra=("head",))
        except ValueError as exc:
            raise UserError(f"lora: {exc}") from None
    if run.dist.is_main:
        train_data, val_data = prepare_classification_data(cfg.data, tok, max_length=mcfg.context_length)
    barrier(run.dist)
    if not run.dist.is_main:
        train_data, val_data = prepare_classification_data(cfg.data, tok, max_length=mcfg.context_length)
    return _ClassifierTask(cfg=cfg, model=model, tokenizer=tok, train_data=train_data, val_data=val_data)


def _load_init(spec: str) -> Any:
    """The :class:`~selfattn.io.checkpoint.Pretrained` ``init_from`` names: a checkpoint directory (see
    :func:`_init_dir`), or ``gguf:FILE`` (also ``gguf:pkg:PACKAGE/file.gguf``) imported in memory."""
    from selfattn.io.checkpoint import Pretrained, load_pretrained
    from selfattn.io.gguf import GGUF_PREFIX, import_gguf

    if spec.startswith(GGUF_PREFIX):
        model, tokenizer = import_gguf(spec[len(GGUF_PREFIX) :])
        return Pretrained(model=model, tokenizer=tokenizer, config=model.cfg, task="lm", extra={"imported": {"gguf_source": spec}})
    return load_pretrained(_init_dir(spec))


def _init_dir(path: str) -> Path:
    """``init_from`` may name a save_pretrained dir or a training output dir (then its best/), also as a
    ``pkg:PACKAGE/path`` inside an installed package."""
    from selfattn.io.sources import PKG_PREFIX, resolve_package_path

    p = resolve_package_path(path) if path.startswith(PKG_PREFIX) else Path(os.path.expandvars(path)).expanduser()
    if not (p / "config.json").is_file() and (p / "best" / "config.json").is_file():
        return p / "best"
    return p


def _model_config(make: Callable[[], Any]) -> Any:
    from pydantic import ValidationError

    from selfattn.config import format_validation_error

    try:
        return make()
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "model config")) from None
    except ValueError as exc:  # the model constructors name the bad value
        raise UserError(f"invalid model config: {exc}") from None


# --------------------------------------------------------------------------- the run


class _Run:
    """One training run: ``run`` = setup, (resume), train loop, finish; each step is a method below."""

    def __init__(self, cfg: PretrainConfig | FinetuneConfig, out_dir: Path, callbacks: Sequence[Callback], build: Callable[["_Run"], Any]) -> None:
        self.cfg, self.out_dir, self.user_callbacks, self.build = cfg, out_dir, list(callbacks), build
        self.ckpt_root = out_dir / "checkpoints"
        self.last_ckpt: Path | None = None  # the newest good checkpoint's state file
        self.best_dir = out_dir / "best"

    def run(self) -> TrainResult:
        from selfattn.train import distributed

        self.device = resolve_device(self.cfg.train.device)
        self.dist = distributed.setup(self.device)
        created = not self.out_dir.exists()
        try:
            try:
                saved = self._setup_process()
                self.task = self.build(self)
                self.state = self._setup_training(saved)
            except UserError:
                # bad input (init_from, data, config) is found before the first step: leave nothing behind
                if created and self.dist.is_main:
                    shutil.rmtree(self.out_dir, ignore_errors=True)
                raise
            stopped = self._train()
            return self._finish(stopped)
        finally:
            self._release_ddp()
            distributed.teardown(self.dist)

    def _release_ddp(self) -> None:
        """Drop the DDP wrapper before the process group goes. It holds the group, so
        ``destroy_process_group`` left it alive until interpreter exit, where freeing it aborted the
        process after its result was printed ("terminate called without an active exception",
        SIGABRT; gloo on CPU, torch 2.13, 1 run in 2-6 on a loaded machine, also with a bare DDP
        script; 20 of 20 clean with the wrapper freed first)."""
        import gc

        if self.dist.enabled and getattr(self, "model", None) is not None:
            self.model = None
            gc.collect()  # the wrapper sits in reference cycles (its hooks)

    # ---- setup
    def _setup_process(self) -> TrainState | None:
        """Device flags, autocast dtype, the checkpoint to resume from, out_dir/config.yaml."""
        import torch

        from selfattn.train import distributed

        t = self.cfg.train
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.amp = amp_dtype(t.precision, self.device)
        if t.batch_size % self.dist.world_size:
            raise UserError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes ({self.dist.world_size})")
        saved = self._read_checkpoint()
        self.resuming = saved is not None
        if self.dist.is_main:
            for d in self._corrupt_dirs:
                set_aside(d)
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _write_yaml(self.out_dir / "config.yaml", self.cfg.model_dump(mode="json"))
        distributed.barrier(self.dist)
        return saved

    def _read_checkpoint(self) -> TrainState | None:
        """The newest good checkpoint's state (a corrupt newer one is named and skipped), or None."""
        resume = self.cfg.train.resume
        self._corrupt_dirs: list[Path] = []
        self.corrupt_checkpoints: list[str] = []
        loaded = read_latest(self.ckpt_root) if resume is not False else None
        if loaded is None:
            if resume is True:
                raise UserError(f"train.resume=true but there is no checkpoint in {self.ckpt_root}")
            return None
        for problem in loaded.corrupt:
            log.warning("skipping a corrupt checkpoint: %s; resuming from %s (step %d) instead", problem, loaded.path, loaded.step)
        self._corrupt_dirs, self.corrupt_checkpoints = loaded.corrupt_dirs, loaded.corrupt
        saved = loaded.saved
        if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"cannot resume from {loaded.path}: not a selfattn training checkpoint (format {CHECKPOINT_FORMAT})")
        diffs = _config_differences(json.loads(saved["config"]), self.cfg.model_dump(mode="json"))
        if diffs:
            shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diffs[:8])
            raise UserError(
                f"the checkpoint in {self.out_dir} was written with a different config ({shown}). "
                "Use a new output directory, or set train.resume=false to start over there."
            )
        self.last_ckpt, self._resumed_step = loaded.path, loaded.step
        return TrainState.from_checkpoint(saved)

    def _setup_training(self, saved: TrainState | None) -> TrainState:
        """Model on the device, optimizer, schedule, early-stopping metric, restored state, callbacks."""
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        from selfattn.nn.lora import trainable_parameters
        from selfattn.train.optim import build_optimizer, build_scheduler

        cfg, t, task, dev = self.cfg, self.cfg.train, self.task, self.device
        self.raw_model = raw = task.model.to(dev)
        self.params = [p for p in raw.parameters() if p.requires_grad]
        self.opt = build_optimizer(raw, cfg.optim, fused=dev.type in ("cuda", "cpu"))  # fused: one kernel per tensor
        self.sched = build_scheduler(self.opt, cfg.optim, t.max_steps)
        self.metric = t.early_stopping_metric or ("val_accuracy" if task.kind == "classifier" else "val_loss")
        if self.metric not in task.metric_names:
            raise UserError(f"train.early_stopping_metric {self.metric!r} is not computed for a {task.kind} run; choose one of {', '.join(task.metric_names)}")
        self.lower_is_better = any(s in self.metric for s in _LOWER_IS_BETTER)

        torch.manual_seed(t.seed + 1000 * self.dist.rank)  # dropout stream (init used t.seed)
        state = saved or TrainState()
        if saved is not None:
            raw.load_state_dict(saved.model)
            self.opt.load_state_dict(saved.optimizer)
            self.sched.load_state_dict(saved.scheduler)
            if self.dist.rank < len(saved.rng["cpu"]):
                torch.set_rng_state(saved.rng["cpu"][self.dist.rank])
            if dev.type == "cuda" and self.dist.rank < len(saved.rng["cuda"]):
                torch.cuda.set_rng_state(saved.rng["cuda"][self.dist.rank], dev)
            state.model, state.optimizer, state.scheduler, state.rng = {}, {}, {}, {"cpu": [], "cuda": []}  # live in the objects now
        model: Any = torch.compile(raw) if t.compile else raw
        self.model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None) if self.dist.enabled else model

        self.callbacks = ([ProgressBar(enabled=t.progress)] + self.user_callbacks) if self.dist.is_main else []
        counts = trainable_parameters(raw)
        info = {
            "task": task.kind, "config": cfg.model_dump(mode="json"), "n_params": counts["total"], "trainable_params": counts["trainable"],
            "device": str(dev), "world_size": self.dist.world_size, "start_step": state.step, "max_steps": t.max_steps, "out_dir": str(self.out_dir),
            "amp_dtype": str(self.amp) if self.amp else "fp32", "vocab_size": task.tokenizer.vocab_size,
            "resumed_from": str(self.last_ckpt) if self.last_ckpt else None, "corrupt_checkpoints": list(self.corrupt_checkpoints),
        }
        self._fire("on_train_start", info)
        self._last_good: int | None = state.step if self.last_ckpt else None
        return state

    # ---- the loop
    def _train(self) -> str | None:
        """Steps until max_steps, early stopping or a callback's StopTraining; returns why it stopped early."""
        import torch

        t, state = self.cfg.train, self.state
        since = _SinceReadout(loss=torch.zeros((), device=self.device), last_step=state.step)
        stopped: str | None = None
        last_eval = -1
        try:
            while state.step < t.max_steps and stopped is None:
                self._train_step(since)
                if state.step % t.log_every == 0 or state.step == t.max_steps:
                    stopped = self._read_out(since)
                if ((state.step % t.eval_every == 0 or state.step == t.max_steps) and stopped is None) or (stopped == "callback" and last_eval != state.step):
                    last_eval = state.step  # a stopped run ends evaluated
                    stopped = self._evaluate_and_keep_best(since) or stopped
                if stopped is not None or state.step == t.max_steps or (t.checkpoint_every and state.step % t.checkpoint_every == 0):
                    stopped = self._save_checkpoint(since) or stopped
        finally:
            for cb in self.callbacks:
                if isinstance(cb, ProgressBar):
                    cb.on_train_end(None)
        return stopped

    def _micro_loss(self, batch: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The loss of one micro-batch, scaled for gradient accumulation."""
        with autocast_context(self.device, self.amp):
            return self.task.loss(self.model, batch) / self.cfg.train.grad_accum

    def _train_step(self, since: _SinceReadout) -> None:
        """One optimizer step over ``grad_accum`` micro-batches (DDP syncs gradients on the last only)."""
        import torch

        from selfattn.train import distributed

        t, state, dev = self.cfg.train, self.state, self.device
        started = time.perf_counter()
        for micro in range(t.grad_accum):
            batch, n_tok = self.task.train_batch(state.position)
            state.position += 1
            state.tokens_total += n_tok
            since.tokens += n_tok
            batch = {k: _to_device(distributed.shard(v, self.dist), dev, pin=dev.type == "cuda") for k, v in batch.items()}
            last = not self.dist.enabled or micro == t.grad_accum - 1
            with contextlib.nullcontext() if last else self.model.no_sync():
                loss = self._micro_loss(batch)
                loss.backward()
            since.loss += loss.detach()
        clip = self.cfg.optim.grad_clip
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip) if clip > 0 else None
        self.lr_used = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        state.step += 1
        since.steps += 1
        elapsed = time.perf_counter() - started
        state.train_time += elapsed
        since.seconds += elapsed

    def _read_out(self, since: _SinceReadout) -> str | None:
        """Mean training loss since the last read-out (one host sync): a history row and on_step."""
        from selfattn.train import distributed

        state = self.state
        loss_mean = float(distributed.all_reduce_mean(since.loss, self.dist)) / since.steps
        if not math.isfinite(loss_mean):
            self._diverged(since.last_step, loss_mean)
        row = {"step": state.step, "train_loss": loss_mean, "lr": self.lr_used, "tokens": state.tokens_total, "tokens_per_s": since.tokens / max(since.seconds, 1e-9)}
        if self.grad_norm is not None:
            row["grad_norm"] = float(self.grad_norm)
        state.history.append(row)
        since.loss.zero_()
        since.steps, since.tokens, since.seconds, since.last_step = 0, 0, 0.0, state.step
        return self._fire("on_step", state.step, dict(row))

    def _evaluate_and_keep_best(self, since: _SinceReadout) -> str | None:
        """Validation metrics; a better model goes to best/; patience counts the others."""
        state, t = self.state, self.cfg.train
        metrics = self._evaluate()
        if not math.isfinite(metrics["val_loss"]):
            self._diverged(since.last_step, metrics["val_loss"], what="validation loss")
        value = metrics[self.metric]
        if state.best is None or (value < state.best if self.lower_is_better else value > state.best):
            state.best, state.bad_evals, state.best_step = value, 0, state.step
            self._save_best(metrics)
        else:
            state.bad_evals += 1
        state.history.append({"step": state.step, **metrics})
        stopped = self._fire("on_eval", state.step, dict(metrics))
        if t.early_stopping_patience and state.bad_evals >= t.early_stopping_patience and stopped is None:
            log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %s)", state.step, self.metric, state.bad_evals, state.best, state.best_step)
            stopped = "early_stopping"
        return stopped

    def _evaluate(self) -> dict[str, float]:
        from selfattn.train import distributed

        metrics = self.task.evaluate(self.raw_model, self.device, self.amp) if self.dist.is_main else None
        return distributed.broadcast_object(metrics, self.dist)  # type: ignore[return-value]

    # ---- saving
    def _save_best(self, metrics: dict[str, float]) -> None:
        if not self.dist.is_main:
            return
        from selfattn.io.checkpoint import save_pretrained

        extra = {"step": self.state.step, "metrics": metrics, "data": self.cfg.data.model_dump(mode="json"), "train_config": self.cfg.model_dump(mode="json")}
        save_pretrained(self.raw_model, self.best_dir, tokenizer=self.task.tokenizer, extra=extra)

    def _save_checkpoint(self, since: _SinceReadout) -> str | None:
        """The TrainState (weights, optimizer, schedule, every rank's RNG) to checkpoints/step-<N>/, atomically; on_checkpoint."""
        import torch

        from selfattn.train import distributed

        loss_now = float(distributed.all_reduce_mean(since.loss, self.dist))  # a NaN since the read-out is not saved
        if not math.isfinite(loss_now):
            self._diverged(since.last_step, loss_now)
        rng_cpu = distributed.gather_object(torch.get_rng_state(), self.dist)  # gathered on all ranks; rank 0 writes
        rng_cuda = distributed.gather_object(torch.cuda.get_rng_state(self.device), self.dist) if self.device.type == "cuda" else []
        if self.dist.is_main:
            snapshot = TrainState(**{**vars(self.state), "model": self.raw_model.state_dict(), "optimizer": self.opt.state_dict(),
                                     "scheduler": self.sched.state_dict(), "rng": {"cpu": rng_cpu, "cuda": rng_cuda}})
            payload = snapshot.to_checkpoint(self.cfg.model_dump(mode="json"))
            self.last_ckpt = write_checkpoint(self.ckpt_root, self.state.step, payload, keep=self.cfg.train.keep_checkpoints)
            self._last_good = self.state.step
        else:
            self.last_ckpt = step_dir(self.ckpt_root, self.state.step) / STATE_FILE
        return self._fire("on_checkpoint", self.state.step, self.last_ckpt)

    # ---- events and errors
    def _fire(self, event: str, *args: Any, callbacks: Sequence[Callback] | None = None) -> str | None:
        """Call ``event`` on every callback (rank 0); StopTraining -> "callback"; other errors propagate on every rank."""
        from selfattn.train import distributed

        outcome: tuple[str, BaseException | None] = ("ok", None)
        for cb in self.callbacks if callbacks is None else callbacks:
            try:
                getattr(cb, event)(*args)
            except StopTraining:
                outcome = ("stop", None)
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                outcome = ("error", exc)
                break
        code = distributed.broadcast_object(outcome[0], self.dist) if event != "on_train_end" else outcome[0]
        if outcome[1] is not None:
            raise outcome[1]
        if code == "error":
            raise RuntimeError(f"rank 0 failed in callback {event}; stopping this rank")
        return "callback" if code == "stop" else None

    def _diverged(self, last_step: int, value: float, what: str = "training loss") -> None:
        kept = f"the last good checkpoint is {self.last_ckpt} (step {self._last_good})" if self._last_good is not None else "no checkpoint was written before it"
        raise TrainingDiverged(
            f"training diverged: the {what} became {value} between steps {last_step} and {self.state.step}; {kept}. "
            "Lower optim.lr, raise optim.warmup_steps or keep optim.grad_clip on, then resume or start over."
        )

    # ---- finish
    def _finish(self, stopped: str | None) -> TrainResult:
        """Evaluate best/, write history.json, metrics.json and plots; on_train_end."""
        from selfattn.train import distributed

        state = self.state
        if self.dist.is_main and not (self.best_dir / "config.json").is_file():
            self._save_best({})
        distributed.barrier(self.dist)
        metrics = self._final_metrics() if self.dist.is_main else {}
        metrics = distributed.broadcast_object(metrics, self.dist)  # type: ignore[assignment]
        result = TrainResult(out_dir=self.out_dir, best_dir=self.best_dir, last_ckpt=self.last_ckpt, metrics=metrics, history=state.history, stopped_early=stopped)
        self._fire("on_train_end", result, callbacks=[cb for cb in self.callbacks if not isinstance(cb, ProgressBar)])
        return result

    def _final_metrics(self) -> dict[str, float]:
        from selfattn.eval.evaluate import evaluate_checkpoint
        from selfattn.eval.plots import plot_learning_curves

        state, history = self.state, self.state.history
        evals = [h for h in history if "val_loss" in h]
        steps = [h for h in history if "train_loss" in h]
        metrics: dict[str, float] = {"steps": float(state.step)}
        if steps:
            metrics["train_loss"] = steps[-1]["train_loss"]
            metrics["tokens"] = float(steps[-1]["tokens"])
        if evals:
            metrics.update({k: float(v) for k, v in evals[-1].items() if k != "step"})
            best_row = next((h for h in evals if h["step"] == state.best_step), None)
            if best_row is not None:  # the evaluation that chose best/: best_val_loss, best_val_accuracy, ...
                metrics.update({f"best_{k}": float(v) for k, v in best_row.items() if k != "step"})
                metrics["best_step"] = float(state.best_step)
        metrics["tokens_per_s"] = state.tokens_total / state.train_time if state.train_time > 0 else 0.0
        metrics["train_time_s"] = state.train_time
        atomic_write_text(self.out_dir / "history.json", json.dumps(history, indent=1) + "\n")
        if history:
            plot_learning_curves(history, self.out_dir / "plots" / "learning_curves.png")
        t = self.cfg.train
        ev = evaluate_checkpoint(self.best_dir, self.cfg.data, self.out_dir / "eval", batch_size=t.eval_batch_size or t.batch_size, device=str(self.device), n_attention_examples=1, learning_curves=False)
        metrics.update({f"best_{k}": float(v) for k, v in ev.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        atomic_write_text(self.out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        return metrics


def _to_device(t: "torch.Tensor", device: "torch.device", pin: bool) -> "torch.Tensor":
    if device.type == "cpu":
        return t
    if pin:
        t = t.pin_memory()
    return t.to(device, non_blocking=pin)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ, ignoring train.* keys that may change on resume."""
    a, b = flatten(saved), flatten(now)
    out = []
    for k in sorted(set(a) | set(b)):
        if k.startswith("train.") and k.split(".", 1)[1] in _RESUMABLE_TRAIN_KEYS:
            continue
        if a.get(k) != b.get(k):
            out.append((k, a.get(k), b.get(k)))
    return out
