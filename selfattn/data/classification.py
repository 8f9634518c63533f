"""Labelled text: a text column and a label column; labels are mapped to class indices through the
configured ``labels`` list; batches are length-bucketed and padded (right) with an attention mask
(True = real token). Batches are a pure function of ``(seed, position)``, as for LM data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from selfattn.data.cache import cache_key, cache_load, cache_save
from selfattn.data.config import ClassificationDataConfig
from selfattn.data.paths import resolve_path, source_digest
from selfattn.data.tables import TABLE_SUFFIXES, check_columns, load_table, read_table
from selfattn.data.tokenization import tokenizer_digest
from selfattn.errors import UserError
from selfattn.utils import seeded_generator

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from selfattn.data.tokenization import Tokenizer

log = logging.getLogger(__name__)


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
        check_columns(table, path, columns)
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
    keep_last = getattr(tokenizer, "template", False)  # [CLS] ... [SEP]: truncate the text, keep [SEP] (as transformers does)
    for text, y, ids in zip(texts, label_ids, tokenizer.encode_batch(list(texts))):
        if not ids:
            n_empty += 1
            continue
        if len(ids) > max_length:
            n_trunc += 1
            ids = ids[: max_length - 1] + ids[-1:] if keep_last else ids[:max_length]
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
    template = {"keep_last": True} if getattr(tokenizer, "template", False) else {}  # truncation keeps [SEP]
    key = cache_key(kind="cls", srcs=srcs, cfg=cfg.model_dump(exclude={"tokenizer", "vocab_size", "max_length", "token_dropout"}), max_len=max_len, tok=tokenizer_digest(tokenizer), **template)
    cached = cache_load(key)
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
            perm = torch.randperm(len(everything), generator=seeded_generator(0, "val_split")).tolist()
            train_idx, val_idx = perm[n_val:], perm[:n_val]
        if not train_idx or not val_idx:
            raise UserError(f"data {cfg.train_path!r} has too few rows ({len(everything)}) to hold out a validation set")
        train, val = everything.subset(train_idx), everything.subset(val_idx)
        train.n_truncated = everything.n_truncated
    arrays = {}
    for p, d in (("train", train), ("val", val)):
        arrays.update({f"{p}_flat": d.flat.numpy().astype(np.int32), f"{p}_offsets": d.offsets.numpy(), f"{p}_labels": d.labels.numpy(), f"{p}_trunc": np.array(d.n_truncated)})
    cache_save(key, **arrays)
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

        g = seeded_generator(self.seed, "cls_epoch", epoch)
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
            noise = torch.rand(ids.shape, generator=seeded_generator(self.seed, "token_dropout", position))
            batch["input_ids"] = torch.where(mask & (noise < self.token_dropout), torch.full_like(ids, self.unk_id), ids)
        return batch


def classification_eval_batches(data: ClassificationData, *, batch_size: int, pad_id: int) -> Iterator[tuple["torch.Tensor", dict[str, "torch.Tensor"]]]:
    """Every example once, sorted by length: yields ``(row indices [B], batch)``."""
    import torch

    order = torch.argsort(data.lengths, stable=True)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        yield idx, data.batch(idx, pad_id)
