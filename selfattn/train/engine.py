"""The training engine: one loop for causal-LM pretraining and classifier fine-tuning.

Shape of a run (``pretrain`` / ``finetune``)::

    setup      device, DDP, seeds, tokenizer, data, model (+ LoRA), AdamW, warmup+cosine schedule
    resume     from out_dir/checkpoints/last.pt when present (config must match)
    train      micro-batches -> backward (grad accumulation, DDP no_sync) -> clip -> step
               every log_every: loss read-out (NaN/Inf -> TrainingDiverged), on_step
               every eval_every: evaluate, keep the best model (out_dir/best), early stopping, on_eval
               every checkpoint_every and at the end: atomic training checkpoint, on_checkpoint
    finish     evaluate the best model (out_dir/eval), history.json, metrics.json, plots, on_train_end

Output directory::

    out_dir/config.yaml  tokenizer/  checkpoints/last.pt  best/ (save_pretrained)
            history.json  metrics.json  plots/learning_curves.png  eval/{metrics.json, plots/}

Training checkpoints are written with ``torch.save`` to a temporary file then ``os.replace``d, and
read back with ``torch.load(weights_only=True)`` (tensors and plain containers only; no
arbitrary unpickling). Batches are a pure function of (seed, data position), so a resumed run
continues the loss curve of an uninterrupted one exactly (on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from selfattn.errors import UserError
from selfattn.train.callbacks import Callback, ProgressBar, StopTraining
from selfattn.train.config import FinetuneConfig, PretrainConfig

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# train.* keys that may change between a run and its resumption
_RESUMABLE_TRAIN_KEYS = {
    "max_steps", "eval_every", "eval_batches", "eval_batch_size", "checkpoint_every", "early_stopping_patience",
    "early_stopping_metric", "log_every", "device", "precision", "compile", "progress", "resume", "debug_poison_step",
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
    last_ckpt: Path  # the training checkpoint (resumable)
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: str | None = None  # "early_stopping" | "callback" | None


# --------------------------------------------------------------------------- devices


def resolve_device(spec: str = "auto") -> "torch.device":
    """``auto`` picks cuda > mps > cpu; under torchrun on CUDA each rank takes ``cuda:LOCAL_RANK``."""
    import torch

    if spec == "auto":
        if torch.cuda.is_available():
            spec = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            spec = "mps"
        else:
            spec = "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise UserError(f"train.device {spec!r} is not a device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device {spec!r} asks for CUDA but torch.cuda.is_available() is False")
    return device


def amp_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype: bf16 on CUDA for ``auto``; None = plain fp32."""
    import torch

    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None if precision == "auto" else _refuse(f"train.precision 'bf16' is not supported on {device}")
    return torch.bfloat16


def _refuse(message: str) -> Any:
    raise UserError(message)


# --------------------------------------------------------------------------- tasks


class _LMTask:
    kind = "lm"
    metric_names = ("val_loss", "val_perplexity")

    def __init__(self, *, cfg: PretrainConfig, model: Any, tokenizer: Any, lm_data: Any) -> None:
        from selfattn.data import LMBatcher

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
        from selfattn.data import lm_eval_batches
        from selfattn.evaluate import lm_loss, perplexity

        t = self.cfg.train
        batches = lm_eval_batches(self.data.val_ids, block_size=self.cfg.data.block_size, batch_size=t.eval_batch_size or t.batch_size, n_batches=t.eval_batches, seed=t.seed)
        loss = lm_loss(model, batches, device=device, amp_dtype=dtype)
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}


class _ClassifierTask:
    kind = "classifier"
    metric_names = ("val_loss", "val_accuracy", "val_f1", "val_ece")

    def __init__(self, *, cfg: FinetuneConfig, model: Any, tokenizer: Any, train_data: Any, val_data: Any) -> None:
        from selfattn.data import ClassificationBatcher

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
        from selfattn.data import classification_eval_batches
        from selfattn.evaluate import classification_metrics, classifier_predictions

        t = self.cfg.train
        batches = classification_eval_batches(self.val_data, batch_size=t.eval_batch_size or t.batch_size, pad_id=self.tokenizer.pad_id)
        probs, y, loss = classifier_predictions(model, batches, len(self.val_data), device=device, amp_dtype=dtype)
        m = classification_metrics(y, probs)
        return {"val_loss": loss, "val_accuracy": m["accuracy"], "val_f1": m["macro_f1"], "val_ece": m["ece"]}


# --------------------------------------------------------------------------- public entry points


def pretrain(cfg: PretrainConfig, out_dir: str | Path, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a DecoderLM on ``cfg.data``'s corpus; outputs under ``out_dir`` (see module docstring)."""
    return _Run(cfg, Path(out_dir), callbacks, _build_lm_task).run()


def finetune(cfg: FinetuneConfig, out_dir: str | Path, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a SequenceClassifier (from scratch or ``cfg.init_from``, fully or with LoRA)."""
    return _Run(cfg, Path(out_dir), callbacks, _build_classifier_task).run()


def _shared_tokenizer(run: "_Run", make: Callable[[], Any]) -> Any:
    """Train the tokenizer on rank 0 (or reload it when resuming); other ranks load out_dir/tokenizer."""
    from selfattn.tokenization import load_tokenizer
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

    from selfattn.data import load_corpus, prepare_lm_data, train_tokenizer
    from selfattn.models import DecoderLM
    from selfattn.train.distributed import barrier

    cfg: PretrainConfig = run.cfg
    docs: list[str] | None = None

    def make_tokenizer() -> Any:
        nonlocal docs
        docs = load_corpus(cfg.data)
        return train_tokenizer(cfg.data.tokenizer, docs, cfg.data.vocab_size)

    tok = _shared_tokenizer(run, make_tokenizer)
    if run.dist.is_main:
        lm_data = prepare_lm_data(cfg.data, tok, docs)
    barrier(run.dist)
    if not run.dist.is_main:
        lm_data = prepare_lm_data(cfg.data, tok)
    mcfg = _model_config(lambda: cfg.model.to_model_config(vocab_size=tok.vocab_size, pad_token_id=tok.pad_id, context_length=cfg.data.block_size))
    torch.manual_seed(cfg.train.seed)
    model = _model_config(lambda: DecoderLM(mcfg))
    return _LMTask(cfg=cfg, model=model, tokenizer=tok, lm_data=lm_data)


def _build_classifier_task(run: "_Run") -> _ClassifierTask:
    import torch

    from selfattn.data import prepare_classification_data, read_labelled, train_tokenizer
    from selfattn.models import SequenceClassifier
    from selfattn.train.config import ArchConfig
    from selfattn.train.distributed import barrier

    cfg: FinetuneConfig = run.cfg
    n_classes = len(cfg.data.labels)
    torch.manual_seed(cfg.train.seed)
    if cfg.init_from:
        from selfattn.checkpoint import load_pretrained

        pre = load_pretrained(_init_dir(cfg.init_from))
        if pre.tokenizer is None:
            raise UserError(f"init_from {cfg.init_from} has no tokenizer/; fine-tuning needs the tokenizer the model was trained with")
        tok = pre.tokenizer
        if pre.task == "lm":
            model = SequenceClassifier.from_decoder(
                pre.model, n_classes, pooling=cfg.head.pooling or "last", causal=True if cfg.head.causal is None else cfg.head.causal, dropout=cfg.head.dropout
            )
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
        from selfattn.lora import apply_lora

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


def _init_dir(path: str) -> Path:
    """``init_from`` may name a save_pretrained dir or a training output dir (then its best/)."""
    p = Path(os.path.expandvars(path)).expanduser()
    if not (p / "config.json").is_file() and (p / "best" / "config.json").is_file():
        return p / "best"
    return p


def _model_config(make: Callable[[], Any]) -> Any:
    from pydantic import ValidationError

    try:
        return make()
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'model'}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid model config: {msgs}") from None
    except ValueError as exc:  # the model constructors name the bad value
        raise UserError(f"invalid model config: {exc}") from None


# --------------------------------------------------------------------------- the run


class _Run:
    def __init__(self, cfg: PretrainConfig | FinetuneConfig, out_dir: Path, callbacks: Sequence[Callback], build: Callable[["_Run"], Any]) -> None:
        self.cfg, self.out_dir, self.user_callbacks, self.build = cfg, out_dir, list(callbacks), build
        self.ckpt_path = out_dir / "checkpoints" / "last.pt"
        self.best_dir = out_dir / "best"

    # ---- setup
    def run(self) -> TrainResult:
        import torch

        from selfattn.train import distributed

        t = self.cfg.train
        self.device = resolve_device(t.device)
        self.dist = distributed.setup(self.device)
        try:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                torch.backends.cuda.matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            self.amp = amp_dtype(t.precision, self.device)
            if t.batch_size % self.dist.world_size:
                raise UserError(f"train.batch_size ({t.batch_size}) must be divisible by the number of processes ({self.dist.world_size})")
            state = self._read_checkpoint()
            self.resuming = state is not None
            if self.dist.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                _write_yaml(self.out_dir / "config.yaml", self.cfg.model_dump(mode="json"))
            distributed.barrier(self.dist)
            self.task = self.build(self)
            return self._train(state)
        finally:
            distributed.teardown(self.dist)

    def _read_checkpoint(self) -> dict[str, Any] | None:
        import torch

        resume = self.cfg.train.resume
        if resume is False or not self.ckpt_path.is_file():
            if resume is True:
                raise UserError(f"train.resume=true but there is no checkpoint at {self.ckpt_path}")
            return None
        try:
            state = torch.load(self.ckpt_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # unreadable / not a weights-only file
            raise UserError(f"cannot resume from {self.ckpt_path}: {type(exc).__name__}: {exc}") from None
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise UserError(f"cannot resume from {self.ckpt_path}: not a selfattn training checkpoint (format {CHECKPOINT_FORMAT})")
        saved = json.loads(state["config"])
        diffs = _config_differences(saved, self.cfg.model_dump(mode="json"))
        if diffs:
            shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in diffs[:8])
            raise UserError(
                f"the checkpoint in {self.out_dir} was written with a different config ({shown}). "
                "Use a new output directory, or set train.resume=false to start over there."
            )
        return state

    def _train(self, state: dict[str, Any] | None) -> TrainResult:
        import torch
        from torch.nn.parallel import DistributedDataParallel as DDP

        from selfattn.train import distributed
        from selfattn.train.optim import build_optimizer, build_scheduler

        cfg, t, task, dev = self.cfg, self.cfg.train, self.task, self.device
        raw = task.model.to(dev)
        self.raw_model = raw
        params = [p for p in raw.parameters() if p.requires_grad]
        opt = build_optimizer(raw, cfg.optim, fused=dev.type == "cuda")
        sched = build_scheduler(opt, cfg.optim, t.max_steps)
        metric = t.early_stopping_metric or ("val_loss" if task.kind == "lm" else "val_accuracy")
        if metric not in task.metric_names:
            raise UserError(f"train.early_stopping_metric {metric!r} is not computed for a {task.kind} run; choose one of {', '.join(task.metric_names)}")
        lower_better = any(s in metric for s in _LOWER_IS_BETTER)

        step, position, history = 0, 0, []
        best, bad_evals, best_step = None, 0, None
        torch.manual_seed(t.seed + 1000 * self.dist.rank)  # dropout stream (init used t.seed)
        if state is not None:
            raw.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            rng = state["rng"]
            if self.dist.rank < len(rng["cpu"]):
                torch.set_rng_state(rng["cpu"][self.dist.rank])
            if dev.type == "cuda" and self.dist.rank < len(rng["cuda"]):
                torch.cuda.set_rng_state(rng["cuda"][self.dist.rank], dev)
            step, position, history = state["step"], state["position"], list(state["history"])
            best, bad_evals, best_step = state["best"], state["bad_evals"], state["best_step"]
            tokens_resumed, time_resumed = state["tokens_total"], state["train_time"]
        model: Any = torch.compile(raw) if t.compile else raw
        if self.dist.enabled:
            model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

        callbacks: list[Callback] = ([ProgressBar(enabled=t.progress)] + self.user_callbacks) if self.dist.is_main else []
        from selfattn.lora import trainable_parameters

        counts = trainable_parameters(raw)
        info = {
            "task": task.kind, "config": cfg.model_dump(mode="json"), "n_params": counts["total"], "trainable_params": counts["trainable"],
            "device": str(dev), "world_size": self.dist.world_size, "start_step": step, "max_steps": t.max_steps, "out_dir": str(self.out_dir),
            "amp_dtype": str(self.amp) if self.amp else "fp32", "vocab_size": task.tokenizer.vocab_size,
        }
        self._fire(callbacks, "on_train_start", info)

        pin = dev.type == "cuda"
        loss_acc = torch.zeros((), device=dev)  # sum of micro-losses since the last read-out
        steps_acc, tokens_acc = 0, 0
        tokens_total, train_time = (tokens_resumed, time_resumed) if state is not None else (0, 0.0)
        t_last = time.perf_counter()
        stopped: str | None = None
        last_logged, last_eval = step, -1
        poison = t.debug_poison_step
        self._last_good = None
        try:
            while step < t.max_steps and stopped is None:
                for micro in range(t.grad_accum):
                    batch, n_tok = task.train_batch(position)
                    position += 1
                    tokens_acc += n_tok
                    batch = {k: _to_device(distributed.shard(v, self.dist), dev, pin) for k, v in batch.items()}
                    sync = contextlib.nullcontext() if not self.dist.enabled or micro == t.grad_accum - 1 else model.no_sync()
                    with sync:
                        with _autocast(dev, self.amp):
                            loss = task.loss(model, batch) / t.grad_accum
                        if poison is not None and step + 1 == poison:
                            loss = loss * float("nan")
                        loss.backward()
                    loss_acc += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
                lr_used = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                steps_acc += 1

                if step % t.log_every == 0 or step == t.max_steps:
                    loss_mean = float(distributed.all_reduce_mean(loss_acc, self.dist)) / steps_acc
                    now = time.perf_counter()
                    train_time += now - t_last
                    interval = now - t_last
                    t_last = now
                    tokens_total += tokens_acc
                    if not math.isfinite(loss_mean):
                        self._diverged(step, last_logged, loss_mean)
                    row = {"step": step, "train_loss": loss_mean, "lr": lr_used, "tokens": tokens_total, "tokens_per_s": tokens_acc / max(interval, 1e-9)}
                    if grad_norm is not None:
                        row["grad_norm"] = float(grad_norm)
                    history.append(row)
                    loss_acc.zero_()
                    steps_acc, tokens_acc, last_logged = 0, 0, step
                    stopped = self._fire(callbacks, "on_step", step, dict(row))

                do_eval = step % t.eval_every == 0 or step == t.max_steps
                if (do_eval and stopped is None) or (stopped == "callback" and last_eval != step):  # a stopped run ends evaluated
                    last_eval = step
                    metrics = self._evaluate(task)
                    if not math.isfinite(metrics["val_loss"]):
                        self._diverged(step, last_logged, metrics["val_loss"], what="validation loss")
                    value = metrics[metric]
                    improved = best is None or (value < best if lower_better else value > best)
                    if improved:
                        best, bad_evals, best_step = value, 0, step
                        self._save_best(task, metrics, step)
                    else:
                        bad_evals += 1
                    history.append({"step": step, **metrics})
                    stopped = self._fire(callbacks, "on_eval", step, dict(metrics)) or stopped
                    if t.early_stopping_patience and bad_evals >= t.early_stopping_patience and stopped is None:
                        log.info("early stopping at step %d: %s has not improved for %d evaluations (best %.4f at step %s)", step, metric, bad_evals, best, best_step)
                        stopped = "early_stopping"
                    t_last = time.perf_counter()  # evaluation time is not training time

                if stopped is not None or step == t.max_steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    loss_now = float(distributed.all_reduce_mean(loss_acc, self.dist))
                    if not math.isfinite(loss_now):
                        self._diverged(step, last_logged, loss_now)
                    ckpt_state = {
                        "step": step, "position": position, "history": history, "best": best, "bad_evals": bad_evals, "best_step": best_step,
                        "tokens_total": tokens_total + tokens_acc, "train_time": train_time,
                        "model": raw.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    }
                    self._save_checkpoint(ckpt_state)
                    stopped = self._fire(callbacks, "on_checkpoint", step, self.ckpt_path) or stopped
                    t_last = time.perf_counter()
        finally:
            for cb in callbacks:
                if isinstance(cb, ProgressBar):
                    cb.on_train_end(None)

        if self.dist.is_main and not (self.best_dir / "config.json").is_file():
            self._save_best(task, {}, step)
        distributed.barrier(self.dist)
        result = self._finish(history, step, tokens_total, train_time, stopped, best_step)
        self._fire([cb for cb in callbacks if not isinstance(cb, ProgressBar)], "on_train_end", result)
        return result

    # ---- pieces
    def _fire(self, callbacks: Sequence[Callback], event: str, *args: Any) -> str | None:
        """Call ``event`` on every callback (rank 0); StopTraining -> "callback"; other errors propagate on every rank."""
        from selfattn.train import distributed

        outcome: tuple[str, BaseException | None] = ("ok", None)
        for cb in callbacks:
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

    def _evaluate(self, task: Any) -> dict[str, float]:
        from selfattn.train import distributed

        metrics = task.evaluate(self.raw_model, self.device, self.amp) if self.dist.is_main else None
        return distributed.broadcast_object(metrics, self.dist)  # type: ignore[return-value]

    def _save_best(self, task: Any, metrics: dict[str, float], step: int) -> None:
        if not self.dist.is_main:
            return
        from selfattn.checkpoint import save_pretrained

        extra = {"step": step, "metrics": metrics, "data": self.cfg.data.model_dump(mode="json"), "train_config": self.cfg.model_dump(mode="json")}
        save_pretrained(self.raw_model, self.best_dir, tokenizer=task.tokenizer, extra=extra)

    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch

        from selfattn.train import distributed

        # every rank's RNG (dropout streams), gathered on all ranks; rank 0 writes
        rng_cpu = distributed.gather_object(torch.get_rng_state(), self.dist)
        rng_cuda = distributed.gather_object(torch.cuda.get_rng_state(self.device), self.dist) if self.device.type == "cuda" else []
        if not self.dist.is_main:
            return
        state = {"format": CHECKPOINT_FORMAT, "config": json.dumps(self.cfg.model_dump(mode="json")), "rng": {"cpu": rng_cpu, "cuda": rng_cuda}, **state}
        self.ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.ckpt_path.parent, prefix=".last.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.ckpt_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._last_good = state["step"]

    def _diverged(self, step: int, last_logged: int, value: float, what: str = "training loss") -> None:
        kept = f"the last good checkpoint is {self.ckpt_path} (step {self._checkpoint_step()})" if self.ckpt_path.is_file() else "no checkpoint was written before it"
        raise TrainingDiverged(
            f"training diverged: the {what} became {value} between steps {last_logged} and {step}; {kept}. "
            "Lower optim.lr, raise optim.warmup_steps or keep optim.grad_clip on, then resume or start over."
        )

    def _checkpoint_step(self) -> int | str:
        if self._last_good is not None:
            return self._last_good
        import torch

        try:
            return torch.load(self.ckpt_path, map_location="cpu", weights_only=True)["step"]
        except Exception:  # noqa: BLE001 - only for the message
            return "?"

    def _finish(self, history: list[dict[str, Any]], step: int, tokens_total: int, train_time: float, stopped: str | None, best_step: int | None) -> TrainResult:
        from selfattn.train import distributed

        metrics: dict[str, float] = {}
        if self.dist.is_main:
            evals = [h for h in history if "val_loss" in h]
            steps = [h for h in history if "train_loss" in h]
            metrics["steps"] = float(step)
            if steps:
                metrics["train_loss"] = steps[-1]["train_loss"]
                metrics["tokens"] = float(steps[-1]["tokens"])
            if evals:
                metrics.update({k: float(v) for k, v in evals[-1].items() if k != "step"})
                best_row = next((h for h in evals if h["step"] == best_step), None)
                if best_row is not None:  # the evaluation that chose best/: best_val_loss, best_val_accuracy, ...
                    metrics.update({f"best_{k}": float(v) for k, v in best_row.items() if k != "step"})
                    metrics["best_step"] = float(best_step)
            metrics["tokens_per_s"] = tokens_total / train_time if train_time > 0 else 0.0
            metrics["train_time_s"] = train_time
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "history.json").write_text(json.dumps(history, indent=1) + "\n")
            from selfattn.evaluate import evaluate_checkpoint
            from selfattn.plots import plot_learning_curves

            if history:
                plot_learning_curves(history, self.out_dir / "plots" / "learning_curves.png")
            ev = evaluate_checkpoint(self.best_dir, self.cfg.data, self.out_dir / "eval", batch_size=self.cfg.train.eval_batch_size or self.cfg.train.batch_size, device=str(self.device), n_attention_examples=1, learning_curves=False)
            metrics.update({f"best_{k}": float(v) for k, v in ev.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
            (self.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        metrics = distributed.broadcast_object(metrics, self.dist)  # type: ignore[assignment]
        return TrainResult(out_dir=self.out_dir, best_dir=self.best_dir, last_ckpt=self.ckpt_path, metrics=metrics, history=history, stopped_early=stopped)


def _to_device(t: "torch.Tensor", device: "torch.device", pin: bool) -> "torch.Tensor":
    if device.type == "cpu":
        return t
    if pin:
        t = t.pin_memory()
    return t.to(device, non_blocking=pin)


def _autocast(device: "torch.device", dtype: "torch.dtype | None"):
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _config_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ, ignoring train.* keys that may change on resume."""
    a, b = _flatten(saved), _flatten(now)
    out = []
    for k in sorted(set(a) | set(b)):
        if k.startswith("train.") and k.split(".", 1)[1] in _RESUMABLE_TRAIN_KEYS:
            continue
        if a.get(k) != b.get(k):
            out.append((k, a.get(k), b.get(k)))
    return out
