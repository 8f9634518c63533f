"""Reading data files: one reader of tabular files (:func:`read_table`: TSV/CSV/JSON(L)/Parquet, texts
kept as texts, binaries and bad encodings refused with the row) and :func:`load_table`, which also
loads ``.txt`` corpora and hub datasets through HF ``datasets``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from selfattn.data.paths import FILE_SUFFIXES, cache_dir, resolve_path
from selfattn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover

    pass

TABLE_SUFFIXES = (".tsv", ".csv", ".jsonl", ".json", ".parquet")


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
class Table:
    """A tabular file as read by :func:`read_table`: the training data and the data gate see the same cells."""

    frame: Any  # pandas.DataFrame; .tsv/.csv cells are str, .jsonl/.json/.parquet keep their JSON/Arrow types
    columns: list[str]  # header as in the file
    decoded: DecodedText | None  # None for parquet (no text layer)
    row_offset: int  # file line of row 0 (2 with a header line, 1 for JSON lines), 0 for parquet


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


def read_table(path: str | Path) -> Table:
    """Read a .tsv/.csv/.jsonl/.json/.parquet file: the one reader of tabular data.

    Every cell of a delimited file is text: pandas' missing-value parsing is off, so sentences
    spelled ``NA``, ``null``, ``None``, ``nan`` or ``N/A`` stay those strings (only JSON ``null``
    and Arrow nulls are missing). TSV is read as GLUE writes it (tab, no quoting: SST-2 sentences
    hold bare quote characters); CSV with standard double-quote quoting. The delimiter comes from
    the extension, never sniffed. Unusable input (missing, empty, binary, unparseable) is a
    UserError; invalid UTF-8 is decoded with replacement characters and named in
    ``decoded.utf8_error`` (the gate reports it, the trainer refuses it).
    """
    import csv
    import io

    import pandas as pd

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise UserError(f"tabular data must be one of {', '.join(TABLE_SUFFIXES)}; {str(p)!r} has extension {suffix or '(none)'!r}")
    if suffix == ".parquet":
        try:
            frame = pd.read_parquet(io.BytesIO(read_bytes(p)))
        except UserError:
            raise
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise UserError(f"{str(p)!r} is not a readable parquet file: {exc}") from exc
        return Table(frame=frame, columns=[str(c) for c in frame.columns], decoded=None, row_offset=0)
    decoded = decode_text(read_bytes(p), path=p)
    text = normalise_newlines(decoded.text)
    if not text.strip():
        raise UserError(f"data file {str(p)!r} holds only whitespace: no header, no rows")
    try:
        if suffix in (".jsonl", ".json"):
            lines = suffix == ".jsonl" or not text.lstrip().startswith("[")
            frame = pd.read_json(io.StringIO(text), lines=lines, dtype=False)
            row_offset = 1
        else:
            frame = pd.read_csv(
                io.StringIO(text), sep="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL,
                dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=True,
            )
            row_offset = 2
    except (ValueError, pd.errors.ParserError) as exc:
        fmt = {".jsonl": "JSON lines", ".json": "JSON", ".tsv": "tab-separated", ".csv": "comma-separated"}[suffix]
        raise UserError(f"{str(p)!r} cannot be parsed as {fmt} data: {str(exc).strip()}") from exc
    columns = [str(c) for c in frame.columns]
    frame.columns = columns
    return Table(frame=frame, columns=columns, decoded=decoded, row_offset=row_offset)


def check_columns(table: Table, path: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"data {path!r} has no column {', '.join(repr(c) for c in missing)}; its columns are {', '.join(table.columns)}")


def load_table(path: str, *, split: str = "train", columns: Sequence[str] = ()):
    """Load a local file (txt/csv/tsv/json(l)/parquet) or a hub dataset as a ``datasets.Dataset``.

    Tabular files go through :func:`read_table` (texts stay texts); ``.txt`` files become one row
    per file (column ``text``, line breaks kept). ``columns`` must all exist, else a UserError
    names the missing ones and the columns present.
    """
    import datasets

    datasets.disable_progress_bars()
    local = resolve_path(path)
    hf_cache = str(cache_dir() / "datasets")
    try:
        if local is None:
            ds = datasets.load_dataset(path, split=split, cache_dir=hf_cache)
        else:
            builder = FILE_SUFFIXES.get(local.suffix.lower())
            if builder is None:
                raise UserError(f"unsupported data file type {local.suffix!r} for {local}; use one of {', '.join(sorted(FILE_SUFFIXES))}")
            kwargs: dict[str, Any] = {}
            if builder == "text":
                kwargs["sample_by"] = "document"
            if local.suffix.lower() in TABLE_SUFFIXES:
                table = read_table(local)
                check_columns(table, path, columns)
                return datasets.Dataset.from_pandas(table.frame, preserve_index=False)
            ds = datasets.load_dataset(builder, data_files={"data": str(local)}, split="data", cache_dir=hf_cache, **kwargs)
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise UserError(f"could not load data {path!r}: {exc}") from None
    except Exception as exc:  # datasets raises many types for unreadable / unknown input
        if local is None:
            raise UserError(f"could not load hub dataset {path!r} (split {split!r}): {type(exc).__name__}: {exc}") from None
        raise UserError(f"could not read data file {local}: {type(exc).__name__}: {exc}") from None
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise UserError(f"data {path!r} has no column {', '.join(repr(c) for c in missing)}; its columns are {', '.join(ds.column_names)}")
    return ds
