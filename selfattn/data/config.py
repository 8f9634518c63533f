"""The data configs the training engine takes: :class:`LMDataConfig` (a corpus for causal-LM
pretraining) and :class:`ClassificationDataConfig` (labelled text for a classifier)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from selfattn.config import StrictModel

if TYPE_CHECKING:  # pragma: no cover

    pass


TokenizerKind = Literal["char", "bpe"]


class LMDataConfig(StrictModel):
    """A text corpus for causal-LM pretraining."""

    path: str = Field(description="local txt/csv/tsv/jsonl/parquet file or a HF hub dataset id")
    text_column: str = Field(default="text", description="column holding the text (txt files: 'text')")
    split: str = Field(default="train", description="hub split to load (ignored for local files)")
    tokenizer: TokenizerKind = "char"
    vocab_size: int = Field(default=4096, ge=260, description="BPE vocabulary size (>= 256 bytes + 4 specials; char: ignored)")
    block_size: int = Field(default=128, gt=0, description="tokens per training window")
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0, description="last fraction of the token stream kept for validation")
    max_chars: int | None = Field(default=None, gt=0, description="use only the first N characters (quick runs)")
    sampling: Literal["random", "packed"] = Field(default="random", description="random offsets (nanoGPT) or shuffled non-overlapping blocks")


class ClassificationDataConfig(StrictModel):
    """Labelled text for sequence classification."""

    train_path: str = Field(description="local file or hub id")
    val_path: str | None = Field(default=None, description="None = hold out val_fraction of train")
    val_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    val_holdout: Literal["random", "sentences"] = Field(
        default="random",
        description=(
            "without val_path: 'random' holds out val_fraction of the rows; 'sentences' holds out val_fraction of the "
            "whole sentences (rows that are no word span of another row) and drops from training the phrases found only "
            "inside them - for phrase-level data such as SST-2, whose train holds every sub-phrase of its sentences"
        ),
    )
    split: str = Field(default="train", description="hub split for train_path")
    val_split: str = Field(default="validation", description="hub split for val_path")
    text_column: str = "sentence"
    label_column: str = "label"
    labels: list[int | str] = Field(default_factory=lambda: [0, 1], min_length=2)
    max_length: int = Field(default=128, gt=0, description="longer sequences are truncated (and counted)")
    tokenizer: TokenizerKind = Field(default="bpe", description="from-scratch runs only; fine-tuning reuses the checkpoint's tokenizer")
    vocab_size: int = Field(default=4096, ge=260, description="BPE vocabulary size (from-scratch runs)")
    max_examples: int | None = Field(default=None, gt=0, description="use only the first N training rows (quick runs)")
    token_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="training only: each real token becomes <unk> with this probability (regularisation)")

    @model_validator(mode="after")
    def _check_labels(self) -> "ClassificationDataConfig":
        keys = [str(v) for v in self.labels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        return self
