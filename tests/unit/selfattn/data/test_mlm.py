"""BERT's masking: 15 % of the maskable tokens chosen, of those 80 % [MASK], 10 % random, 10 % kept; specials
and padding never chosen; labels only where chosen; the same generator seed, the same masks."""

from __future__ import annotations

import pytest
import torch

from selfattn.data.mlm import IGNORE_INDEX, MLMMasking
from selfattn.utils import seeded_generator


def test_masking_proportions_specials_and_labels():
    V, mask_id, specials = 1000, 3, (0, 1, 2, 3)
    ids = torch.randint(4, V, (400, 250), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    attention = torch.ones_like(ids, dtype=torch.bool)
    attention[::2, 200:] = False  # padding on every other row
    ids = ids.masked_fill(~attention, 0)
    masking = MLMMasking(mask_id=mask_id, vocab_size=V, special_ids=specials, probability=0.15)
    before = ids.clone()
    inputs, labels = masking.apply(ids, seeded_generator(1, "mlm", 0), attention)
    assert torch.equal(ids, before)  # not modified in place
    chosen = labels != IGNORE_INDEX
    maskable = attention & ~torch.isin(ids, torch.tensor(specials))
    assert not (chosen & ~maskable).any()  # never a special token or padding
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = chosen.sum().item()
    assert n / maskable.sum().item() == pytest.approx(0.15, abs=0.005)
    masked = (inputs == mask_id) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~kept
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.01)
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / V, abs=0.01)  # a random token may be the original
    assert replaced.sum().item() / n == pytest.approx(0.1, abs=0.01)
    assert 0 <= inputs[replaced].min() and inputs[replaced].max() < V  # any token, as transformers' collator draws them

    again = masking.apply(ids, seeded_generator(1, "mlm", 0), attention)
    other = masking.apply(ids, seeded_generator(1, "mlm", 1), attention)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)
    assert not torch.equal(other[1], labels)


def test_masking_uses_the_tokenizers_mask_token_or_unk():
    from selfattn.data.tokenization import CharTokenizer

    tok = CharTokenizer.train(["abc"])
    m = MLMMasking.for_tokenizer(tok, 0.2)
    assert m.mask_id == tok.unk_id and set(m.special_ids) == {tok.pad_id, tok.bos_id, tok.eos_id} and m.probability == 0.2
    with pytest.raises(ValueError, match="probability"):
        MLMMasking(mask_id=1, vocab_size=10, probability=0.0)
