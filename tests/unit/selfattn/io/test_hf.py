"""Hugging Face import/export against real ``transformers`` models built from tiny random configs (no hub)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from selfattn.io.checkpoint import load_pretrained, save_pretrained  # noqa: E402
from selfattn.errors import UserError  # noqa: E402
from selfattn.io.hf import convert_to_hf, export_hf, import_hf  # noqa: E402

V = 97
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _configs():
    T = transformers
    small = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, bos_token_id=None, eos_token_id=None)
    return {
        "gpt2": T.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None),
        "gpt2-untied": T.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None),
        "llama-gqa-untied": T.LlamaConfig(**small, num_key_value_heads=2, rope_theta=500.0, tie_word_embeddings=False, rms_norm_eps=1e-5),
        "llama-gqa-tied": T.LlamaConfig(**small, num_key_value_heads=1, tie_word_embeddings=True),
        "qwen2": T.Qwen2Config(**small, num_key_value_heads=2, tie_word_embeddings=True),
        "mistral-window": T.MistralConfig(**small, num_key_value_heads=2, sliding_window=5),
        # Llama 3.1's rope scaling, shrunk so that all three frequency bands occur at head_dim 16:
        # wavelengths 6.3 (< 32 / 4: kept), 19.9 (between: smoothed), 62.8 and longer (> 32: divided by 8)
        "llama3-rope": T.LlamaConfig(**{**small, "num_attention_heads": 2}, num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
        # Qwen3: per-head q/k RMSNorm, and heads wider than hidden_size / heads (16 against 8)
        "qwen3": T.Qwen3Config(**small, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
        "qwen3-untied": T.Qwen3Config(**small, num_key_value_heads=1, head_dim=4, tie_word_embeddings=False),
        # YaRN as Qwen documents it for long contexts: the ramp covers dimensions 0-4 of 8 here
        "qwen3-yarn": T.Qwen3Config(**small, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}),
        "llama-wide-heads": T.LlamaConfig(**small, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
        "llama-linear-rope": T.LlamaConfig(**small, num_key_value_heads=2, tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    }


def _hf_model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_configs()[name]).eval()
    with torch.no_grad():  # random init leaves biases and norms at 0 / 1: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name in _configs():
        d = tmp_path_factory.mktemp(name)
        _hf_model(name).save_pretrained(d)
        out[name] = d
    return out


@pytest.mark.parametrize("name", list(_configs()))
def test_import_logits_and_greedy_generation_match_transformers(name, saved):
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved[name]).eval()
    ours, _, _ = import_hf(saved[name])
    x = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x).logits
    assert (ref - got).abs().max().item() < 1e-5
    assert ours.cfg.tie_embeddings == ("untied" not in name and not name.startswith("mistral"))
    prompt = x[:, :5]
    want = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    have = ours.generate(prompt, max_new_tokens=12, temperature=0)
    assert torch.equal(want, have)


def test_config_features_are_imported(saved):
    assert import_hf(saved["mistral-window"])[0].cfg.window == 5
    qwen = import_hf(saved["qwen2"])[0]
    assert qwen.blocks[0].attn.q_proj.bias is not None and qwen.blocks[0].attn.out_proj.bias is None
    llama = import_hf(saved["llama-gqa-untied"])[0].cfg
    assert (llama.rope_base, llama.kv_heads, llama.norm_eps) == (500.0, 2, 1e-5)
    assert import_hf(saved["gpt2"])[0].cfg.gelu_approximate == "tanh"
    qwen3 = import_hf(saved["qwen3"])[0]
    assert (qwen3.cfg.qk_norm, qwen3.cfg.head_size, qwen3.cfg.head_dim) == (True, 16, 16)
    assert qwen3.blocks[0].attn.q_proj.weight.shape == (4 * 16, 32) and qwen3.blocks[0].attn.k_norm.weight.shape == (16,)
    assert import_hf(saved["llama-gqa-tied"])[0].cfg.head_size is None  # head_dim = hidden / heads: nothing set apart


@pytest.mark.parametrize("name", ["gpt2", "gpt2-untied", "llama-gqa-untied", "qwen2", "mistral-window", "llama3-rope", "llama-linear-rope", "qwen3", "qwen3-untied", "llama-wide-heads", "qwen3-yarn"])
def test_export_loads_in_transformers_and_round_trip_is_exact(name, saved, tmp_path):
    ours, _, _ = import_hf(saved[name])
    export_hf(ours, tmp_path / "hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(saved[name]).eval()
    x = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)
    again, _, _ = import_hf(tmp_path / "hf")
    a, b = ours.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.cfg == ours.cfg


def test_rope_scaling_is_imported_from_either_config_layout_and_unsupported_types_are_named(saved, tmp_path):
    from selfattn.config import RopeScaling
    from selfattn.nn.positions import rope_attention_factor, rope_inv_freq

    cfg = import_hf(saved["llama3-rope"])[0].cfg
    assert cfg.rope_scaling == RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_context_length=32)
    assert import_hf(saved["llama-linear-rope"])[0].cfg.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    yarn = import_hf(saved["qwen3-yarn"])[0].cfg.rope_scaling
    assert yarn == RopeScaling(kind="yarn", factor=4.0, original_context_length=256)
    assert rope_attention_factor(yarn) == pytest.approx(0.1 * math.log(4.0) + 1) and rope_attention_factor(cfg.rope_scaling) == 1.0
    # the three bands really differ from the unscaled frequencies: kept, smoothed, divided by 8
    plain, scaled = rope_inv_freq(16, 10000.0), rope_inv_freq(16, 10000.0, cfg.rope_scaling)
    assert scaled[0] == plain[0] and plain[1] / 8 < scaled[1] < plain[1] and torch.equal(scaled[2:], plain[2:] / 8)

    # a hub Llama-3.1 config.json (transformers 4 layout): rope_scaling + top-level rope_theta
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in saved["llama3-rope"].iterdir():
        (legacy / f.name).write_bytes(f.read_bytes())
    raw = json.loads((legacy / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    (legacy / "config.json").write_text(json.dumps(raw))
    assert import_hf(legacy)[0].cfg == cfg

    # YaRN with DeepSeek's mscale / mscale_all_dim: the attention factor resolved as transformers does
    raw["rope_scaling"] = None
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 256, "mscale": 1.0, "mscale_all_dim": 0.5}
    (legacy / "config.json").write_text(json.dumps(raw))
    got = import_hf(legacy)[0].cfg.rope_scaling
    assert got.attention_factor == pytest.approx((0.1 * math.log(4.0) + 1) / (0.05 * math.log(4.0) + 1))

    for rope, needle in (({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}, "'dynamic' is not supported"),
                         ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}, "lacks 'low_freq_factor'"),
                         ({**LLAMA3_ROPE, "high_freq_factor": 0.5}, "must be > low_freq_factor")):  # fmt: skip
        raw["rope_scaling"] = None
        raw["rope_parameters"] = rope
        (legacy / "config.json").write_text(json.dumps(raw))
        with pytest.raises(UserError, match=needle):
            import_hf(legacy)


def test_import_takes_the_files_tensors_keeps_ties_and_trains_without_touching_the_file(saved, tmp_path):
    """import_hf builds the model on the meta device and assigns the file's tensors: nothing is left
    on meta, a tied head is the embedding itself, and training writes to memory, not the file."""
    import shutil

    src = shutil.copytree(saved["llama-gqa-tied"], tmp_path / "llama")
    lm = import_hf(src)[0]
    assert not any(t.is_meta for t in [*lm.parameters(), *lm.buffers()])
    assert lm.lm_head.weight is lm.tok_emb.weight and all(p.requires_grad for p in lm.parameters())
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    lm.train()
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(lm.parameters(), lr=0.1)
    lm(x, targets=x).loss.backward()
    opt.step()
    assert not torch.equal(lm.tok_emb.weight, before["tok_emb.weight"]) and lm.lm_head.weight is lm.tok_emb.weight
    again = import_hf(src)[0].state_dict()
    assert all(torch.equal(again[k], before[k]) for k in before)  # the file still holds what it held


def test_sharded_checkpoint_is_read(saved, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(saved["llama-gqa-untied"])
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    x = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        assert (import_hf(tmp_path)[0](x).logits - hf.eval()(x).logits).abs().max() < 1e-5


# --------------------------------------------------------------------------- tokenizer and CLI


def _write_tokenizer(d: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json with GPT-2-like specials (<|endoftext|> last)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a good film", "a bad film", "not good at all"] * 20, trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))


def test_cli_convert_both_ways_with_tokenizer(tmp_path):
    from selfattn.cli import main

    src = tmp_path / "src"
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(src)
    _write_tokenizer(src, 270)
    assert main(["convert", "--from-hf", str(src), str(tmp_path / "ours")]) == 0
    pre = load_pretrained(tmp_path / "ours")
    assert pre.tokenizer.kind == "hf" and pre.tokenizer.eos_id == pre.tokenizer.pad_id == 269
    assert pre.tokenizer.decode(pre.tokenizer.encode("a good film")) == "a good film"
    assert main(["convert", "--to-hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    fast = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    assert fast.encode("not good", add_special_tokens=False) == pre.tokenizer.encode("not good")
    assert fast.eos_token == "<|endoftext|>"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    # the weights come back bit for bit; the logits of two implementations agree to float rounding
    # (HF's Conv1D addmm and our Linear can round differently: 7e-8 on an AMX CPU)
    original = transformers.GPT2LMHeadModel.from_pretrained(src).state_dict()
    returned = back.state_dict()
    assert original.keys() == returned.keys()
    assert all(torch.equal(original[k], returned[k]) for k in original)
    x = torch.tensor([pre.tokenizer.encode("a bad film")])
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, pre.model(x).logits, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_refused_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    from selfattn.cli import main

    def refused(src, *needles):
        dst = tmp_path / f"out-{src.name}"
        assert main(["convert", "--from-hf", str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert not dst.exists()
        for n in needles:
            assert n in err, err
        assert "Traceback" not in err

    electra = tmp_path / "electra"
    transformers.ElectraForMaskedLM(transformers.ElectraConfig(vocab_size=50, embedding_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)).save_pretrained(electra)
    refused(electra, "ElectraForMaskedLM", "not supported", "GPT2LMHeadModel", "LlamaForCausalLM", "BertModel")

    pickled = tmp_path / "pickled"
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    pickled.mkdir()
    (pickled / "config.json").write_text(cfg.to_json_string())
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    refused(pickled, "pytorch_model.bin", "safetensors", "save_pretrained")

    big_tok = tmp_path / "bigtok"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=200, n_positions=16, n_embd=32, n_layer=1, n_head=4)).save_pretrained(big_tok)
    _write_tokenizer(big_tok, 270)
    refused(big_tok, "270 tokens", "200 rows")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dst = tmp_path / "hub"
    assert main(["convert", "--from-hf", "someorg/no-such-model", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "someorg/no-such-model" in err and "HF_HUB_OFFLINE" in err and not dst.exists()


def test_to_hf_refuses_a_model_no_architecture_matches(tmp_path):
    from selfattn.nn.models import DecoderLM

    model = DecoderLM({"vocab_size": 40, "d_model": 32, "n_heads": 4, "n_layers": 1})  # rope + layernorm + gelu
    save_pretrained(model, tmp_path / "m")
    with pytest.raises(UserError, match="matches no Hugging Face architecture"):
        convert_to_hf(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fine-tuning and PEFT


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_classifier_from_an_imported_model_trains(name, saved):
    from selfattn.nn.models import SequenceClassifier

    lm, _, _ = import_hf(saved[name])
    clf = SequenceClassifier.from_decoder(lm, n_classes=2)
    torch.manual_seed(0)
    x = torch.randint(0, V, (8, 10))
    y = (x[:, 0] > V // 2).long()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    clf.train()
    first = None
    for _ in range(30):
        loss = clf(x, labels=y).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.5


@pytest.mark.parametrize("name,targets", [("llama-gqa-untied", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["q_proj", "v_proj", "out_proj", "up_proj"]),
                                          ("qwen3", ["q_proj", "k_proj", "v_proj", "out_proj"])])
def test_lora_exports_to_peft(name, targets, saved, tmp_path):
    peft = pytest.importorskip("peft")
    from selfattn.io.hf import export_peft
    from selfattn.nn.lora import LoRAConfig, apply_lora, merged_state_dict
    from selfattn.nn.models import DecoderLM

    ours, _, _ = import_hf(saved[name])
    apply_lora(ours, LoRAConfig(rank=4, alpha=8, targets=targets))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    export_hf(ours, tmp_path / "base", unmerged=True)
    export_peft(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    x = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = base(x).logits
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()  # injects into base
    merged = DecoderLM(ours.cfg)
    merged.load_state_dict(merged_state_dict(ours), strict=False)
    with torch.no_grad():
        want = merged.eval()(x).logits
        got = with_adapter(input_ids=x).logits
    assert (got - want).abs().max().item() < 1e-5
    assert (plain - want).abs().max().item() > 1e-3  # the adapters matter
