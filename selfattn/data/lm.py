"""LM corpus data: documents are tokenized, joined with the EOS token into one contiguous token
stream and split into train (first ``1 - val_fraction``) and val (the rest). Training batches are
windows of ``block_size + 1`` tokens, either at random offsets (nanoGPT style) or at packed,
non-overlapping block boundaries shuffled per epoch.

Batches are a pure function of ``(seed, position)``: the batcher for position ``p`` always returns the
same global batch, so resuming needs only the position, and DDP ranks slice the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from selfattn.data.cache import cache_key, cache_load, cache_save
from selfattn.data.config import LMDataConfig
from selfattn.data.paths import source_digest
from selfattn.data.tables import load_table
from selfattn.data.tokenization import tokenizer_digest
from selfattn.errors import UserError
from selfattn.utils import seeded_generator

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from selfattn.data.tokenization import Tokenizer


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

    key = cache_key(kind="lm", src=source_digest(cfg.path, cfg.split), col=cfg.text_column, max_chars=cfg.max_chars, tok=tokenizer_digest(tokenizer))
    cached = cache_load(key)
    if cached is not None:
        ids = torch.from_numpy(cached["ids"].astype(np.int64))
    else:
        docs = load_corpus(cfg) if docs is None else docs
        ids = torch.tensor(encode_corpus(docs, tokenizer), dtype=torch.int64)
        cache_save(key, ids=ids.numpy().astype(np.int32))
    n_val = int(len(ids) * cfg.val_fraction)
    n_train = len(ids) - n_val
    if n_train < cfg.block_size + 2 or n_val < cfg.block_size + 2:
        raise UserError(
            f"corpus {cfg.path!r} is too small: {len(ids)} tokens give {n_train} train / {n_val} val tokens, "
            f"each needs more than block_size + 1 ({cfg.block_size + 1}); lower data.block_size or data.val_fraction"
        )
    return LMData(train_ids=ids[:n_train], val_ids=ids[n_train:], block_size=cfg.block_size)



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
            return torch.randint(len(self.windows), (self.batch_size,), generator=seeded_generator(self.seed, position))
        per_epoch = max(self.n_blocks // self.batch_size, 1)
        epoch, i = divmod(position, per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.n_blocks, generator=seeded_generator(self.seed, "epoch", epoch))
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
    g = seeded_generator(seed, "eval")
    for _ in range(n_batches):
        w = windows[torch.randint(len(windows), (batch_size,), generator=g)]
        yield w[:, :-1], w[:, 1:]
