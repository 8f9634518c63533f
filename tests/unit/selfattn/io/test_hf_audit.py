"""Defects an audit of the Hugging Face import found, one test each: Qwen windows derived from
``max_window_layers``, NaN/Inf weights, malformed config fields, unusable tokenizers, Qwen windows on
export, ``hidden_act: swish``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfattn.cli import main  # noqa: E402
from selfattn.io.hf import import_hf  # noqa: E402

V = 61
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)  # fmt: skip


def _save(cfg, d: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(d)
    return d


def _edit(d: Path, drop: tuple[str, ...] = (), **fields) -> None:
    raw = json.loads((d / "config.json").read_text())
    for k in drop:
        raw.pop(k, None)
    raw.update(fields)
    (d / "config.json").write_text(json.dumps(raw))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


def _refused(capsys, src, dst, *needles):
    capsys.readouterr()  # transformers' progress bars from setting the model up
    assert main(["convert", "--from-hf", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err, err
    assert not dst.exists()
    for n in needles:
        assert n in err, err


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3"])
def test_qwen_configs_without_layer_types_window_the_layers_transformers_windows(family, tmp_path, capsys):
    """Configs written before transformers 4.53: use_sliding_window and max_window_layers, no layer_types."""
    cls = getattr(transformers, f"{family}Config")
    d = _save(cls(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=0), tmp_path / "all")
    _edit(d, drop=("layer_types",))
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert hf.config.layer_types == ["sliding_attention"] * 2  # transformers derives them
    ours, _, _ = import_hf(d)
    assert ours.cfg.attention == "sliding_window" and ours.cfg.window == 4
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    assert (_logits(hf, x) - _logits(ours, x)).abs().max().item() < 1e-5

    mixed = _save(cls(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=1), tmp_path / "mixed")
    _edit(mixed, drop=("layer_types",))
    _refused(capsys, mixed, tmp_path / "out", "some layers only", "layers [1] windowed", "layers [0] full", "max_window_layers=1")

    off = _save(cls(**SMALL, use_sliding_window=False, sliding_window=4, max_window_layers=0), tmp_path / "off")
    _edit(off, drop=("layer_types",))
    assert import_hf(off)[0].cfg.attention == "full"  # use_sliding_window false: transformers drops the window


@pytest.mark.parametrize("family", ["Qwen2", "Qwen3"])
def test_qwen_with_a_window_on_every_layer_exports(family, tmp_path):
    cls = getattr(transformers, f"{family}Config")
    d = _save(cls(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=0), tmp_path / "src")
    assert main(["convert", "--from-hf", str(d), str(tmp_path / "ours")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert type(back).__name__ == f"{family}ForCausalLM" and back.config.layer_types == ["sliding_attention"] * 2
    x = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(2))
    ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    assert torch.equal(_logits(back, x), _logits(ref, x))


def test_swish_is_silu(tmp_path):
    d = _save(transformers.LlamaConfig(**SMALL, hidden_act="swish"), tmp_path / "swish")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    x = torch.randint(0, V, (1, 12))
    assert (_logits(hf, x) - _logits(import_hf(d)[0], x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(bad, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = _save(transformers.LlamaConfig(**SMALL), tmp_path / "src")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 5] = bad  # SDPA on CPU can hide a NaN here behind finite logits
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _refused(capsys, d, tmp_path / "out", "model.layers.1.self_attn.q_proj.weight", "1 NaN/Inf values")


@pytest.mark.parametrize("field,value,needle", [
    ("num_attention_heads", 0, "num_attention_heads must be an integer >= 1, got 0"),
    ("rope_parameters", "abc", "rope_parameters must be a JSON object, got 'abc'"),
    ("partial_rotary_factor", None, "partial_rotary_factor must be a finite number, got None"),
    ("hidden_size", "32", "hidden_size must be an integer >= 1, got '32'"),
    ("rms_norm_eps", "tiny", "rms_norm_eps must be a finite number, got 'tiny'"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
])  # fmt: skip
def test_malformed_config_fields_are_an_error_line_not_a_traceback(field, value, needle, tmp_path, capsys):
    d = _save(transformers.LlamaConfig(**SMALL), tmp_path / "src")
    _edit(d, **{field: value})
    _refused(capsys, d, tmp_path / "out", "config.json", needle)


def test_malformed_window_and_weight_map_are_an_error_line_not_a_traceback(tmp_path, capsys):
    mistral = _save(transformers.MistralConfig(**SMALL, sliding_window=4), tmp_path / "mistral")
    _edit(mistral, sliding_window="abc")
    _refused(capsys, mistral, tmp_path / "o1", "sliding_window must be an integer >= 1, got 'abc'")

    qwen = _save(transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4, max_window_layers=0), tmp_path / "qwen")
    _edit(qwen, sliding_window="abc")
    _refused(capsys, qwen, tmp_path / "o2", "sliding_window must be an integer >= 1, got 'abc'")

    sharded = tmp_path / "sharded"
    transformers.AutoModelForCausalLM.from_pretrained(_save(transformers.LlamaConfig(**SMALL), tmp_path / "s0")).save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    index["weight_map"] = list(index["weight_map"].values())
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(capsys, sharded, tmp_path / "o3", "weight_map must map tensor names to shard file names")


def _with_tokenizer(tmp_path: Path, name: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = _save(transformers.LlamaConfig(**{**SMALL, "vocab_size": 300}), tmp_path / name)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["a good film"] * 20, trainer=trainers.BpeTrainer(vocab_size=270, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    return d


def test_unusable_tokenizers_are_reported_at_convert_time(tmp_path, capsys):
    ok = _with_tokenizer(tmp_path, "ok")
    assert main(["convert", "--from-hf", str(ok), str(tmp_path / "fine")]) == 0
    capsys.readouterr()

    dangling = shutil.copytree(ok, tmp_path / "dangling")
    (dangling / "tokenizer.json").unlink()
    (dangling / "tokenizer.json").symlink_to(tmp_path / "blobs" / "missing")
    _refused(capsys, dangling, tmp_path / "o1", "tokenizer.json is a symlink to", "does not exist")

    directory = shutil.copytree(ok, tmp_path / "directory")
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer.json").mkdir()
    _refused(capsys, directory, tmp_path / "o2", "tokenizer.json is not a file")

    sentencepiece = shutil.copytree(ok, tmp_path / "sentencepiece")
    (sentencepiece / "tokenizer.json").unlink()
    (sentencepiece / "tokenizer.model").write_bytes(b"\x0a\x05hello")
    _refused(capsys, sentencepiece, tmp_path / "o3", "tokenizer.model", "no tokenizer.json", "save_pretrained")
