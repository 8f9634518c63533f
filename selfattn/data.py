"""Data: locating files, reading them (one reader of tabular files, :func:`read_table`; HF ``datasets`` for the hub), tokenizing (cached) and batching.

Two shapes of data feed the training engine:

* **LM corpus** (``LMDataConfig``): documents are tokenized, joined with the EOS token into
  one contiguous token stream and split into train (first ``1 - val_fraction``) and val (the
  rest). Training batches are windows of ``block_size + 1`` tokens, either at random offsets
  (nanoGPT style) or at packed, non-overlapping block boundaries shuffled per epoch.
* **Labelled text** (``ClassificationDataConfig``): a text column and a label column; labels
  are mapped to class indices through the configured ``labels`` list; batches are
  length-bucketed and padded (right) with an attention mask (True = real token).

Paths: ``${SELFATTN_DATA_DIR}/sst2/train.tsv`` is expanded from the environment; a relative
path that does not exist under the working directory is tried under ``data_dir()``. Anything
that is neither an existing file nor has a file suffix is treated as a HF hub id.

Batches are a pure function of ``(seed, position)``: the batcher for position ``p`` always
returns the same global batch, so resuming needs only the position, and DDP ranks slice the
same global batch (equal results to one process at equal global batch size).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

from pydantic import Field, model_validator

from selfattn.config import StrictModel
from selfattn.errors import UserError
from selfattn.utils import atomic_path

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from selfattn.tokenization import Tokenizer

log = logging.getLogger(__name__)

TokenizerKind = Literal["char", "bpe"]
FILE_SUFFIXES = {".txt": "text", ".text": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# --------------------------------------------------------------------------- configs


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


# --------------------------------------------------------------------------- locations


def data_dir() -> Path | None:
    """The real-data folder from ``$SELFATTN_DATA_DIR``, or None when unset."""
    value = os.environ.get("SELFATTN_DATA_DIR")
    return Path(value) if value else None


def selfattn_home() -> Path:
    """``$SELFATTN_HOME`` (default ``./.selfattn``); holds caches and runs."""
    return Path(os.environ.get("SELFATTN_HOME") or ".selfattn")


def cache_dir() -> Path:
    """Where tokenized data and HF dataset caches go (never the read-only data dir)."""
    return selfattn_home() / "cache"


def resolve_path(path: str) -> Path | None:
    """A local file for ``path``, or None when ``path`` looks like a hub id.

    ``$VAR`` / ``${VAR}`` and ``~`` are expanded; a relative path missing from the working
    directory is tried under ``data_dir()``. A path with a file suffix that exists nowhere is a
    UserError naming the places tried.
    """
    if "$" in path:
        expanded = os.path.expandvars(path)
        if "$" in expanded:
            raise UserError(f"data path {path!r} uses an environment variable that is not set (e.g. export SELFATTN_DATA_DIR=/path/to/data)")
        path = expanded
    p = Path(path).expanduser()
    tried = [p]
    if p.is_file():
        return p
    base = data_dir()
    if not p.is_absolute() and base is not None:
        q = base / p
        tried.append(q)
        if q.is_file():
            return q
    if p.suffix.lower() in FILE_SUFFIXES or p.is_absolute() or path.startswith("."):
        hint = "" if base is not None else " (SELFATTN_DATA_DIR is not set)"
        raise UserError(f"data file not found: {path!r}; tried {', '.join(str(t) for t in tried)}{hint}")
    return None


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_digest(path: str, split: str) -> str:
    """Digest naming a data source: file content for local files, id + split for the hub."""
    local = resolve_path(path)
    return file_digest(local) if local is not None else f"hub:{path}:{split}"


# --------------------------------------------------------------------------- the table reader

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


def _table_columns(table: Table, path: str, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"data {path!r} has no column {', '.join(repr(c) for c in missing)}; its columns are {', '.join(table.columns)}")


# --------------------------------------------------------------------------- loading


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
                _table_columns(table, path, columns)
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


def load_corpus(cfg: LMDataConfig) -> list[str]:
    """The corpus documents (strings); a UserError if there is no text."""
    ds = load_table(cfg.path, split=cfg.split, columns=[cfg.text_column])
    docs = [t for t in ds[cfg.text_column] if isinstance(t, str) and t]
    if cfg.max_chars is not None:
        docs, left = [], cfg.max_chars
        for t in ds[cfg.text_column]:
            if left <= 0:
                break
            if isinstance(t, str) and t:
                docs.append(t[:left])
                left -= len(docs[-1])
    if not any(d.strip() for d in docs):
        raise UserError(f"corpus {cfg.path!r} is empty: no text in column {cfg.text_column!r}")
    return docs


def train_tokenizer(kind: str, texts: Sequence[str], vocab_size: int) -> "Tokenizer":
    """Train a char or byte-level BPE tokenizer on ``texts``."""
    from selfattn.tokenization import BPETokenizer, CharTokenizer

    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise ValueError(f"tokenizer kind must be 'char' or 'bpe', got {kind!r}")


def tokenizer_digest(tokenizer: "Tokenizer") -> str:
    """Digest of a tokenizer's saved files (keys the token cache)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(d)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- token cache


def _cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _cache_load(key: str) -> dict[str, Any] | None:
    import numpy as np

    f = cache_dir() / "tokens" / f"{key}.npz"
    if not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None


def _cache_save(key: str, **arrays: Any) -> None:
    import numpy as np

    with atomic_path(cache_dir() / "tokens" / f"{key}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


# --------------------------------------------------------------------------- LM data


@dataclass
class LMData:
    """Token streams for LM training: ``train_ids`` / ``val_ids`` [N] int64."""

    train_ids: "torch.Tensor"
    val_ids: "torch.Tensor"
    block_size: int


def encode_corpus(docs: Sequence[str], tokenizer: "Tokenizer") -> list[int]:
    """Documents joined into one stream, separated by EOS."""
    ids: list[int] = []
    for i, doc_ids in enumerate(tokenizer.encode_batch(list(docs))):
        if i:
            ids.append(tokenizer.eos_id)
        ids.extend(doc_ids)
    return ids


def prepare_lm_data(cfg: LMDataConfig, tokenizer: "Tokenizer", docs: Sequence[str] | None = None) -> LMData:
    """Tokenize (cached under ``cache_dir()``) and split the corpus into train/val streams."""
    import numpy as np
    import torch

    key = _cache_key(kind="lm", src=source_digest(cfg.path, cfg.split), col=cfg.text_column, max_chars=cfg.max_chars, tok=tokenizer_digest(tokenizer))
    cached = _cache_load(key)
    if cached is not None:
        ids = torch.from_numpy(cached["ids"].astype(np.int64))
    else:
        docs = load_corpus(cfg) if docs is None else docs
        ids = torch.tensor(encode_corpus(docs, tokenizer), dtype=torch.int64)
        _cache_save(key, ids=ids.numpy().astype(np.int32))
    n_val = int(len(ids) * cfg.val_fraction)
    n_train = len(ids) - n_val
    if n_train < cfg.block_size + 2 or n_val < cfg.block_size + 2:
        raise UserError(
            f"corpus {cfg.path!r} is too small: {len(ids)} tokens give {n_train} train / {n_val} val tokens, "
            f"each needs more than block_size + 1 ({cfg.block_size + 1}); lower data.block_size or data.val_fraction"
        )
    return LMData(train_ids=ids[:n_train], val_ids=ids[n_train:], block_size=cfg.block_size)


def _generator(*seeds: int) -> "torch.Generator":
    import torch

    g = torch.Generator()
    g.manual_seed(int(hashlib.sha256(repr(seeds).encode()).hexdigest()[:15], 16))
    return g


class LMBatcher:
    """Global batches of windows ``(x [B,T], y [B,T])`` as a pure function of position."""

    def __init__(self, *, ids: "torch.Tensor", block_size: int, batch_size: int, seed: int, sampling: str = "random") -> None:
        if len(ids) < block_size + 2:
            raise ValueError(f"token stream ({len(ids)}) must be longer than block_size + 1 ({block_size + 1})")
        self.windows = ids.unfold(0, block_size + 1, 1)  # [N - T, T + 1] view, no copy
        self.block_size, self.batch_size, self.seed, self.sampling = block_size, batch_size, seed, sampling
        self.n_blocks = (len(ids) - 1) // block_size
        self._epoch, self._perm = -1, None

    def offsets(self, position: int) -> "torch.Tensor":
        import torch

        if self.sampling == "random":
            return torch.randint(len(self.windows), (self.batch_size,), generator=_generator(self.seed, position))
        per_epoch = max(self.n_blocks // self.batch_size, 1)
        epoch, i = divmod(position, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.n_blocks, generator=_generator(self.seed, "epoch", epoch))
        idx = self._perm[(i * self.batch_size + torch.arange(self.batch_size)) % self.n_blocks]
        return torch.clamp(idx * self.block_size, max=len(self.windows) - 1)

    def get(self, position: int) -> tuple["torch.Tensor", "torch.Tensor"]:
        w = self.windows[self.offsets(position)]  # [B, T+1]
        return w[:, :-1], w[:, 1:]


def lm_eval_batches(ids: "torch.Tensor", *, block_size: int, batch_size: int, n_batches: int | None, seed: int = 1234) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """Validation batches: ``n_batches`` random windows (nanoGPT's estimate), or None = every block once."""
    import torch

    windows = ids.unfold(0, block_size + 1, 1)
    if n_batches is None:
        starts = torch.arange(0, len(ids) - block_size - 1 + 1, block_size)
        starts = starts[starts < len(windows)]
        for i in range(0, len(starts), batch_size):
            w = windows[starts[i : i + batch_size]]
            yield w[:, :-1], w[:, 1:]
        return
    g = _generator(seed, "eval")
    for _ in range(n_batches):
        w = windows[torch.randint(len(windows), (batch_size,), generator=g)]
        yield w[:, :-1], w[:, 1:]


# --------------------------------------------------------------------------- classification data


@dataclass
class ClassificationData:
    """Ragged token ids (``flat`` [N_tokens] + ``offsets`` [N+1]) and class indices ``labels`` [N]."""

    flat: "torch.Tensor"
    offsets: "torch.Tensor"
    labels: "torch.Tensor"
    n_truncated: int
    texts: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> "torch.Tensor":
        return self.offsets[1:] - self.offsets[:-1]

    def subset(self, idx: Sequence[int]) -> "ClassificationData":
        import torch

        idx_t = torch.as_tensor(list(idx), dtype=torch.int64)
        pieces = [self.flat[self.offsets[i] : self.offsets[i + 1]] for i in idx_t.tolist()]
        lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        flat = torch.cat(pieces) if pieces else self.flat[:0]
        texts = [self.texts[i] for i in idx_t.tolist()] if self.texts is not None else None
        return ClassificationData(flat=flat, offsets=offsets, labels=self.labels[idx_t], n_truncated=0, texts=texts)

    def batch(self, idx: "torch.Tensor", pad_id: int) -> dict[str, "torch.Tensor"]:
        """Pad the rows ``idx`` to their longest: ``input_ids`` [B,T], ``attention_mask`` [B,T] bool, ``labels`` [B]."""
        import torch

        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        t = int(lengths.max())
        pos = torch.arange(t)
        mask = pos[None, :] < lengths[:, None]  # [B, T]
        gather = (starts[:, None] + pos[None, :]).clamp(max=max(len(self.flat) - 1, 0))
        input_ids = torch.where(mask, self.flat[gather], torch.full_like(gather, pad_id))
        return {"input_ids": input_ids, "attention_mask": mask, "labels": self.labels[idx]}


def label_index(labels: Sequence[int | str]) -> dict[str, int]:
    return {str(v): i for i, v in enumerate(labels)}


def read_labelled(path: str, *, split: str, text_column: str, label_column: str | None, labels: Sequence[int | str], max_rows: int | None = None) -> tuple[list[str], list[int] | None]:
    """Texts and label indices from a file; a UserError for a missing column, a missing/blank text
    or a label outside ``labels``. Local tabular files are read by :func:`read_table`, as the gate reads them."""
    columns = [text_column] + ([label_column] if label_column else [])
    local = resolve_path(path)
    if local is not None and local.suffix.lower() in TABLE_SUFFIXES:
        table = read_table(local)
        if table.decoded is not None and table.decoded.utf8_error:
            raise UserError(f"data {path!r}: {table.decoded.utf8_error}")
        _table_columns(table, path, columns)
        frame = table.frame if max_rows is None else table.frame.iloc[:max_rows]
        texts_raw = frame[text_column].tolist()
        values = frame[label_column].tolist() if label_column else []
    else:
        ds = load_table(path, split=split, columns=columns)
        if max_rows is not None:
            ds = ds.select(range(min(max_rows, len(ds))))
        texts_raw = ds[text_column]
        values = ds[label_column] if label_column else []
    if len(texts_raw) == 0:
        raise UserError(f"data {path!r} has no rows")
    bad_text = [i for i, t in enumerate(texts_raw) if not isinstance(t, str) or not t.strip()]
    if bad_text:
        raise UserError(f"data {path!r}: column {text_column!r} has {len(bad_text)} missing/blank/non-text values (first at row {bad_text[0]})")
    texts = [t.strip() for t in texts_raw]
    if label_column is None:
        return texts, None
    index = label_index(labels)
    out, unknown = [], {}
    for v in values:
        key = str(v).strip()
        i = index.get(key)
        if i is None:
            unknown[key] = unknown.get(key, 0) + 1
            i = -1
        out.append(i)
    if unknown:
        shown = ", ".join(f"{k!r} ({n} rows)" for k, n in list(unknown.items())[:5])
        raise UserError(f"data {path!r}: label column {label_column!r} has values outside the configured labels {list(labels)}: {shown}")
    return texts, out


def encode_labelled(texts: Sequence[str], label_ids: Sequence[int], tokenizer: "Tokenizer", max_length: int, source: str = "data") -> ClassificationData:
    """Tokenize and truncate to ``max_length``; drops empty texts; warns with the truncation count."""
    import torch

    pieces, kept_labels, kept_texts, n_trunc, n_empty = [], [], [], 0, 0
    for text, y, ids in zip(texts, label_ids, tokenizer.encode_batch(list(texts))):
        if not ids:
            n_empty += 1
            continue
        if len(ids) > max_length:
            n_trunc += 1
            ids = ids[:max_length]
        pieces.append(ids)
        kept_labels.append(y)
        kept_texts.append(text)
    if not pieces:
        raise UserError(f"{source}: no non-empty text to classify")
    if n_empty:
        log.warning("%s: %d empty text(s) were dropped", source, n_empty)
    if n_trunc:
        log.warning("%s: %d of %d sequences are longer than max_length (%d tokens) and were truncated", source, n_trunc, len(pieces), max_length)
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    flat = torch.tensor([t for p in pieces for t in p], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    return ClassificationData(flat=flat, offsets=offsets, labels=torch.tensor(kept_labels, dtype=torch.int64), n_truncated=n_trunc, texts=kept_texts)


def prepare_classification_data(cfg: ClassificationDataConfig, tokenizer: "Tokenizer", *, max_length: int | None = None) -> tuple[ClassificationData, ClassificationData]:
    """Train and val sets (val from ``val_path`` or the last ``val_fraction`` of train), cached."""
    import numpy as np
    import torch

    max_len = min(cfg.max_length, max_length) if max_length else cfg.max_length
    srcs = {"train": source_digest(cfg.train_path, cfg.split), "val": source_digest(cfg.val_path, cfg.val_split) if cfg.val_path else None}
    key = _cache_key(kind="cls", srcs=srcs, cfg=cfg.model_dump(exclude={"tokenizer", "vocab_size", "max_length", "token_dropout"}), max_len=max_len, tok=tokenizer_digest(tokenizer))
    cached = _cache_load(key)
    if cached is not None:
        def part(p: str) -> ClassificationData:
            return ClassificationData(
                flat=torch.from_numpy(cached[f"{p}_flat"].astype(np.int64)),
                offsets=torch.from_numpy(cached[f"{p}_offsets"]),
                labels=torch.from_numpy(cached[f"{p}_labels"]),
                n_truncated=int(cached[f"{p}_trunc"]),
            )
        train, val = part("train"), part("val")
        for name, d in (("train", train), ("val", val)):
            if d.n_truncated:
                log.warning("%s data: %d of %d sequences are longer than max_length (%d tokens) and were truncated", name, d.n_truncated, len(d), max_len)
        return train, val
    texts, labels = read_labelled(cfg.train_path, split=cfg.split, text_column=cfg.text_column, label_column=cfg.label_column, labels=cfg.labels, max_rows=cfg.max_examples)
    if cfg.val_path:
        train = encode_labelled(texts, labels, tokenizer, max_len, source=f"train data {cfg.train_path}")
        vtexts, vlabels = read_labelled(cfg.val_path, split=cfg.val_split, text_column=cfg.text_column, label_column=cfg.label_column, labels=cfg.labels)
        val = encode_labelled(vtexts, vlabels, tokenizer, max_len, source=f"val data {cfg.val_path}")
    else:
        everything = encode_labelled(texts, labels, tokenizer, max_len, source=f"data {cfg.train_path}")
        if cfg.val_holdout == "sentences":
            train_idx, val_idx = sentence_holdout(everything.texts or [], cfg.val_fraction)
        else:
            n_val = max(1, int(len(everything) * cfg.val_fraction))
            perm = torch.randperm(len(everything), generator=_generator(0, "val_split")).tolist()
            train_idx, val_idx = perm[n_val:], perm[:n_val]
        if not train_idx or not val_idx:
            raise UserError(f"data {cfg.train_path!r} has too few rows ({len(everything)}) to hold out a validation set")
        train, val = everything.subset(train_idx), everything.subset(val_idx)
        train.n_truncated = everything.n_truncated
    arrays = {}
    for p, d in (("train", train), ("val", val)):
        arrays.update({f"{p}_flat": d.flat.numpy().astype(np.int32), f"{p}_offsets": d.offsets.numpy(), f"{p}_labels": d.labels.numpy(), f"{p}_trunc": np.array(d.n_truncated)})
    _cache_save(key, **arrays)
    return train, val


MAX_HOLDOUT_SPANS = 50_000_000


def _word_spans(words: Sequence[str], *, proper: bool) -> Iterator[str]:
    """Every contiguous word span of ``words`` as a string (``proper``: shorter than the whole)."""
    n = len(words)
    for i in range(n):
        for j in range(i + 1, n + 1):
            if not (proper and j - i == n):
                yield " ".join(words[i:j])


def sentence_holdout(texts: Sequence[str], val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Leak-free validation rows for phrase-level data: ``(train_idx, val_idx)``.

    A *sentence* is a text that is no word span of another text. ``val_fraction`` of the distinct
    sentences (at least one) are held out, one row each. A row stays in training only if it is a word
    span of a sentence that is *not* held out: phrases that occur only inside held-out sentences
    (and copies of those sentences) leave training, while phrases shared with training sentences
    ("good", "the film") stay, as they would without the hold-out. Data without nested phrases
    reduces to a random hold-out of whole rows.

    Every word span of every row is hashed (SST-2: 5.5M spans, ~5 s); data whose rows hold more
    than ``MAX_HOLDOUT_SPANS`` spans in total (long documents) is refused with a UserError.
    """
    import random

    words = [t.split() for t in texts]
    n_spans = sum(len(w) * (len(w) + 1) // 2 for w in words)
    if n_spans > MAX_HOLDOUT_SPANS:
        mean_words = sum(len(w) for w in words) / max(len(words), 1)
        raise UserError(
            f"val_holdout='sentences' is for phrase-level data of short texts; these {len(words)} rows "
            f"(mean {mean_words:.0f} words) hold {n_spans:,} word spans, more than {MAX_HOLDOUT_SPANS:,}: use val_holdout='random'"
        )
    keys = [" ".join(w) for w in words]
    inner = {span for w in words for span in _word_spans(w, proper=True)}
    sentences = sorted(set(keys) - inner)
    random.Random(seed).shuffle(sentences)
    held = set(sentences[: max(1, int(len(sentences) * val_fraction))])
    kept_spans = {span for s in sentences if s not in held for span in _word_spans(s.split(), proper=False)}
    seen: set[str] = set()
    val_idx, train_idx = [], []
    for i, key in enumerate(keys):
        if key in held:
            if key not in seen:  # one row per held-out sentence
                seen.add(key)
                val_idx.append(i)
        elif key in kept_spans:
            train_idx.append(i)
    return train_idx, val_idx


class ClassificationBatcher:
    """Length-bucketed, shuffled global batches as a pure function of position (epochs drop the ragged tail).

    ``token_dropout`` > 0 replaces each real token with ``unk_id`` with that probability, drawn
    from a generator seeded by the position, so a resumed run sees the same batches.
    """

    def __init__(self, *, data: ClassificationData, batch_size: int, seed: int, pad_id: int, bucket_factor: int = 50, token_dropout: float = 0.0, unk_id: int = 1) -> None:
        if len(data) < batch_size:
            raise UserError(f"training set has {len(data)} examples, fewer than train.batch_size ({batch_size})")
        if not 0.0 <= token_dropout < 1.0:
            raise ValueError(f"token_dropout ({token_dropout}) must be in [0, 1)")
        self.data, self.batch_size, self.seed, self.pad_id, self.bucket = data, batch_size, seed, pad_id, bucket_factor
        self.token_dropout, self.unk_id = token_dropout, unk_id
        self.per_epoch = len(data) // batch_size
        self._epoch, self._batches = -1, None

    def _epoch_batches(self, epoch: int) -> "torch.Tensor":
        import torch

        g = _generator(self.seed, "cls_epoch", epoch)
        perm = torch.randperm(len(self.data), generator=g)[: self.per_epoch * self.batch_size]
        lengths = self.data.lengths[perm]
        chunk = self.batch_size * self.bucket
        parts = []
        for i in range(0, len(perm), chunk):
            order = torch.argsort(lengths[i : i + chunk], stable=True)
            parts.append(perm[i : i + chunk][order])
        batches = torch.cat(parts).view(self.per_epoch, self.batch_size)
        return batches[torch.randperm(self.per_epoch, generator=g)]

    def get(self, position: int) -> dict[str, "torch.Tensor"]:
        epoch, i = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch)
        batch = self.data.batch(self._batches[i], self.pad_id)
        if self.token_dropout > 0:
            import torch

            ids, mask = batch["input_ids"], batch["attention_mask"]
            noise = torch.rand(ids.shape, generator=_generator(self.seed, "token_dropout", position))
            batch["input_ids"] = torch.where(mask & (noise < self.token_dropout), torch.full_like(ids, self.unk_id), ids)
        return batch


def classification_eval_batches(data: ClassificationData, *, batch_size: int, pad_id: int) -> Iterator[tuple["torch.Tensor", dict[str, "torch.Tensor"]]]:
    """Every example once, sorted by length: yields ``(row indices [B], batch)``."""
    import torch

    order = torch.argsort(data.lengths, stable=True)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield idx, data.batch(idx, pad_id)
