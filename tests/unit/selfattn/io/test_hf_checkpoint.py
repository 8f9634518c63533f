"""Checkpoint guards: the config digest in the weights' metadata, and LM configs that cannot be built."""

from __future__ import annotations

import json

import pytest
import torch

from selfattn.io.checkpoint import load_pretrained, save_pretrained
from selfattn.errors import UserError
from selfattn.nn.models import DecoderLM


def _saved(tmp_path, **over):
    torch.manual_seed(0)
    model = DecoderLM({"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_layers": 1, "context_length": 16, **over})
    return model, save_pretrained(model, tmp_path / "ckpt")


def _edit(d, **fields):
    meta = json.loads((d / "config.json").read_text())
    meta["model"].update(fields)
    (d / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("fields", [{"n_heads": 2}, {"rope_base": 500.0}, {"position": "none"}, {"norm_eps": 1e-3},
                                    {"rope_scaling": {"kind": "linear", "factor": 2.0}}])
def test_shape_compatible_config_edit_is_refused_naming_the_field(tmp_path, fields):
    _, d = _saved(tmp_path)
    _edit(d, **fields)
    with pytest.raises(UserError) as err:
        load_pretrained(d)
    (name, value), = fields.items()
    assert "does not match the config these weights were saved with" in str(err.value)
    shown = "'kind': 'linear', 'factor': 2.0" if isinstance(value, dict) else repr(value)  # with its unset fields
    assert f"{name}: " in str(err.value) and shown in str(err.value)


def test_untouched_and_dropout_only_edits_load(tmp_path):
    model, d = _saved(tmp_path)
    x = torch.randint(0, 40, (1, 8))
    assert torch.equal(load_pretrained(d).model(x).logits, model.eval()(x).logits)
    _edit(d, dropout=0.1)  # no effect on eval logits: allowed
    assert load_pretrained(d).config.dropout == 0.1


def test_models_saved_before_rope_scaling_existed_keep_their_digest(tmp_path):
    """rope_scaling, head_size, qk_norm and the encoder options came after the digest: at their defaults they are left out,
    so a checkpoint saved by an older selfattn (its metadata computed without them) still loads; set, they count."""
    import hashlib

    from safetensors import safe_open

    from selfattn.io.checkpoint import META_DIGEST, config_digest

    model, d = _saved(tmp_path)
    added = ("rope_scaling", "head_size", "qk_norm", "norm_position", "type_vocab_size", "embedding_norm", "position_offset", "pooler")
    before = {k: v for k, v in model.cfg.model_dump(mode="json").items() if k not in ("dropout", *added)}
    assert config_digest(model.cfg) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        assert f.metadata()[META_DIGEST] == config_digest(model.cfg)
    scaled = type(model.cfg).model_validate({**model.cfg.model_dump(), "rope_scaling": {"kind": "linear", "factor": 2.0}})
    assert config_digest(scaled) != config_digest(model.cfg)
    for field, value in (("head_size", 16), ("qk_norm", True), ("norm_position", "post"), ("type_vocab_size", 2), ("embedding_norm", True), ("pooler", "tanh")):
        assert config_digest(model.cfg.model_copy(update={field: value})) != config_digest(model.cfg)


def test_rope_scaling_config_is_validated():
    from pydantic import ValidationError

    from selfattn.config import ModelConfig, RopeScaling

    base = {"vocab_size": 40, "d_model": 32, "n_heads": 4}
    ok = RopeScaling(kind="llama3", factor=8, low_freq_factor=1, high_freq_factor=4, original_context_length=8192)
    assert ModelConfig(**base, rope_scaling=ok).rope_scaling == ok
    for bad, needle in (
        ({"kind": "llama3", "factor": 8.0, "original_context_length": 64}, "needs low_freq_factor and high_freq_factor"),
        ({"kind": "yarn", "factor": 4.0}, "needs original_context_length"),
        ({"kind": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "does not take low_freq_factor"),
        ({"kind": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4, "original_context_length": 64, "beta_fast": 32}, "does not take beta_fast"),
        ({"kind": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1, "original_context_length": 64}, "must be > low_freq_factor"),
        ({"kind": "ntk", "factor": 4.0}, "'linear', 'llama3' or 'yarn'"),
        ({"kind": "linear", "factor": 0.0}, "greater than 0"),
    ):
        with pytest.raises(ValidationError, match=needle):
            RopeScaling(**bad)
    wide = ModelConfig(vocab_size=40, d_model=30, n_heads=4, head_size=16)  # 4 does not divide 30: fine with head_size
    assert wide.head_dim == 16 and ModelConfig(**base).head_dim == 8
    with pytest.raises(ValidationError, match="must divide d_model .30., or set head_size"):
        ModelConfig(vocab_size=40, d_model=30, n_heads=4)
    with pytest.raises(ValidationError, match="rope_scaling needs position='rope'"):
        ModelConfig(**base, position="learned", rope_scaling={"kind": "linear", "factor": 2.0})


def test_weights_without_a_digest_still_load(tmp_path):
    from safetensors.torch import load_file, save_file

    _, d = _saved(tmp_path)
    save_file(load_file(str(d / "model.safetensors")), str(d / "model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((d / "config.json").read_text())
    del meta["weights_sha256"]  # a checkpoint saved before the weights' SHA-256 was recorded
    (d / "config.json").write_text(json.dumps(meta))
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
