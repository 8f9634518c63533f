"""The suites: which checks run on a corpus, a labelled file, a split and tokenized text.

Two kinds of checks, one result shape (``CheckResult``):

* ``GXCheck``: a Great Expectations expectation, run in one ExpectationSuite per file. Checks GX
  has no expectation for are written as GX expectations on *derived columns* where that is cheap
  (``text_length``, ``labels_per_text`` for conflicting labels, ``in_train_exact`` /
  ``in_train_normalized`` for leakage), so they show up in the Data Docs too.
* pandas checks (``utf8``, ``nonprintable_ratio``, ``class_balance``, ``enough_tokens``,
  ``truncation_rate``, ``unknown_token_rate``): computed here, vectorised, returned as
  ``CheckResult`` directly.

Great Expectations is imported inside the functions that build expectations (its import costs
seconds); this module imports only the standard library at import time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from data_checks.config import CheckThresholds, Severity
from data_checks.report import CheckResult

if TYPE_CHECKING:
    import pandas as pd

    from data_checks.readers import DecodedText

# Control characters except tab/newline/CR, C1 controls, zero-width and bidi marks, line/paragraph
# separators, a BOM inside the text. U+FFFD (replacement) is added unless the utf8 check already
# accounts for it.
_NONPRINTABLE = "\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2028\u2029\u2060-\u2064\ufeff"


@dataclass(frozen=True)
class GXCheck:
    """One expectation and how to explain its GX result: ``describe(result, success) -> (observed, detail)``."""

    name: str
    expectation: Any  # a gx.expectations.Expectation
    describe: Callable[[dict, bool], tuple[Any, str]]
    example_column: str | None = None  # column holding the offending values (for example rows)


@dataclass(frozen=True)
class Row:
    """One row of a suite table: the check's name, its expectation built from the suite's context
    (``expectation(gx, ctx)``), how its result reads (``describe(ctx, result, success) -> (observed,
    detail)``), the column whose values make the example rows, and whether it runs (``when(ctx)``)."""

    name: str
    expectation: Callable[[Any, Any], Any]
    describe: Callable[[Any, dict, bool], tuple[Any, str]]
    example_column: Callable[[Any], str | None] = lambda ctx: None
    when: Callable[[Any], bool] = lambda ctx: True


def build(table: Sequence[Row], ctx: Any) -> list[GXCheck]:
    """The table's checks for one file (``ctx``: what its expectations and describers read)."""
    import great_expectations as gx

    return [
        GXCheck(row.name, row.expectation(gx, ctx), functools.partial(row.describe, ctx), row.example_column(ctx))
        for row in table
        if row.when(ctx)
    ]


def nonprintable_pattern(*, count_replacement_char: bool) -> str:
    extra = "\ufffd" if count_replacement_char else ""
    return f"[{_NONPRINTABLE}{extra}]"


def normalize_text(texts: "pd.Series") -> "pd.Series":
    """Text as compared for leakage: NFKC, casefolded, punctuation dropped, whitespace collapsed."""
    s = texts.fillna("").astype(str)
    s = s.str.normalize("NFKC").str.casefold()
    s = s.str.replace(r"[^\w\s]", "", regex=True).str.replace(r"\s+", " ", regex=True).str.strip()
    return s


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%" if x < 0.01 and x > 0 else f"{100 * x:.1f}%"


def _unexpected(result: dict) -> tuple[int, int, float]:
    n = int(result.get("element_count") or 0)
    k = int(result.get("unexpected_count") or 0)
    return k, n, (k / n if n else 0.0)


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Corpus:
    frame: "pd.DataFrame"  # non-blank lines: ``line``, ``line_length``
    th: CheckThresholds

    @property
    def longest(self) -> int:
        return int(self.frame["line_length"].max())


def _corpus_non_empty(c: _Corpus, r: dict, ok: bool) -> tuple[Any, str]:
    n = r.get("observed_value")
    if ok:
        return n, f"{n} non-blank lines"
    return n, f"corpus has {n} non-blank lines, needs >= {c.th.min_lines}: the file is empty or holds only whitespace"


def _line_length(c: _Corpus, r: dict, ok: bool) -> tuple[Any, str]:
    k, n, _ = _unexpected(r)
    if ok:
        return c.longest, f"longest line {c.longest:,} chars (bound {c.th.max_line_chars:,})"
    return c.longest, (
        f"{k} line(s) longer than max_line_chars={c.th.max_line_chars:,}; the longest has {c.longest:,} "
        "chars (one huge line: not line-structured text, or a missing newline conversion?)"
    )


def _duplicate_lines(c: _Corpus, r: dict, ok: bool) -> tuple[Any, str]:
    unique = r.get("observed_value")
    if unique is None:
        return None, "could not compute the duplicate-line rate"
    rate = 1.0 - float(unique)
    msg = f"{_pct(rate)} of non-blank lines repeat another (bound {_pct(c.th.max_duplicate_line_rate)})"
    return round(rate, 4), msg if ok else f"duplicate-line rate too high: {msg}"


CORPUS: tuple[Row, ...] = (
    Row("corpus_non_empty", lambda gx, c: gx.expectations.ExpectTableRowCountToBeBetween(min_value=c.th.min_lines), _corpus_non_empty),
    Row(
        "line_length",
        lambda gx, c: gx.expectations.ExpectColumnValuesToBeBetween(column="line_length", min_value=1, max_value=c.th.max_line_chars),
        _line_length,
        example_column=lambda c: "line",
        when=lambda c: len(c.frame) > 0,
    ),
    Row(
        "duplicate_lines",
        lambda gx, c: gx.expectations.ExpectColumnProportionOfUniqueValuesToBeBetween(column="line", min_value=1.0 - c.th.max_duplicate_line_rate),
        _duplicate_lines,
        when=lambda c: len(c.frame) > 0,
    ),
)


def corpus_gx_checks(frame: "pd.DataFrame", th: CheckThresholds) -> list[GXCheck]:
    """Non-empty, line length bound, duplicate-line rate (GX on the frame of non-blank lines)."""
    return build(CORPUS, _Corpus(frame, th))


def most_repeated(values: "pd.Series", n: int, *, prefix: str = "") -> list[str]:
    counts = values.value_counts()
    counts = counts[counts > 1].head(n)
    return [f"{prefix}{_show(v)} x{c}" for v, c in counts.items()]


# ---------------------------------------------------------------------------------------------
# labelled
# ---------------------------------------------------------------------------------------------


def add_labelled_columns(frame: "pd.DataFrame", *, text_column: str, label_column: str) -> None:
    """Derived columns (in place): ``text_length`` and ``labels_per_text`` (distinct labels of the exact text)."""
    frame["text_length"] = frame[text_column].str.len()
    per_text = frame.groupby(text_column, dropna=True, sort=False)[label_column].transform("nunique")
    frame["labels_per_text"] = per_text.fillna(0).astype("int64")


@dataclass(frozen=True)
class _Schema:
    text_column: str
    label_column: str
    columns: Sequence[str]
    suffix: str
    th: CheckThresholds


def _column_present(role: str) -> Callable[[_Schema, dict, bool], tuple[Any, str]]:
    def describe(c: _Schema, r: dict, ok: bool) -> tuple[Any, str]:
        col = c.text_column if role == "text" else c.label_column
        if ok:
            return col, f"{role} column {col!r} present"
        return None, f"no {role} column {col!r}; the file has columns {list(c.columns)}" + _delimiter_hint(c.columns, c.suffix)

    return describe


def _row_count(c: _Schema, r: dict, ok: bool) -> tuple[Any, str]:
    n = r.get("observed_value")
    if ok:
        return n, f"{n} rows"
    return n, f"{n} data rows, needs >= {c.th.min_rows}" + (" (header only?)" if n == 0 else "")


SCHEMA: tuple[Row, ...] = (
    Row("text_column", lambda gx, c: gx.expectations.ExpectColumnToExist(column=c.text_column), _column_present("text")),
    Row("label_column", lambda gx, c: gx.expectations.ExpectColumnToExist(column=c.label_column), _column_present("label")),
    Row("row_count", lambda gx, c: gx.expectations.ExpectTableRowCountToBeBetween(min_value=c.th.min_rows), _row_count),
)


def labelled_schema_checks(
    *, text_column: str, label_column: str, columns: Sequence[str], suffix: str, th: CheckThresholds
) -> list[GXCheck]:
    """Required columns present and enough rows: run always, even when the rest cannot run."""
    return build(SCHEMA, _Schema(text_column, label_column, columns, suffix, th))


def _delimiter_hint(columns: Sequence[str], suffix: str) -> str:
    if len(columns) != 1:
        return ""
    header = columns[0]
    read_as = {".tsv": "tab", ".csv": "comma"}.get(suffix)
    for sep, name in (("\t", "tab"), (",", "comma"), (";", "semicolon"), ("|", "pipe")):
        if sep in header and name != read_as:
            return (
                f" -- the header looks {name}-separated but {suffix} files are read {read_as}-separated: "
                "wrong delimiter? (use .tsv for tabs, .csv for commas)"
            )
    return ""


@dataclass(frozen=True)
class _Labelled:
    frame: "pd.DataFrame"  # with the derived columns of :func:`add_labelled_columns`
    text_column: str
    label_column: str
    labels: list[str] | None
    th: CheckThresholds

    @property
    def quantiles(self) -> list[float]:
        return sorted(self.th.text_length_quantiles)

    @property
    def ranges(self) -> list[list[float | None]]:
        return [list(self.th.text_length_quantiles[q]) for q in self.quantiles]


def _not_null(role: str) -> Callable[[_Labelled, dict, bool], tuple[Any, str]]:
    def describe(c: _Labelled, r: dict, ok: bool) -> tuple[Any, str]:
        k, n, frac = _unexpected(r)
        if ok:
            return 0, f"no missing {role}s"
        col = c.text_column if role == "text" else c.label_column
        return k, f"{k} of {n} rows ({_pct(frac)}) have a missing or blank {role} in column {col!r}"

    return describe


def _labels_in_set(c: _Labelled, r: dict, ok: bool) -> tuple[Any, str]:
    k, n, frac = _unexpected(r)
    labels = ", ".join(c.labels or [])
    if ok:
        return 0, f"all in {{{labels}}}"
    bad = sorted({str(v) for v in r.get("partial_unexpected_list") or []})
    return k, f"{k} of {n} labelled rows ({_pct(frac)}) have a label outside the configured set {{{labels}}}: {', '.join(repr(b) for b in bad)}"


def _text_length(c: _Labelled, r: dict, ok: bool) -> tuple[Any, str]:
    k, n, frac = _unexpected(r)
    lengths = c.frame["text_length"]
    observed = f"{int(lengths.min())}-{int(lengths.max())}" if lengths.notna().any() else None
    bound = f"{c.th.min_text_chars}-{c.th.max_text_chars:,} chars"
    if ok:
        return observed, f"all within {bound}"
    return observed, f"{k} of {n} texts ({_pct(frac)}) outside the length bound {bound} (observed {observed})"


def _length_quantiles(c: _Labelled, r: dict, ok: bool) -> tuple[Any, str]:
    obs = (r.get("observed_value") or {}).get("values") or []
    shown = ", ".join(
        f"q{q:g}={v:g} [{lo if lo is not None else '-'}, {hi if hi is not None else '-'}]"
        for q, v, (lo, hi) in zip(c.quantiles, obs, c.ranges)
    )
    observed = {f"q{q:g}": v for q, v in zip(c.quantiles, obs)}
    return observed, (f"chars {shown}" if ok else f"text length quantiles out of bounds: {shown}")


def _duplicate_rows(c: _Labelled, r: dict, ok: bool) -> tuple[Any, str]:
    k, n, frac = _unexpected(r)
    msg = f"{k} of {n} rows ({_pct(frac)}) have an identical (text, label) copy (bound {_pct(c.th.max_duplicate_rate)})"
    return round(frac, 4), msg if ok else f"too many exact duplicates: {msg}"


def _conflicting_labels(c: _Labelled, r: dict, ok: bool) -> tuple[Any, str]:
    k, n, frac = _unexpected(r)
    n_texts = int(c.frame.loc[c.frame["labels_per_text"] > 1, c.text_column].nunique())
    msg = (
        f"{k} of {n} rows ({_pct(frac)}; {n_texts} texts) have a copy of their text with another label "
        f"(bound {_pct(c.th.max_conflicting_label_rate)})"
    )
    return k, msg if ok else f"conflicting labels: {msg}"


def _text_column(c: _Labelled) -> str:
    return c.text_column


LABELLED: tuple[Row, ...] = (
    Row("text_not_null", lambda gx, c: gx.expectations.ExpectColumnValuesToNotBeNull(column=c.text_column), _not_null("text"), _text_column),
    Row("label_not_null", lambda gx, c: gx.expectations.ExpectColumnValuesToNotBeNull(column=c.label_column), _not_null("label"), _text_column),
    Row(
        "labels_in_set",
        lambda gx, c: gx.expectations.ExpectColumnValuesToBeInSet(column=c.label_column, value_set=list(c.labels)),
        _labels_in_set,
        example_column=lambda c: c.label_column,
        when=lambda c: c.labels is not None,
    ),
    Row(
        "text_length",
        lambda gx, c: gx.expectations.ExpectColumnValuesToBeBetween(column="text_length", min_value=c.th.min_text_chars, max_value=c.th.max_text_chars),
        _text_length,
        example_column=lambda c: "text_length",
    ),
    Row(
        "text_length_quantiles",
        lambda gx, c: _quantiles_expectation_class()(column="text_length", quantile_ranges={"quantiles": c.quantiles, "value_ranges": c.ranges}),
        _length_quantiles,
    ),
    Row(
        "duplicate_rows",
        lambda gx, c: gx.expectations.ExpectCompoundColumnsToBeUnique(column_list=[c.text_column, c.label_column], mostly=1.0 - c.th.max_duplicate_rate),
        _duplicate_rows,
        _text_column,
    ),
    Row(
        "conflicting_labels",
        lambda gx, c: gx.expectations.ExpectColumnValuesToBeBetween(
            column="labels_per_text", min_value=0, max_value=1, mostly=1.0 - c.th.max_conflicting_label_rate
        ),
        _conflicting_labels,
        _text_column,
    ),
)


def labelled_value_checks(
    frame: "pd.DataFrame", *, text_column: str, label_column: str, labels: list[str] | None, th: CheckThresholds
) -> list[GXCheck]:
    """Nulls, label set, text lengths and their quantiles, duplicates, conflicting labels."""
    return build(LABELLED, _Labelled(frame, text_column, label_column, labels, th))


@functools.lru_cache(maxsize=1)
def _quantiles_expectation_class() -> type:
    """GX's ExpectColumnQuantileValuesToBeBetween with ``success`` as a Python bool.

    GX 1.24 returns ``np.all(...)`` (a numpy bool) as the success flag, which its result store
    cannot serialise under numpy 2 (``TypeError: Object of type bool is not JSON serializable``).
    """
    import great_expectations as gx

    class ExpectColumnQuantileValuesToBeBetweenBool(gx.expectations.ExpectColumnQuantileValuesToBeBetween):
        def _validate(self, metrics, runtime_configuration=None, execution_engine=None):  # type: ignore[no-untyped-def]
            out = super()._validate(metrics, runtime_configuration=runtime_configuration, execution_engine=execution_engine)
            out["success"] = bool(out["success"])
            out["result"]["details"]["success_details"] = [bool(x) for x in out["result"]["details"]["success_details"]]
            return out

    return ExpectColumnQuantileValuesToBeBetweenBool


def class_balance_check(
    frame: "pd.DataFrame", *, label_column: str, labels: list[str] | None, th: CheckThresholds, severity: Severity
) -> CheckResult:
    """Every configured label (or, without a configured set, every observed one) makes up >= min_class_fraction."""
    observed = frame[label_column].dropna()
    if labels is not None:
        observed = observed[observed.isin(labels)]
    counts = observed.value_counts()
    expected = labels if labels is not None else [str(v) for v in counts.index]
    n = int(len(observed))
    fractions = {lab: (int(counts.get(lab, 0)) / n if n else 0.0) for lab in expected}
    shown = ", ".join(f"{lab}: {int(counts.get(lab, 0))} ({_pct(f)})" for lab, f in fractions.items())
    low = [lab for lab, f in fractions.items() if f < th.min_class_fraction]
    single = len([f for f in fractions.values() if f > 0]) < 2
    passed = not low and not single
    if passed:
        detail = shown
    elif n == 0:
        detail = "no row has a label in the configured set, so there are no classes to balance"
    elif single:
        present = [lab for lab, f in fractions.items() if f > 0]
        detail = f"a single class: every labelled row has label {present[0] if present else '(none)'} ({shown})"
    else:
        detail = f"class(es) {', '.join(low)} below min_class_fraction {_pct(th.min_class_fraction)}: {shown}"
    return CheckResult(
        name="class_balance",
        expectation="pandas:label_fractions",
        severity=severity,
        observed=round(min(fractions.values()), 4) if fractions else None,
        detail=detail,
        passed=passed,
    )


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------


def add_split_columns(frame: "pd.DataFrame", train: "pd.DataFrame", *, text_column: str) -> None:
    """Derived columns (in place): ``in_train_exact`` / ``in_train_normalized`` (1 = the text is in train).

    Ints, not bools: GX's JSON serialisation of results does not know numpy bools.
    """
    train_exact = set(train[text_column].dropna().str.strip())
    exact = frame[text_column].fillna("").str.strip().isin(train_exact) & frame[text_column].notna()
    frame["in_train_exact"] = exact.astype("int64")
    train_norm = set(normalize_text(train[text_column].dropna()))
    train_norm.discard("")
    frame["normalized_text"] = normalize_text(frame[text_column])
    frame["in_train_normalized"] = frame["normalized_text"].isin(train_norm).astype("int64")


@dataclass(frozen=True)
class _Split:
    frame: "pd.DataFrame"  # with the derived columns of :func:`add_split_columns`
    train: "pd.DataFrame"
    label_column: str
    train_path: Path
    th: CheckThresholds

    @property
    def train_distribution(self) -> tuple[list[str], list[float]]:
        """The train file's labels and their fractions (empty without labelled rows)."""
        counts = self.train[self.label_column].dropna().value_counts()
        total = float(counts.sum())
        return [str(v) for v in counts.index], ([float(n) / total for n in counts.to_numpy()] if total else [])


def _leakage(what: str, bound: Callable[[CheckThresholds], float]) -> Callable[[_Split, dict, bool], tuple[Any, str]]:
    def describe(c: _Split, r: dict, ok: bool) -> tuple[Any, str]:
        k, n, frac = _unexpected(r)
        msg = f"{k} of {n} rows ({_pct(frac)}) also in {c.train_path.name}{what}"
        limit = _pct(bound(c.th))
        return k, (msg + f" (bound {limit})") if ok else f"train/eval leakage: {msg} (bound {limit})"

    return describe


def _label_distribution(c: _Split, r: dict, ok: bool) -> tuple[Any, str]:
    kl = r.get("observed_value")
    details = r.get("details") or {}
    obs = details.get("observed_partition") or {}
    exp = details.get("expected_partition") or {}
    dist = ", ".join(f"{v}: {_pct(o)}/{_pct(e)}" for v, o, e in zip(obs.get("values", []), obs.get("weights", []), exp.get("weights", [])))
    kl_text = "inf (labels the train file lacks)" if kl is None else f"{kl:.4f}"
    msg = f"KL(eval||train) {kl_text} nats (bound {c.th.max_label_kl}); eval vs train: {dist}"
    return (None if kl is None else round(float(kl), 5)), msg if ok else f"label distribution differs from train: {msg}"


def _kl_expectation(gx: Any, c: _Split) -> Any:
    values, weights = c.train_distribution
    partition = {"values": values, "weights": weights}
    return gx.expectations.ExpectColumnKLDivergenceToBeLessThan(column=c.label_column, partition_object=partition, threshold=c.th.max_label_kl)


SPLIT: tuple[Row, ...] = (
    Row(
        "leakage_exact",
        lambda gx, c: gx.expectations.ExpectColumnValuesToBeInSet(column="in_train_exact", value_set=[0], mostly=1.0 - c.th.max_exact_leak_rate),
        _leakage("", lambda th: th.max_exact_leak_rate),
        example_column=lambda c: "in_train_exact",
    ),
    Row(
        "leakage_normalized",
        lambda gx, c: gx.expectations.ExpectColumnValuesToBeInSet(
            column="in_train_normalized", value_set=[0], mostly=1.0 - c.th.max_normalized_leak_rate
        ),
        _leakage(" once case/punctuation/spaces are normalised", lambda th: th.max_normalized_leak_rate),
        example_column=lambda c: "in_train_normalized",
    ),
    Row("label_distribution", _kl_expectation, _label_distribution, when=lambda c: bool(c.train_distribution[1])),
)


def split_checks(
    frame: "pd.DataFrame", train: "pd.DataFrame", *, label_column: str, train_path: Path, th: CheckThresholds
) -> list[GXCheck]:
    """No exact / normalised overlap with the train file; label distribution close to train's."""
    return build(SPLIT, _Split(frame, train, label_column, train_path, th))


# ---------------------------------------------------------------------------------------------
# pandas checks shared by both kinds
# ---------------------------------------------------------------------------------------------


def utf8_check(decoded: "DecodedText", *, severity: Severity) -> CheckResult:
    if decoded.utf8_error is None:
        bom = " (UTF-8 BOM stripped)" if decoded.had_bom else ""
        return CheckResult("utf8", "pandas:strict_utf8_decode", severity, "ok", f"valid UTF-8, {decoded.n_bytes:,} bytes{bom}")
    return CheckResult("utf8", "pandas:strict_utf8_decode", severity, "invalid", decoded.utf8_error, passed=False)


def nonprintable_check(
    texts: "pd.Series", *, where: Callable[[int], str], th: CheckThresholds, severity: Severity, count_replacement_char: bool
) -> CheckResult:
    """Ratio of non-printable characters over all characters of ``texts``; ``where`` names each row."""
    pattern = nonprintable_pattern(count_replacement_char=count_replacement_char)
    texts = texts.fillna("")
    per_row = texts.str.count(pattern)
    n_bad = int(per_row.sum())
    n_chars = int(texts.str.len().sum())
    ratio = n_bad / n_chars if n_chars else 0.0
    passed = ratio <= th.max_nonprintable_ratio
    msg = f"{n_bad:,} of {n_chars:,} chars ({_pct(ratio)}; bound {_pct(th.max_nonprintable_ratio)})"
    examples: list[str] = []
    if not passed:
        worst = per_row[per_row > 0].sort_values(ascending=False).head(th.n_examples)
        examples = [f"{where(int(i))}: {int(c)} non-printable in {_show(texts.iloc[i])}" for i, c in worst.items()]
    return CheckResult(
        "nonprintable_ratio",
        "pandas:control_char_ratio",
        severity,
        round(ratio, 6),
        msg if passed else f"too many non-printable (control / zero-width) characters: {msg}",
        examples,
        passed,
    )


# ---------------------------------------------------------------------------------------------
# after tokenization
# ---------------------------------------------------------------------------------------------


def encode_all(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of every text, batched when the tokenizer can (HF tokenizers run in Rust)."""
    if hasattr(tokenizer, "encode_batch"):
        return list(tokenizer.encode_batch(texts))
    return [list(tokenizer.encode(t)) for t in texts]


def enough_tokens_check(
    *, n_tokens: int, counted: str, context_length: int, th: CheckThresholds, severity: Severity
) -> CheckResult:
    need = th.min_context_windows * (context_length + 1)
    passed = n_tokens >= need
    msg = f"{n_tokens:,} {counted}; {th.min_context_windows} x (context_length {context_length} + 1) = {need:,} needed"
    return CheckResult(
        "enough_tokens",
        "pandas:token_count",
        severity,
        n_tokens,
        msg if passed else f"not enough tokens for the context: {msg}",
        passed=passed,
    )


def token_checks(
    ids: list[list[int]],
    *,
    tokenizer: Any,
    context_length: int | None,
    where: Callable[[int], str],
    texts: list[str],
    th: CheckThresholds,
    severity: dict[str, Severity],
    truncation: bool,
) -> list[CheckResult]:
    """Truncation rate (texts longer than ``context_length`` tokens) and unknown-token rate."""
    import numpy as np

    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    out: list[CheckResult] = []
    if truncation and context_length is not None and len(ids):
        too_long = lengths > context_length
        rate = float(too_long.mean())
        passed = rate <= th.max_truncation_rate
        msg = (
            f"{int(too_long.sum())} of {len(ids)} texts ({_pct(rate)}) exceed context_length {context_length} tokens "
            f"(bound {_pct(th.max_truncation_rate)}; longest {int(lengths.max())})"
        )
        examples = [] if passed else [f"{where(int(i))}: {lengths[i]} tokens {_show(texts[i])}" for i in np.flatnonzero(too_long)[: th.n_examples]]
        out.append(
            CheckResult("truncation_rate", "pandas:tokens_vs_context", severity["truncation_rate"], round(rate, 4),
                        msg if passed else f"too many texts truncated: {msg}", examples, passed)
        )
    unk = getattr(tokenizer, "unk_id", None)
    n_tokens = int(lengths.sum())
    if unk is None:
        out.append(CheckResult("unknown_token_rate", "pandas:unk_ratio", severity["unknown_token_rate"], 0.0,
                               "the tokenizer has no unknown token (byte-level): nothing can be unknown"))
        return out
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=n_tokens)
    n_unk = int((flat == unk).sum())
    rate = n_unk / n_tokens if n_tokens else 0.0
    passed = rate <= th.max_unknown_token_rate
    msg = f"{n_unk:,} of {n_tokens:,} tokens ({_pct(rate)}) are the unknown token (bound {_pct(th.max_unknown_token_rate)})"
    examples: list[str] = []
    if not passed:
        per_text = np.fromiter((x.count(unk) for x in ids), dtype=np.int64, count=len(ids))
        examples = [f"{where(int(i))}: {per_text[i]} unknown in {_show(texts[i])}" for i in np.argsort(-per_text)[: th.n_examples] if per_text[i]]
    out.append(
        CheckResult("unknown_token_rate", "pandas:unk_ratio", severity["unknown_token_rate"], round(rate, 5),
                    msg if passed else f"too many unknown tokens (tokenizer trained on other data?): {msg}", examples, passed)
    )
    return out


def _show(value: object, n: int = 50) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 4] + "...'"
