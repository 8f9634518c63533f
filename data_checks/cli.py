"""CLI commands contributed by data_checks (registered through the selfattn.cli entry point).

``selfattn validate PATH ...`` prints one table and exits 0 (passes), 1 (fails the suite) or
2 (unusable input: missing, unreadable, empty, binary or unparseable file). Bad data never
produces a traceback: unusable input raises ``UserError`` (printed as one paragraph by
``selfattn.cli.main``), a failing suite ends with ``typer.Exit(1)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from selfattn.errors import UserError

EXIT_PASS, EXIT_FAIL, EXIT_UNUSABLE = 0, 1, 2


def register(app: typer.Typer) -> None:
    """Add this layer's commands to the selfattn CLI."""
    app.command(name="validate")(validate_command)


def validate_command(
    path: Path = typer.Argument(..., help="data file: .txt corpus, or .tsv/.csv/.jsonl/.parquet labelled data"),
    kind: Optional[str] = typer.Option(None, "--kind", help="corpus | labelled (default: from the extension)"),
    text_column: str = typer.Option("sentence", "--text-column", help="column holding the text"),
    label_column: str = typer.Option("label", "--label-column", help="column holding the label"),
    labels: Optional[str] = typer.Option("0,1", "--labels", help="allowed labels, comma-separated; '' = any"),
    against: Optional[Path] = typer.Option(None, "--against", help="train file: adds leakage and label-distribution checks"),
    output: Optional[Path] = typer.Option(None, "--output", help="folder for GX Data Docs (data_docs/index.html) and report.json"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="saved selfattn tokenizer folder: adds token checks"),
    context_length: Optional[int] = typer.Option(None, "--context-length", help="tokens per training window"),
    severity: Optional[list[str]] = typer.Option(
        None, "--severity", help="override a check's severity, e.g. --severity class_balance=warning (repeatable)"
    ),
    as_json: bool = typer.Option(False, "--json", help="print report.json's content instead of the table"),
) -> None:
    """Validate a data file with its Great Expectations suite: exit 0 pass, 1 fail, 2 unusable input."""
    import json

    from rich.console import Console

    from data_checks.validation import validate

    if kind is not None and kind not in ("corpus", "labelled"):
        raise UserError(f"--kind must be 'corpus' or 'labelled', got {kind!r}")
    try:
        report = validate(
            path,
            kind=kind,
            text_column=text_column,
            label_column=label_column,
            labels=_parse_labels(labels),
            against=against,
            output_dir=output,
            tokenizer=tokenizer,
            context_length=context_length,
            severity=_parse_severity(severity),
        )
    except ValueError as exc:  # invalid options (unknown check name, equal columns, ...)
        raise UserError(str(exc)) from exc
    console = Console()
    if as_json:
        console.print_json(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        console.print(report.summary_table(show_observed=console.width >= 120))
        if report.data_docs is not None:
            console.print(f"Data Docs: {report.data_docs / 'index.html'}    report: {report.report_json}")
    raise typer.Exit(EXIT_PASS if report.passed else EXIT_FAIL)


def _parse_labels(text: str | None) -> list[str] | None:
    if text is None or not text.strip():
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_severity(items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--severity takes CHECK=error|warning, got {item!r}")
        out[name.strip()] = value.strip()
    return out
