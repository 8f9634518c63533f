"""``validate(path, ...) -> Report``: read a data file, run its Great Expectations suite and the
pandas checks, write Data Docs and ``report.json`` when asked.

One ephemeral GX context per process (built on first use, reused by every call, guarded by a lock
because GX's stores are not thread-safe). GX is imported only inside functions, here and in suites.py.
"""

from __future__ import annotations

import functools
import re
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from data_checks import suites
from data_checks.config import CheckThresholds, resolve_severity
from data_checks.readers import detect_kind, label_strings, read_corpus, read_labelled
from data_checks.report import CheckResult, Report
from selfattn.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

_GX_LOCK = threading.Lock()
_DOCS_SITE = "selfattn_data_checks"
_DOCS_DIRNAME = "data_docs"


def validate(
    path: str | Path,
    *,
    kind: str | None = None,
    text_column: str = "sentence",
    label_column: str = "label",
    labels: Sequence[Any] | None = (0, 1),
    against: str | Path | None = None,
    output_dir: str | Path | None = None,
    tokenizer: Any = None,
    context_length: int | None = None,
    severity: Mapping[str, str] | None = None,
    thresholds: CheckThresholds | None = None,
) -> Report:
    """Validate one data file and return a ``Report`` (``report.passed``, ``.failures``, ``.warnings``).

    Args:
        path: the data file. ``.txt`` is a corpus; ``.tsv`` / ``.csv`` / ``.jsonl`` / ``.parquet`` labelled.
        kind: ``"corpus"`` or ``"labelled"``; None = from the extension.
        text_column, label_column: column names of labelled data.
        labels: the allowed labels (compared as strings, so ``(0, 1)`` matches ``0``/``1`` in a
            TSV); None = any label, balance checked over the labels present.
        against: the train file when ``path`` is a dev/test split: adds leakage (exact and
            normalised text) and label-distribution checks.
        output_dir: where to write the GX Data Docs site (``data_docs/index.html``) and ``report.json``.
        tokenizer: a ``selfattn`` tokenizer or the folder of a saved one: adds truncation and
            unknown-token checks and counts corpus tokens with it (else characters are counted).
        context_length: tokens per training window; default ``thresholds.context_length``.
        severity: per-check overrides, e.g. ``{"class_balance": "warning"}``.
        thresholds: bounds; default ``CheckThresholds()``.

    Raises:
        UserError: unusable input (missing, unreadable, empty, binary, unparseable file; a train
            file without the columns) -- exit code 2 on the command line.
        ValueError: invalid arguments (unknown kind or check name, bad labels).
    """
    start = time.perf_counter()
    th = thresholds if thresholds is not None else CheckThresholds()
    sev = resolve_severity(dict(severity) if severity else None)
    path = Path(path)
    kind = kind if kind is not None else detect_kind(path)
    if kind not in ("corpus", "labelled"):
        raise ValueError(f"kind must be 'corpus' or 'labelled', got {kind!r}")
    if context_length is not None and context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    tok = _load_tokenizer(tokenizer)
    out_dir = Path(output_dir) if output_dir is not None else None

    if kind == "corpus":
        if against is not None:
            raise ValueError("against= (split checks) applies to labelled data, not to a corpus")
        checks, n_rows = _validate_corpus(path, th=th, sev=sev, tokenizer=tok, context_length=context_length, out_dir=out_dir)
    else:
        checks, n_rows = _validate_labelled(
            path,
            text_column=text_column,
            label_column=label_column,
            labels=label_strings(labels),
            against=Path(against) if against is not None else None,
            th=th,
            sev=sev,
            tokenizer=tok,
            context_length=context_length,
            out_dir=out_dir,
        )
    report = Report(
        path=path,
        kind=kind,
        checks=checks,
        n_rows=n_rows,
        against=Path(against) if against is not None else None,
        data_docs=(out_dir / _DOCS_DIRNAME) if out_dir is not None else None,
    )
    report.seconds = time.perf_counter() - start
    if out_dir is not None:
        report.report_json = report.write_json(out_dir / "report.json")
    return report


# ---------------------------------------------------------------------------------------------
# per kind
# ---------------------------------------------------------------------------------------------


def _validate_corpus(
    path: Path, *, th: CheckThresholds, sev: dict, tokenizer: Any, context_length: int | None, out_dir: Path | None
) -> tuple[list[CheckResult], int]:
    decoded, frame = read_corpus(path)
    line_no = frame["line_no"].to_numpy()
    where: Callable[[int], str] = lambda i: f"line {int(line_no[i])}"  # noqa: E731
    results = [suites.utf8_check(decoded, severity=sev["utf8"])]
    gx_checks = suites.corpus_gx_checks(frame, th)
    results += _run_gx(frame, gx_checks, suite_name=f"corpus_{path.stem}", out_dir=out_dir, sev=sev, th=th, where=where)
    if len(frame):
        results.append(
            suites.nonprintable_check(
                frame["line"], where=where, th=th, severity=sev["nonprintable_ratio"],
                count_replacement_char=decoded.utf8_error is None,
            )
        )
    ctx_len = context_length or th.context_length
    lines = frame["line"].tolist()
    if tokenizer is not None:
        ids = suites.encode_all(tokenizer, lines)
        n_tokens, counted = sum(map(len, ids)) + len(lines), "tokens (tokenizer, + 1 per line break)"
        results.append(suites.enough_tokens_check(n_tokens=n_tokens, counted=counted, context_length=ctx_len, th=th, severity=sev["enough_tokens"]))
        results += suites.token_checks(
            ids, tokenizer=tokenizer, context_length=None, where=where, texts=lines, th=th, severity=sev, truncation=False
        )
    else:
        n_chars = len(decoded.text)
        results.append(
            suites.enough_tokens_check(
                n_tokens=n_chars, counted="chars (no tokenizer given)",
                context_length=ctx_len, th=th, severity=sev["enough_tokens"],
            )
        )
    return results, len(frame)


def _validate_labelled(
    path: Path,
    *,
    text_column: str,
    label_column: str,
    labels: list[str] | None,
    against: Path | None,
    th: CheckThresholds,
    sev: dict,
    tokenizer: Any,
    context_length: int | None,
    out_dir: Path | None,
) -> tuple[list[CheckResult], int]:
    if text_column == label_column:
        raise ValueError(f"text_column and label_column must differ, both are {text_column!r}")
    data = read_labelled(path, text_column=text_column, label_column=label_column)
    frame = data.frame
    offset = data.row_offset
    where: Callable[[int], str] = (  # noqa: E731
        (lambda i: f"line {i + offset}") if offset else (lambda i: f"row {i}")
    )
    results: list[CheckResult] = []
    if data.decoded is not None:
        results.append(suites.utf8_check(data.decoded, severity=sev["utf8"]))
    gx_checks = suites.labelled_schema_checks(
        text_column=text_column, label_column=label_column, columns=data.columns, suffix=path.suffix.lower(), th=th
    )
    usable = text_column in frame.columns and label_column in frame.columns and len(frame) > 0
    train = None
    if usable:
        suites.add_labelled_columns(frame, text_column=text_column, label_column=label_column)
        gx_checks += suites.labelled_value_checks(frame, text_column=text_column, label_column=label_column, labels=labels, th=th)
        if against is not None:
            train = _read_train(against, text_column=text_column, label_column=label_column)
            suites.add_split_columns(frame, train, text_column=text_column)
            gx_checks += suites.split_checks(frame, train, label_column=label_column, train_path=against, th=th)
    results += _run_gx(
        frame, gx_checks, suite_name=f"labelled_{path.stem}", out_dir=out_dir, sev=sev, th=th, where=where,
        text_column=text_column, label_column=label_column,
    )
    if not usable:
        return results, len(frame)
    results.append(suites.class_balance_check(frame, label_column=label_column, labels=labels, th=th, severity=sev["class_balance"]))
    results.append(
        suites.nonprintable_check(
            frame[text_column], where=where, th=th, severity=sev["nonprintable_ratio"],
            count_replacement_char=data.decoded is None or data.decoded.utf8_error is None,
        )
    )
    if tokenizer is not None:
        texts = frame[text_column].fillna("").tolist()
        ids = suites.encode_all(tokenizer, texts)
        results += suites.token_checks(
            ids, tokenizer=tokenizer, context_length=context_length or th.context_length, where=where, texts=texts,
            th=th, severity=sev, truncation=True,
        )
    return results, len(frame)


def _read_train(against: Path, *, text_column: str, label_column: str) -> "pd.DataFrame":
    train = read_labelled(against, text_column=text_column, label_column=label_column)
    missing = [c for c in (text_column, label_column) if c not in train.frame.columns]
    if missing:
        raise UserError(
            f"the train file given with --against, {str(against)!r}, has no column(s) {missing}; "
            f"its columns are {train.columns}"
        )
    return train.frame


def _load_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None or not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from selfattn.data.tokenization import load_tokenizer

    try:
        return load_tokenizer(tokenizer)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer from {str(tokenizer)!r}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# Great Expectations
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _gx() -> tuple[Any, Any]:
    """The process's ephemeral GX context and its whole-dataframe batch definition (built once)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(context.list_data_docs_sites()):  # the default site points at a temp dir
        context.delete_data_docs_site(site)
    asset = context.data_sources.add_pandas("selfattn_data_checks").add_dataframe_asset("frame")
    return context, asset.add_batch_definition_whole_dataframe("whole_frame")


def _run_gx(
    frame: "pd.DataFrame",
    checks: list[suites.GXCheck],
    *,
    suite_name: str,
    out_dir: Path | None,
    sev: dict,
    th: CheckThresholds,
    where: Callable[[int], str],
    text_column: str | None = None,
    label_column: str | None = None,
) -> list[CheckResult]:
    """Run ``checks`` as one suite through a Checkpoint (with a Data Docs action when ``out_dir``)."""
    import great_expectations as gx

    for check in checks:
        check.expectation.meta = {"check": check.name}
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", suite_name)[:60]
    uid = uuid.uuid4().hex[:8]
    with _GX_LOCK:
        context, batch_definition = _gx()
        suite = context.suites.add(gx.ExpectationSuite(name=f"{safe}_{uid}", expectations=[c.expectation for c in checks]))
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"validation_{uid}", data=batch_definition, suite=suite)
        )
        actions = [] if out_dir is None else [_data_docs_action(context, out_dir / _DOCS_DIRNAME)]
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"checkpoint_{uid}",
                validation_definitions=[validation],
                actions=actions,
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": max(th.n_examples, 1)},
            )
        )
        try:
            outcome = checkpoint.run(batch_parameters={"dataframe": frame})
            for key in outcome.run_results:  # the in-memory results store would grow with every call
                context.validation_results_store.remove_key(key)
        finally:
            context.checkpoints.delete(checkpoint.name)
            context.validation_definitions.delete(validation.name)
            context.suites.delete(suite.name)
    (suite_result,) = outcome.run_results.values()
    by_name = {r.expectation_config.meta.get("check"): r for r in suite_result.results}
    common = {"sev": sev, "th": th, "where": where, "text_column": text_column, "label_column": label_column}
    return [_to_check_result(check, by_name[check.name], frame, **common) for check in checks]


def _data_docs_action(context: Any, docs_dir: Path) -> Any:
    """The checkpoint action that writes this suite's Data Docs under ``docs_dir`` (the one site, repointed)."""
    import great_expectations as gx

    docs_dir.mkdir(parents=True, exist_ok=True)
    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    if _DOCS_SITE in context.list_data_docs_sites():
        context.update_data_docs_site(_DOCS_SITE, site)
    else:
        context.add_data_docs_site(_DOCS_SITE, site)
    return gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=[_DOCS_SITE])


def _to_check_result(
    check: suites.GXCheck,
    r: Any,
    frame: "pd.DataFrame",
    *,
    sev: dict,
    th: CheckThresholds,
    where: Callable[[int], str],
    text_column: str | None,
    label_column: str | None,
) -> CheckResult:
    expectation_type = r.expectation_config.type
    error = _raised(r.exception_info)
    if error is not None:
        return CheckResult(check.name, expectation_type, sev[check.name], None,
                           f"Great Expectations could not evaluate this check: {error}", passed=False)
    result = dict(r.result or {})
    observed, detail = check.describe(result, bool(r.success))
    examples: list[str] = []
    if not r.success and th.n_examples:
        examples = _examples(result, frame, check=check, where=where, text_column=text_column, label_column=label_column, n=th.n_examples)
    return CheckResult(check.name, expectation_type, sev[check.name], observed, detail, examples, bool(r.success))


def _examples(
    result: dict, frame: "pd.DataFrame", *, check: suites.GXCheck, where: Callable[[int], str],
    text_column: str | None, label_column: str | None, n: int,
) -> list[str]:
    """Offending rows by GX's ``partial_unexpected_index_list`` (row positions of the frame)."""
    index = result.get("partial_unexpected_index_list") or []
    rows = []
    for i in index[:n]:
        i = int(i)
        if i >= len(frame):
            continue
        if text_column is not None and text_column in frame.columns:
            parts = [f"{where(i)}:"]
            if check.example_column not in (None, text_column, label_column):
                value = frame[check.example_column].iloc[i]
                shown = int(value) if isinstance(value, float) and value.is_integer() else value
                parts.append(f"{check.example_column}={shown}")
            if label_column in frame.columns:
                parts.append(f"label {frame[label_column].iloc[i]!r}")
            parts.append(suites._show(frame[text_column].iloc[i]))
            rows.append(" ".join(parts))
        else:  # corpus
            length = int(frame["line_length"].iloc[i])
            rows.append(f"{where(i)}: {length:,} chars {suites._show(frame['line'].iloc[i])}")
    if not rows and check.name in ("duplicate_lines",):
        rows = suites.most_repeated(frame["line"], n)
    return rows


def _raised(info: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation, if any."""
    if not isinstance(info, dict):
        return None
    if info.get("raised_exception"):
        return str(info.get("exception_message") or "unknown error")
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message") or "unknown error")
    return None
