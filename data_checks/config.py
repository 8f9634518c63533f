"""Thresholds and severities of the data checks: one validated, serializable config.

Every bound a check compares against lives in ``CheckThresholds`` with its default and the reason
for it. The defaults let the real data sets pass (SST-2 train/dev, Tiny Shakespeare) while the
broken files the tests build fail; tighten or relax them per data set with
``CheckThresholds(max_duplicate_rate=0.01, ...)`` or ``CheckThresholds.model_validate(dict)``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from selfattn.config import StrictModel

Severity = Literal["error", "warning"]
Kind = Literal["corpus", "labelled"]

# Check name -> default severity. An ``error`` that fails makes the report fail (exit 1);
# a ``warning`` that fails is listed but the data still passes. Override per call with
# ``validate(..., severity={"class_balance": "warning"})``.
DEFAULT_SEVERITY: dict[str, Severity] = {
    # both kinds
    "utf8": "error",
    "nonprintable_ratio": "error",
    # corpus
    "corpus_non_empty": "error",
    "line_length": "error",
    "duplicate_lines": "error",
    "enough_tokens": "error",
    # labelled
    "text_column": "error",
    "label_column": "error",
    "row_count": "error",
    "text_not_null": "error",
    "label_not_null": "error",
    "labels_in_set": "error",
    "class_balance": "error",
    "text_length": "error",
    "text_length_quantiles": "error",
    "duplicate_rows": "error",
    "conflicting_labels": "error",
    # splits (``against=`` a train file)
    "leakage_exact": "error",
    "leakage_normalized": "error",
    "label_distribution": "error",
    # after tokenization (``tokenizer=`` given)
    "truncation_rate": "warning",
    "unknown_token_rate": "error",
}


class CheckThresholds(StrictModel):
    """Bounds used by the suites. Rates are fractions in [0, 1]."""

    # --- corpus -------------------------------------------------------------------------------
    min_lines: int = Field(default=1, ge=0, description="non-blank lines a corpus must have")
    max_line_chars: int = Field(
        default=100_000, gt=0, description="longest allowed line; a 10 MB one-line file is not a corpus"
    )
    max_duplicate_line_rate: float = Field(
        default=0.4,
        ge=0,
        le=1,
        description="1 - (distinct non-blank lines / non-blank lines); Tiny Shakespeare is 0.22 "
        "(speaker names repeat), a file whose every line appears twice is 0.5",
    )
    min_context_windows: int = Field(
        default=4, ge=1, description="a corpus needs at least this many (context_length + 1)-token windows"
    )
    context_length: int = Field(
        default=256, gt=0, description="used when validate() gets no context_length"
    )
    # --- both ---------------------------------------------------------------------------------
    max_nonprintable_ratio: float = Field(
        default=0.001,
        ge=0,
        le=1,
        description="control / zero-width / replacement characters over all characters (tab and newline allowed)",
    )
    # --- labelled -----------------------------------------------------------------------------
    min_rows: int = Field(default=1, ge=0, description="rows (excluding the header) a labelled file must have")
    min_text_chars: int = Field(default=1, ge=0, description="shortest allowed text")
    max_text_chars: int = Field(default=10_000, gt=0, description="longest allowed text")
    text_length_quantiles: dict[float, tuple[int | None, int | None]] = Field(
        default={0.5: (3, 2_000), 0.99: (None, 8_000)},
        description="quantile -> (min, max) of text length in characters; SST-2 train has "
        "median 39 and q99 194",
    )
    min_class_fraction: float = Field(
        default=0.05, ge=0, le=1, description="every configured label must be at least this fraction of rows"
    )
    max_duplicate_rate: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="fraction of rows that have an identical (text, label) row; SST-2 train is 0.011",
    )
    max_conflicting_label_rate: float = Field(
        default=0.001,
        ge=0,
        le=1,
        description="fraction of rows whose exact text also appears with another label; SST-2 train is 0.00015",
    )
    # --- splits -------------------------------------------------------------------------------
    max_exact_leak_rate: float = Field(
        default=0.0, ge=0, le=1, description="fraction of rows whose exact text is in the train file"
    )
    max_normalized_leak_rate: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="same after normalisation (NFKC, casefold, punctuation dropped, spaces collapsed); "
        "SST-2 dev is 0.0023 ('bad .' / 'cool .' are train phrases)",
    )
    max_label_kl: float = Field(
        default=0.1,
        ge=0,
        description="KL(eval label distribution || train label distribution) in nats; SST-2 dev vs train is 0.005",
    )
    # --- after tokenization -------------------------------------------------------------------
    max_truncation_rate: float = Field(
        default=0.05, ge=0, le=1, description="fraction of texts longer than context_length tokens"
    )
    max_unknown_token_rate: float = Field(
        default=0.01, ge=0, le=1, description="unknown tokens over all tokens"
    )
    # --- reporting ----------------------------------------------------------------------------
    n_examples: int = Field(default=3, ge=0, le=50, description="offending rows kept per failing check")

    @model_validator(mode="after")
    def _check(self) -> "CheckThresholds":
        if self.min_text_chars > self.max_text_chars:
            raise ValueError(
                f"min_text_chars ({self.min_text_chars}) must be <= max_text_chars ({self.max_text_chars})"
            )
        for q, (lo, hi) in self.text_length_quantiles.items():
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"text_length_quantiles key {q} must be a quantile in [0, 1]")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"text_length_quantiles[{q}] = ({lo}, {hi}): min must be <= max")
        return self


def resolve_severity(overrides: dict[str, str] | None) -> dict[str, Severity]:
    """Default severities updated with ``overrides``; unknown names and values are refused, naming them."""
    merged = dict(DEFAULT_SEVERITY)
    for name, value in (overrides or {}).items():
        if name not in DEFAULT_SEVERITY:
            raise ValueError(f"unknown check {name!r} in severity; known checks: {sorted(DEFAULT_SEVERITY)}")
        if value not in ("error", "warning"):
            raise ValueError(f"severity for {name!r} must be 'error' or 'warning', got {value!r}")
        merged[name] = value  # type: ignore[assignment]
    return merged
