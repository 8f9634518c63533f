"""Read a data file into pandas, refusing what is not usable data with a message naming the problem.

Order of checks: the file exists and is readable -> it is not empty -> it is text (no NUL bytes,
few control characters) -> it decodes as UTF-8 (a BOM is allowed) -> it parses in the format its
extension names. A failure in the first four steps or in parsing is *unusable input*
(``UserError``, exit 2). Invalid UTF-8 in an otherwise textual file is not unusable: the bytes are
decoded with replacement characters and the ``utf8`` check of the suite fails, naming the byte
offset, so the user sees every other problem in the same report.

pandas is imported inside the functions (``import data_checks`` stays fast).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from selfattn.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

CORPUS_SUFFIXES = (".txt", ".text", ".raw")
LABELLED_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")
# bytes 0-31 other than tab, LF, VT, FF, CR, plus DEL: frequent in binaries, rare in text
_CONTROL_BYTES = bytes(b for b in range(32) if b not in (9, 10, 11, 12, 13)) + b"\x7f"
_BINARY_SNIFF_BYTES = 65_536
_MAX_CONTROL_BYTE_RATIO = 0.10


@dataclass(frozen=True)
class DecodedText:
    """A file's text. ``utf8_error`` names the first invalid byte (then ``text`` has U+FFFD there)."""

    text: str
    n_bytes: int
    had_bom: bool
    utf8_error: str | None = None


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


def read_bytes(path: str | Path) -> bytes:
    """The file's bytes; a missing, unreadable or empty file is a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"data file {str(p)!r} does not exist")
    if not p.is_file():
        raise UserError(f"data path {str(p)!r} is not a regular file (a directory?)")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read data file {str(p)!r}: {exc.strerror or exc}") from exc
    if not data:
        raise UserError(f"data file {str(p)!r} is empty (0 bytes)")
    return data


def decode_text(data: bytes, *, path: str | Path) -> DecodedText:
    """Refuse binary data, then decode UTF-8 (BOM allowed) strictly, falling back to replacement."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise UserError(
            f"{str(path)!r} is not a text file: NUL byte at byte offset {nul} (a binary, compressed or "
            "UTF-16 file?). Save it as UTF-8 text."
        )
    head = data[:_BINARY_SNIFF_BYTES]
    n_control = sum(head.count(b) for b in _CONTROL_BYTES)
    if n_control / len(head) > _MAX_CONTROL_BYTE_RATIO:
        raise UserError(
            f"{str(path)!r} is not a text file: {n_control} of its first {len(head)} bytes "
            f"({n_control / len(head):.0%}) are control characters"
        )
    had_bom = data.startswith(b"\xef\xbb\xbf")
    try:
        return DecodedText(text=data.decode("utf-8-sig"), n_bytes=len(data), had_bom=had_bom)
    except UnicodeDecodeError as exc:
        offset = exc.start
        line = data.count(b"\n", 0, offset) + 1
        bad = data[offset : min(exc.end, offset + 4)].hex(" ")
        n_bad = data.decode("utf-8-sig", errors="replace").count("\ufffd")
        error = (
            f"invalid UTF-8 at byte offset {offset} (line {line}): byte(s) {bad} ({exc.reason}); "
            f"{n_bad} replacement character(s) in the whole file -- re-encode it as UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        )
        text = data.decode("utf-8-sig", errors="replace")
        return DecodedText(text=text, n_bytes=len(data), had_bom=had_bom, utf8_error=error)


def normalise_newlines(text: str) -> str:
    """CRLF and lone CR line ends become LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


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

    TSV is read as GLUE writes it (tab, no quoting: SST-2 sentences contain quote characters);
    CSV with the standard double-quote quoting. The delimiter comes from the extension, never
    sniffed, so a comma-separated ``.tsv`` shows up as one wrong column and fails the column check
    with a hint instead of being silently accepted.
    """
    import pandas as pd

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in LABELLED_SUFFIXES:
        raise UserError(
            f"labelled data must be one of {', '.join(LABELLED_SUFFIXES)}; {str(p)!r} has extension "
            f"{suffix or '(none)'!r}"
        )
    decoded: DecodedText | None = None
    row_offset = 2
    if suffix == ".parquet":
        raw = read_bytes(p)
        try:
            frame = pd.read_parquet(io.BytesIO(raw))
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise UserError(f"{str(p)!r} is not a readable parquet file: {exc}") from exc
        row_offset = 0
    else:
        decoded = decode_text(read_bytes(p), path=p)
        text = normalise_newlines(decoded.text)
        if not text.strip():
            raise UserError(f"data file {str(p)!r} holds only whitespace: no header, no rows")
        try:
            if suffix == ".jsonl":
                row_offset = 1
                frame = pd.read_json(io.StringIO(text), lines=True, dtype=False)
            else:
                sep = "\t" if suffix == ".tsv" else ","
                quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
                frame = pd.read_csv(
                    io.StringIO(text),
                    sep=sep,
                    quoting=quoting,
                    dtype=str,
                    keep_default_na=False,
                    na_filter=False,
                    skip_blank_lines=True,
                )
        except (ValueError, pd.errors.ParserError) as exc:
            fmt = {".jsonl": "JSON lines", ".tsv": "tab-separated", ".csv": "comma-separated"}[suffix]
            raise UserError(f"{str(p)!r} cannot be parsed as {fmt} data: {str(exc).strip()}") from exc
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    if text_column in frame.columns:
        frame[text_column] = _as_text(frame[text_column])
    if label_column in frame.columns:
        frame[label_column] = _as_label(frame[label_column])
    return LabelledData(frame=frame.reset_index(drop=True), columns=columns, decoded=decoded, row_offset=row_offset)


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
