"""Masked-LM data: BERT's masking of token windows, for pretraining an encoder (or continuing it on
in-domain text).

Each maskable token (not padding, not a special token) is chosen with ``probability`` (0.15);
of the chosen ones 80 % become the mask token, 10 % a random token and 10 % stay as they are
(Devlin et al., 2019; transformers' ``DataCollatorForLanguageModeling``). ``labels`` hold the
original id at chosen positions and ``IGNORE_INDEX`` (-100) elsewhere, so the loss covers exactly
the chosen tokens. A tokenizer without a mask token (the char and byte-level BPE tokenizers trained
here) masks with ``<unk>``, which byte-level BPE never produces.

Masks are drawn from a generator seeded by ``(seed, position)``: the same batch position always gets
the same mask, so a resumed run continues exactly, like the LM batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from selfattn.data.lm import lm_eval_batches
from selfattn.utils import seeded_generator

if TYPE_CHECKING:  # pragma: no cover
    import torch

IGNORE_INDEX = -100  # the models' "no loss here" label


@dataclass(frozen=True)
class MLMMasking:
    """How to mask: the mask token, the vocabulary random replacements come from, the ids never masked."""

    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    probability: float = 0.15

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ValueError(f"mlm probability ({self.probability}) must be in (0, 1)")
        if not 0 <= self.mask_id < self.vocab_size:
            raise ValueError(f"mask_id ({self.mask_id}) must be in [0, vocab_size={self.vocab_size})")

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, probability: float = 0.15) -> "MLMMasking":
        """The tokenizer's mask token (``[MASK]``, ``<mask>``), else ``<unk>``; its special tokens are never masked."""
        mask_id = getattr(tokenizer, "mask_id", None)
        special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id}
        special |= {i for i in (getattr(tokenizer, "cls_id", None), getattr(tokenizer, "sep_id", None)) if i is not None}
        return cls(mask_id=tokenizer.unk_id if mask_id is None else mask_id, vocab_size=tokenizer.vocab_size,
                   special_ids=tuple(sorted(special)), probability=probability)  # fmt: skip

    def apply(self, ids: "torch.Tensor", generator: "torch.Generator", attention_mask: "torch.Tensor | None" = None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``ids [B, T]`` -> ``(input_ids [B, T], labels [B, T])`` (``ids`` is not modified)."""
        import torch

        maskable = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(torch.bool)
        if self.special_ids:
            maskable &= ~torch.isin(ids, torch.tensor(self.special_ids, device=ids.device))
        draws = torch.rand((3, *ids.shape), generator=generator, device=ids.device)  # chosen? mask? random?
        chosen = maskable & (draws[0] < self.probability)
        to_mask = chosen & (draws[1] < 0.8)
        to_random = chosen & ~to_mask & (draws[2] < 0.5)  # half of the remaining 20 %
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=generator, device=ids.device)
        inputs = torch.where(to_mask, torch.full_like(ids, self.mask_id), ids)
        inputs = torch.where(to_random, random_ids, inputs)
        labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
        return inputs, labels


def mlm_eval_batches(
    ids: "torch.Tensor", masking: MLMMasking, *, block_size: int, batch_size: int, n_batches: int | None, seed: int = 1234
) -> Iterator[dict[str, "torch.Tensor"]]:
    """Validation windows (as :func:`selfattn.data.lm.lm_eval_batches`) masked with a fixed seed:
    ``{"input_ids", "labels"}`` per batch, the same masks at every evaluation."""
    for k, (x, _) in enumerate(lm_eval_batches(ids, block_size=block_size, batch_size=batch_size, n_batches=n_batches, seed=seed)):
        inputs, labels = masking.apply(x, seeded_generator(seed, "mlm_eval", k))
        yield {"input_ids": inputs, "labels": labels}
