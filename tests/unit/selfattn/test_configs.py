"""The shipped training configs load and validate; the SST-2 sentence hold-out on the real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from selfattn.config import load_config
from selfattn.train import FinetuneConfig, PretrainConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    schema = PretrainConfig if path.name.startswith("pretrain") else FinetuneConfig
    cfg = load_config(schema, path, [])
    assert cfg.train.max_steps > 0


def test_sentence_holdout_on_sst2_is_leak_free(data_dir):
    from selfattn.data.classification import read_labelled, sentence_holdout

    texts, _ = read_labelled(str(data_dir / "sst2" / "train.tsv"), split="train", text_column="sentence", label_column="label", labels=[0, 1])
    train_idx, val_idx = sentence_holdout(texts, 0.1)
    held = [texts[i] for i in val_idx]
    assert 600 < len(held) < 800 and len(set(held)) == len(held)  # 10% of the 6.9k sentences
    assert sum(len(t.split()) for t in held) / len(held) > 15  # whole sentences (dev averages 19.5 words), not phrases
    train = [texts[i] for i in train_idx]
    train_set = set(train)
    assert not set(held) & train_set
    # a held-out sentence's phrase may stay in training only inside a longer training row (a kept sentence)
    from collections import Counter

    rows = Counter(train)
    wrapped = "".join(f"| {t} " for t in train) + "|"
    for sentence in held[:8]:
        w = sentence.split()
        for span in {" ".join(w[i:j]) for i in range(len(w)) for j in range(i + 1, len(w) + 1)} & train_set:
            assert wrapped.count(f" {span} ") > rows[span], span  # found beyond its own rows
    assert len(train_idx) > 0.85 * len(texts)
