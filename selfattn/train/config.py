"""Training configs: ``PretrainConfig`` and ``FinetuneConfig``, built from small nested sections.

Every section is a :class:`~selfattn.config.StrictModel` (unknown keys are errors) and loads with
``selfattn.config.load_config(PretrainConfig, path, ["train.max_steps=100", ...])``. A tiny run
needs only ``data.path`` (pretraining) or ``data.train_path`` (fine-tuning).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, create_model, model_validator

from selfattn.config import ModelConfig, PoolingKind, StrictModel
from selfattn.data.config import ClassificationDataConfig, LMDataConfig
from selfattn.config import LoRAConfig

__all__ = [
    "ArchConfig",
    "ClassificationDataConfig",
    "FinetuneConfig",
    "HeadConfig",
    "LMDataConfig",
    "LoRAConfig",
    "OptimConfig",
    "PretrainConfig",
    "TrainLoopConfig",
]

# fields of ModelConfig that the engine fills in (from the tokenizer, the data or the labels)
_DERIVED = {"vocab_size", "pad_token_id", "n_classes", "context_length"}

_ArchBase = create_model(  # type: ignore[call-overload]
    "_ArchBase",
    __base__=StrictModel,
    context_length=(int | None, Field(default=None, gt=0, description="None = data.block_size (LM) or data.max_length (classifier)")),
    **{name: (f.annotation, f) for name, f in ModelConfig.model_fields.items() if name not in _DERIVED},
)


class ArchConfig(_ArchBase):  # type: ignore[misc, valid-type]
    """``ModelConfig`` without the derived fields: vocab_size/pad id come from the tokenizer."""

    @model_validator(mode="after")
    def _check_arch(self) -> "ArchConfig":
        try:
            self.to_model_config(vocab_size=max(self.d_model, 8), pad_token_id=0, context_length=self.context_length or 8)
        except ValidationError as exc:
            raise ValueError("; ".join(e["msg"] for e in exc.errors())) from None
        return self

    def to_model_config(self, *, vocab_size: int, pad_token_id: int, context_length: int, n_classes: int | None = None, **overrides: Any) -> ModelConfig:
        fields = self.model_dump(exclude={"context_length"})
        fields.update(overrides)
        return ModelConfig(vocab_size=vocab_size, pad_token_id=pad_token_id, context_length=self.context_length or context_length, n_classes=n_classes, **fields)


class OptimConfig(StrictModel):
    """AdamW with linear warmup then cosine decay from ``lr`` to ``min_lr``."""

    lr: float = Field(default=1e-3, gt=0)
    min_lr: float | None = Field(default=None, ge=0, description="None = lr / 10")
    warmup_steps: int | None = Field(default=None, ge=0, description="None = min(100, max_steps // 10)")
    decay_steps: int | None = Field(default=None, gt=0, description="cosine reaches min_lr here; None = train.max_steps")
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = Field(default=1e-8, gt=0)
    grad_clip: float = Field(default=1.0, ge=0, description="max global grad norm; 0 = off")


class TrainLoopConfig(StrictModel):
    """Loop length, batching, evaluation, checkpointing, device and reproducibility."""

    max_steps: int = Field(default=1000, gt=0, description="optimizer steps")
    batch_size: int = Field(default=32, gt=0, description="global micro-batch (split over DDP ranks)")
    grad_accum: int = Field(default=1, gt=0, description="micro-batches per optimizer step")
    eval_every: int = Field(default=200, gt=0)
    eval_batches: int | None = Field(default=50, gt=0, description="LM: random val batches per eval (None = every val block); classifier: whole val set")
    eval_batch_size: int | None = Field(default=None, gt=0, description="None = batch_size")
    checkpoint_every: int = Field(default=500, ge=0, description="0 = only at the end")
    keep_checkpoints: int = Field(default=2, ge=1, description="newest training checkpoints kept (a corrupt newest one falls back to the previous)")
    early_stopping_patience: int | None = Field(default=None, gt=0, description="evals without improvement before stopping")
    early_stopping_metric: str | None = Field(default=None, description="None = val_loss (LM) / val_accuracy (classifier); or val_perplexity, val_f1, ...")
    log_every: int = Field(default=10, gt=0, description="steps between loss read-outs (host syncs), history rows and on_step calls")
    seed: int = 1337
    device: str = Field(default="auto", description="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto = bf16 autocast on CUDA, fp32 elsewhere")
    compile: bool = False
    progress: bool | None = Field(default=None, description="progress bar; None = only when stderr is a terminal")
    resume: bool | None = Field(default=None, description="None = resume if the output holds a checkpoint; True = must; False = start over")


class HeadConfig(StrictModel):
    """Classifier head options (apply with or without ``init_from``)."""

    pooling: PoolingKind | None = Field(default=None, description="None = the model section's pooling (default mean)")
    dropout: float | None = Field(default=None, ge=0.0, lt=1.0, description="None = keep the trunk's dropout")
    causal: bool | None = Field(default=None, description="None = causal when fine-tuning a pretrained LM, else bidirectional")


class PretrainConfig(StrictModel):
    """Pretraining on a corpus: a causal LM (``objective="clm"``) or a masked-LM encoder (``"mlm"``)."""

    data: LMDataConfig
    objective: Literal["clm", "mlm"] = Field(default="clm", description="clm: next-token DecoderLM; mlm: BERT's masked tokens, a bidirectional MaskedLM")
    mlm_probability: float = Field(default=0.15, gt=0.0, lt=1.0, description="mlm: share of tokens masked (80 % mask token, 10 % random, 10 % kept)")
    init_from: str | None = Field(default=None, description="continue from a save_pretrained directory (its model and tokenizer; mlm: an encoder or masked LM), or gguf:FILE (a decoder LM)")
    model: ArchConfig = Field(default_factory=ArchConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)

    @model_validator(mode="after")
    def _check(self) -> "PretrainConfig":
        if self.init_from is not None and "model" in self.model_fields_set:
            raise ValueError("model (an architecture) is only for from-scratch runs; with init_from the checkpoint fixes it")
        ctx = self.model.context_length
        if ctx is not None and ctx < self.data.block_size:
            raise ValueError(f"model.context_length ({ctx}) must be >= data.block_size ({self.data.block_size})")
        return self


class FinetuneConfig(StrictModel):
    """Sequence-classifier training, from scratch or from a pretrained LM directory, fully or with LoRA."""

    data: ClassificationDataConfig
    init_from: str | None = Field(default=None, description="a save_pretrained directory (an LM or a classifier) or gguf:FILE (a decoder LM); None = from scratch")
    model: ArchConfig | None = Field(default=None, description="architecture when training from scratch (None = defaults)")
    head: HeadConfig = Field(default_factory=HeadConfig)
    lora: LoRAConfig | None = None
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainLoopConfig = Field(default_factory=TrainLoopConfig)

    @model_validator(mode="after")
    def _check(self) -> "FinetuneConfig":
        if self.init_from is not None and self.model is not None:
            raise ValueError("model (an architecture) is only for from-scratch runs; with init_from the checkpoint fixes it (use head.* to change pooling/dropout)")
        return self
