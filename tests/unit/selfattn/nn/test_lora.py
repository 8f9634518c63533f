"""LoRA: identity at init, freezing, merge == unmerged, unmerge restores, errors name targets."""

from __future__ import annotations

import pydantic
import pytest
import torch

from selfattn.config import ModelConfig
from selfattn.nn.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    merge_lora,
    merged_state_dict,
    trainable_parameters,
    unmerge_lora,
)
from selfattn.nn.models import DecoderLM, SequenceClassifier

V = 40


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=V, context_length=16, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    base.update(kw)
    return ModelConfig(**base)


def _train_step(model, ids, steps: int = 3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_config_validation():
    cfg = LoRAConfig()
    assert (cfg.rank, cfg.alpha, cfg.targets) == (8, 16.0, ["q_proj", "v_proj"])
    for bad in (dict(rank=0), dict(alpha=0), dict(dropout=1.0), dict(targets=[]), dict(unknown=1)):
        with pytest.raises(pydantic.ValidationError):
            LoRAConfig(**bad)


def test_lora_linear_starts_as_the_base_layer():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 5)
    x = torch.randn(3, 8)
    lora = LoRALinear(base, rank=2, alpha=4)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = base(x) + 2.0 * (x @ lora.lora_A.T @ lora.lora_B.T)  # scaling = alpha / rank = 2
    torch.testing.assert_close(lora(x), expected)


def test_apply_lora_at_init_equals_base_model_and_freezes():
    torch.manual_seed(0)
    model = DecoderLM(_cfg()).eval()
    ids = torch.randint(0, V, (2, 9))
    before = model(ids).logits
    total_before = sum(p.numel() for p in model.parameters())
    apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert torch.equal(model(ids).logits, before)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 kv heads of 8): rank * (in + out) each
    expected_lora = 2 * 4 * ((32 + 32) + (32 + 16))
    report = trainable_parameters(model)
    assert report == {"trainable": expected_lora, "total": total_before + expected_lora, "ratio": pytest.approx(expected_lora / (total_before + expected_lora))}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_merge_equals_unmerged_after_training_and_unmerge_restores():
    torch.manual_seed(0)
    model = DecoderLM(_cfg())
    ids = torch.randint(0, V, (4, 12))
    base_q = model.blocks[0].attn.q_proj.weight.detach().clone()
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.1, targets=["q_proj", "v_proj", "out_proj"]))
    model.train()
    _train_step(model, ids)
    model.eval()
    lora_q = model.blocks[0].attn.q_proj
    assert torch.equal(lora_q.base.weight, base_q)  # the base stayed frozen
    assert lora_q.lora_B.abs().sum() > 0  # the adapter learned something
    unmerged = model(ids).logits

    merge_lora(model)
    assert lora_q.merged
    merged = model(ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(model(ids).logits, merged)

    unmerge_lora(model)
    torch.testing.assert_close(lora_q.base.weight, base_q, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_merged_state_dict_loads_into_a_plain_model():
    torch.manual_seed(0)
    model = DecoderLM(_cfg())
    ids = torch.randint(0, V, (2, 10))
    apply_lora(model, LoRAConfig(rank=2, alpha=4))
    _train_step(model, ids)
    model.eval()
    plain = DecoderLM(_cfg()).eval()
    plain.load_state_dict(merged_state_dict(model))  # strict: same keys as a model without LoRA
    torch.testing.assert_close(plain(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    # the adapted model itself was not changed
    assert all(not m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 4


def test_trainable_extra_unfreezes_the_classifier_head():
    torch.manual_seed(0)
    clf = SequenceClassifier(_cfg(n_classes=2))
    apply_lora(clf, LoRAConfig(rank=2, alpha=2, targets=["q_proj"]), trainable_extra=("head",))
    trainable = {n for n, p in clf.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable
    assert all(n.startswith("head.") or ".lora_" in n for n in trainable)
    ids = torch.randint(0, V, (3, 6))
    loss = clf(ids, labels=torch.tensor([0, 1, 0])).loss
    loss.backward()
    assert clf.head.weight.grad is not None and clf.tok_emb.weight.grad is None


def test_errors_name_the_bad_targets():
    model = DecoderLM(_cfg())
    with pytest.raises(ValueError, match=r"\['qkv'\] match no nn.Linear.*q_proj"):
        apply_lora(model, LoRAConfig(targets=["q_proj", "qkv"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing changed
    with pytest.raises(ValueError, match=r"trainable_extra \['classifier'\]"):
        apply_lora(model, LoRAConfig(), trainable_extra=("classifier",))
    apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig())
