"""Read a data file into pandas, refusing what is not usable data with a message naming the problem.

Order of checks: the file exists and is readable -> it is not empty -> it is text (no NUL bytes,
few control characters) -> it decodes as UTF-8 (a BOM is allowed) -> it parses in the format its
extension names. A failure in the first four steps or in parsing is *unusable input*
(``UserError``, exit 2). Invalid UTF-8 in an otherwise textual file is not unusable: the bytes are
decoded with replacement characters and the ``utf8`` check of the suite fails, naming the byte
offset, so the user sees every other problem in the same report.

Bytes, decoding and parsing are the library's (``selfattn.data.tables.read_table``, shared with the
trainer); this module adds the gate's normalisation. pandas is imported inside the functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

# the library's reader: the gate checks exactly the cells the trainer reads
from selfattn.data.tables import DecodedText, decode_text, normalise_newlines, read_bytes, read_table
from selfattn.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["DecodedText", "LabelledData", "decode_text", "detect_kind", "label_strings", "normalise_newlines", "read_bytes", "read_corpus", "read_labelled"]

CORPUS_SUFFIXES = (".txt", ".text", ".raw")
LABELLED_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class LabelledData:
    """A labelled table with text as ``str`` (None when blank) and labels as ``str`` (None when missing)."""

    frame: "pd.DataFrame"
    columns: list[str]  # as read from the file, before normalisation
    decoded: DecodedText | None  # None for parquet (no text layer to check)
    row_offset: int  # file line of row 0 (2 with a header line), 0 for parquet


def detect_kind(path: str | Path) -> str:
    """``corpus`` for .txt/.text/.raw, ``labelled`` for .tsv/.csv/.jsonl/.parquet; else UserError."""
    suffix = Path(path).suffix.lower()
    if suffix in CORPUS_SUFFIXES:
        return "corpus"
    if suffix in LABELLED_SUFFIXES:
        return "labelled"
    raise UserError(
        f"cannot tell what {str(path)!r} holds from its extension {suffix or '(none)'!r}: pass "
        f"--kind corpus (plain text, {', '.join(CORPUS_SUFFIXES)}) or --kind labelled "
        f"({', '.join(LABELLED_SUFFIXES)})"
    )


def read_corpus(path: str | Path) -> tuple[DecodedText, "pd.DataFrame"]:
    """A plain text corpus -> (decoded text, frame of its non-blank lines).

    The frame has ``line`` (str), ``line_no`` (1-based line in the file) and ``line_length``.
    """
    import pandas as pd

    decoded = decode_text(read_bytes(path), path=path)
    lines = pd.Series(normalise_newlines(decoded.text).split("\n"), dtype=object)
    line_no = pd.RangeIndex(1, len(lines) + 1)
    keep = lines.str.strip().str.len() > 0
    frame = pd.DataFrame({"line": lines[keep].to_numpy(), "line_no": line_no[keep.to_numpy()]})
    frame["line_length"] = frame["line"].str.len().astype("int64")
    return decoded, frame


def read_labelled(path: str | Path, *, text_column: str, label_column: str) -> LabelledData:
    """A .tsv/.csv/.jsonl/.parquet file -> normalised frame (text and label as str or None).

    Parsing is :func:`selfattn.data.tables.read_table`, the reader the trainer uses (texts such as
    ``NA`` or ``null`` stay texts). A comma-separated ``.tsv`` shows up as one wrong column and
    fails the column check with a hint instead of being silently accepted.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in LABELLED_SUFFIXES:
        raise UserError(
            f"labelled data must be one of {', '.join(LABELLED_SUFFIXES)}; {str(p)!r} has extension "
            f"{suffix or '(none)'!r}"
        )
    table = read_table(p)
    frame = table.frame
    if text_column in frame.columns:
        frame[text_column] = _as_text(frame[text_column])
    if label_column in frame.columns:
        frame[label_column] = _as_label(frame[label_column])
    return LabelledData(frame=frame.reset_index(drop=True), columns=table.columns, decoded=table.decoded, row_offset=table.row_offset)


def _as_text(col: "pd.Series") -> "pd.Series":
    """Texts as str (object dtype); missing or whitespace-only values become None (they count as nulls)."""
    notna = col.notna()
    strs = col.where(notna, "").astype(str)
    blank = ~notna | strs.str.strip().eq("")
    return strs.astype(object).where(~blank, None)


def _as_label(col: "pd.Series") -> "pd.Series":
    """Labels as str ('1', 'pos'), None when missing; integral floats (1.0 in a NaN-holding column) -> '1'."""
    import pandas as pd

    notna = col.notna()
    if pd.api.types.is_bool_dtype(col):
        strs = col.astype(str).str.lower()
    elif pd.api.types.is_float_dtype(col):
        values = col.where(notna, 0.0)
        strs = values.astype("int64").astype(str) if bool((values % 1 == 0).all()) else values.astype(str)
    else:
        strs = col.where(notna, "").astype(str).str.strip()
    missing = ~notna | strs.eq("")
    return strs.astype(object).where(~missing, None)


def label_strings(labels: object) -> list[str] | None:
    """Configured labels as the strings the frame holds: (0, 1) -> ['0', '1']; None stays None."""
    if labels is None:
        return None
    if isinstance(labels, (str, bytes)):
        raise ValueError(f"labels must be a sequence such as (0, 1), got the string {labels!r}")
    out = []
    for v in labels:  # type: ignore[union-attr]
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        out.append(str(v).lower() if isinstance(v, bool) else str(v).strip())
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"labels must be distinct and non-empty, got {list(labels)!r}")  # type: ignore[call-overload]
    return out
