"""Checkpoint guards: the config digest in the weights' metadata, and LM configs that cannot be built."""

from __future__ import annotations

import json

import pytest
import torch

from selfattn.checkpoint import load_pretrained, save_pretrained
from selfattn.errors import UserError
from selfattn.models import DecoderLM


def _saved(tmp_path, **over):
    torch.manual_seed(0)
    model = DecoderLM({"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_layers": 1, "context_length": 16, **over})
    return model, save_pretrained(model, tmp_path / "ckpt")


def _edit(d, **fields):
    meta = json.loads((d / "config.json").read_text())
    meta["model"].update(fields)
    (d / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fields", [{"n_heads": 2}, {"rope_base": 500.0}, {"position": "none"}, {"norm_eps": 1e-3}])
def test_shape_compatible_config_edit_is_refused_naming_the_field(tmp_path, fields):
    _, d = _saved(tmp_path)
    _edit(d, **fields)
    with pytest.raises(UserError) as err:
        load_pretrained(d)
    (name, value), = fields.items()
    assert "does not match the config these weights were saved with" in str(err.value)
    assert f"{name}: " in str(err.value) and repr(value) in str(err.value)


def test_untouched_and_dropout_only_edits_load(tmp_path):
    model, d = _saved(tmp_path)
    x = torch.randint(0, 40, (1, 8))
    assert torch.equal(load_pretrained(d).model(x).logits, model.eval()(x).logits)
    _edit(d, dropout=0.1)  # no effect on eval logits: allowed
    assert load_pretrained(d).config.dropout == 0.1


def test_weights_without_a_digest_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    _, d = _saved(tmp_path)
    save_file(load_file(str(d / "model.safetensors")), str(d / "model.safetensors"), metadata={"format": "pt"})
    _edit(d, rope_base=500.0)  # nothing to check against: accepted, as before digests existed
    assert load_pretrained(d).config.rope_base == 500.0


def test_low_rank_lm_checkpoint_is_a_user_error_in_the_cli(tmp_path, capsys):
    from selfattn.cli import main

    _, d = _saved(tmp_path)
    _edit(d, attention="low_rank", low_rank_k=8)
    with pytest.raises(UserError, match="low_rank"):
        load_pretrained(d)
    assert main(["convert", "--to-hf", str(d), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "low_rank" in err and "Traceback" not in err and not (tmp_path / "out").exists()
