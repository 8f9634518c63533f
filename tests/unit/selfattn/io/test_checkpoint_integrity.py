"""``load_pretrained`` on a damaged ``model.safetensors`` (truncated, zeroed, a few bytes flipped after a
power cut): a UserError naming the file, found by the SHA-256 recorded at save time."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from selfattn.errors import UserError
from selfattn.io.checkpoint import load_pretrained, save_pretrained
from selfattn.nn.models import DecoderLM


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = DecoderLM({"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_layers": 1, "context_length": 16})
    return save_pretrained(model, tmp_path / "ckpt")


def test_the_weights_digest_is_recorded_at_save_time(ckpt):
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["weights_sha256"] == hashlib.sha256((ckpt / "model.safetensors").read_bytes()).hexdigest()


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _zero(data: bytes) -> bytes:
    return b"\0" * len(data)


def _zero_tail(data: bytes) -> bytes:  # the header still parses: only the digest tells
    return data[: len(data) - 4096] + b"\0" * 4096


@pytest.mark.parametrize("damage", [_truncate, _zero, _zero_tail], ids=["truncated", "zeroed", "zeroed-tail"])
def test_a_damaged_weights_file_is_a_clear_error_naming_it(ckpt, damage):
    weights = ckpt / "model.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(UserError, match="is corrupt") as err:
        load_pretrained(ckpt)
    assert str(weights) in str(err.value) and "SHA-256" in str(err.value)
