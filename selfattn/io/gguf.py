"""GGUF (llama.cpp's file format) in and out, through ggml-org's ``gguf`` package (no compiler, no llama.cpp).

``import_gguf(path)`` reads a GGUF file of a Llama-family architecture (``llama`` - which includes
SmolLM and Mistral files -, ``qwen2``, ``qwen3``), dequantizes every tensor whose type the ``gguf``
package can dequantize (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, the IQ types) and returns the
:class:`~selfattn.nn.models.DecoderLM` (fp32 or bf16) and its tokenizer, rebuilt from the file's
``tokenizer.ggml.*`` metadata as a ``tokenizers`` tokenizer with the ids transformers' GGUF loader
gives. ``export_gguf(model, path, tokenizer, quant=...)`` writes the reverse (LoRA merged first), for
llama.cpp, Ollama and LM Studio.

A GGUF file is a config.json and a state dict under other names, so both directions go through the
Hugging Face family table (:mod:`selfattn.io.hf_families`): the metadata becomes a ``config.json``
mapping, the tensor names become transformers' names, and the family entry does the rest.

The permutation rule: llama.cpp's converter (``convert_hf_to_gguf.py``, ``LlamaModel.permute``)
reorders the rows of ``attn_q`` and ``attn_k`` of **llama** files so that RoPE rotates adjacent pairs
(GPT-J style) instead of the two halves of each head (GPT-NeoX style, what transformers and selfattn
compute). It is undone on import and applied on export for ``llama`` only; ``qwen2`` and ``qwen3``
files are written unpermuted (llama.cpp runs them with NeoX-style RoPE).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from selfattn.data.tokenization import HFTokenizer
from selfattn.errors import UserError
from selfattn.io.checkpoint import save_pretrained
from selfattn.io.hf import (
    _assemble,
    config_from_hf,
    config_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from selfattn.io.hf_families import FAMILIES, family_of_config
from selfattn.io.sources import resolve_file
from selfattn.nn.lora import merged_state_dict
from selfattn.nn.models import DecoderLM

__all__ = ["ARCHS", "QUANTS", "GGUFArch", "read_gguf", "import_gguf", "convert_from_gguf", "export_gguf", "convert_to_gguf", "tokenizer_from_gguf"]

GGUF_PREFIX = "gguf:"


@dataclass(frozen=True)
class GGUFArch:
    """One GGUF ``general.architecture`` that maps onto a Hugging Face family of the trunk."""

    name: str  # general.architecture
    family: str  # the selfattn.io.hf_families entry
    permute_qk: bool  # llama.cpp permuted the q/k rows for RoPE on adjacent pairs (see the module docstring)


ARCHS: dict[str, GGUFArch] = {a.name: a for a in (GGUFArch("llama", "llama", True), GGUFArch("qwen2", "qwen2", False), GGUFArch("qwen3", "qwen3", False))}

# GGUF tensor name (without blk.N. / .weight / .bias) -> transformers' Llama-family module
_TRUNK = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip

# --quant choices -> the ggml type of 2-D weights (1-D tensors - norms, biases - stay F32, as llama.cpp writes them)
QUANTS = ("f32", "f16", "bf16", "q8_0")


# --------------------------------------------------------------------------- reading


@dataclass
class GGUFFile:
    """What :func:`read_gguf` found: metadata values, the raw reader tensors by name, the architecture."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, Any]  # name -> gguf.ReaderTensor (memory-mapped, still quantized)
    arch: GGUFArch


def _gguf_module() -> Any:
    try:
        import gguf
    except ImportError:
        raise UserError("reading or writing GGUF files needs the gguf package (ggml-org's gguf-py): pip install gguf") from None
    return gguf


def _field_value(field: Any) -> Any:
    """A metadata field as Python (strings decoded, arrays as lists)."""
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return np.concatenate([field.parts[i] for i in field.data]).tolist() if field.data else []
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    value = field.parts[field.data[0]][0]
    return value.item() if hasattr(value, "item") else value


def read_gguf(src: str | Path) -> GGUFFile:
    """Open a GGUF file (a path or ``pkg:PACKAGE/file.gguf``): its metadata and its (lazy) tensors."""
    gguf = _gguf_module()
    path = resolve_file(src)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError) as exc:
        raise UserError(f"{path} is not a readable GGUF file: {exc}") from None
    metadata = {name: _field_value(field) for name, field in reader.fields.items()}
    name = metadata.get("general.architecture")
    if name not in ARCHS:
        raise UserError(f"{path}: GGUF architecture {name!r} is not supported; supported: {', '.join(ARCHS)} (llama includes SmolLM and Mistral files)")
    return GGUFFile(path=path, metadata=metadata, tensors={t.name: t for t in reader.tensors}, arch=ARCHS[name])


def hf_config_of(f: GGUFFile) -> dict[str, Any]:
    """The ``config.json`` mapping transformers would build for this file (the family table reads it)."""
    m, a = f.metadata, f.arch.name

    def key(k: str, default: Any = None) -> Any:
        return m.get(f"{a}.{k}", default)

    where = f"{f.path}"
    missing = [k for k in ("block_count", "embedding_length", "attention.head_count", "feed_forward_length") if key(k) is None]
    if missing:
        raise UserError(f"{where}: the GGUF metadata lacks {', '.join(f'{a}.{k}' for k in missing)}")
    if "rope_freqs.weight" in f.tensors:
        raise UserError(f"{where}: the file carries rope_freqs.weight (Llama 3.1-style frequency factors), which selfattn does not read from GGUF; import the Hugging Face checkpoint instead")
    n_heads, d_model = key("attention.head_count"), key("embedding_length")
    if not isinstance(n_heads, int) or not isinstance(key("attention.head_count_kv", n_heads), int):
        raise UserError(f"{where}: per-layer head counts are not supported (got {n_heads!r}, {key('attention.head_count_kv')!r})")
    head_dim = key("attention.key_length") or (d_model // n_heads if n_heads else None)
    rotary = key("rope.dimension_count")
    if rotary is not None and head_dim and rotary != head_dim:
        raise UserError(f"{where}: {a}.rope.dimension_count ({rotary}) != head size ({head_dim}): partial rotary embeddings are not supported")
    tokens = m.get("tokenizer.ggml.tokens")
    vocab = f.tensors["token_embd.weight"].shape[-1] if "token_embd.weight" in f.tensors else key("vocab_size", len(tokens or []))
    hf: dict[str, Any] = {
        "model_type": f.arch.family, "vocab_size": int(vocab), "max_position_embeddings": key("context_length", 2048),
        "hidden_size": d_model, "intermediate_size": key("feed_forward_length"), "num_hidden_layers": key("block_count"),
        "num_attention_heads": n_heads, "num_key_value_heads": key("attention.head_count_kv", n_heads), "head_dim": head_dim,
        "rope_theta": key("rope.freq_base", 10000.0), "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "tie_word_embeddings": "output.weight" not in f.tensors, "hidden_act": "silu",
    }  # fmt: skip
    if f.arch.family == "llama":
        biased = "blk.0.attn_q.bias" in f.tensors
        hf.update(attention_bias=biased, mlp_bias=biased)
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        hf["rope_scaling"] = {"rope_type": scaling, "factor": key("rope.scaling.factor")}
        if key("rope.scaling.original_context_length") is not None:
            hf["rope_scaling"]["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    return hf


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``LlamaModel.permute``: rows ``[head, 2, half]`` <- ``[head, half, 2]``."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (``convert_hf_to_gguf.py``): RoPE halves -> adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None when unknown)."""
    base, _, kind = name.rpartition(".")
    if name.startswith("blk."):
        _, i, module = base.split(".", 2)
        return f"model.layers.{i}.{_LAYER[module]}.{kind}" if module in _LAYER else None
    return f"{_TRUNK[base]}.{kind}" if base in _TRUNK else None


def _dequantize(f: GGUFFile, name: str, t: Any) -> np.ndarray:
    """One tensor as float32 ``[rows, cols]`` (GGUF stores shapes innermost-first)."""
    from gguf import quants

    try:
        w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UserError(f"{f.path}: tensor {name!r} is {t.tensor_type.name}, which the installed gguf package cannot dequantize (upgrade it: pip install -U gguf)") from None
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))
    return w if w.flags.writeable else w.copy()  # F32 comes back as a view of the read-only memory map


def _checked(f: GGUFFile, name: str) -> np.ndarray:
    """One tensor dequantized; a NaN or Inf is refused, naming the tensor."""
    w = _dequantize(f, name, f.tensors[name])
    if not np.isfinite(w).all():
        raise UserError(f"{f.path}: tensor {name!r} holds {int((~np.isfinite(w)).sum())} NaN/Inf values of {w.size}; the file is corrupt")
    return w


def hf_tensors_of(f: GGUFFile, hf: dict[str, Any]) -> dict[str, Tensor]:
    """Every tensor, dequantized to float32, under transformers' names (q/k unpermuted for llama).
    A NaN or Inf is refused, naming the tensor; so is a tensor with no place in the family.

    Tensors are dequantized on ``torch.get_num_threads()`` threads (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    unknown = sorted(name for name in f.tensors if _hf_name(name) is None)
    if unknown:
        raise UserError(f"{f.path}: {len(unknown)} tensors have no place in a {f.arch.name} model: {unknown[:5]}")
    names = list(f.tensors)
    with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
        arrays = list(pool.map(lambda name: _checked(f, name), names))
    n_heads, n_kv = hf["num_attention_heads"], hf["num_key_value_heads"]
    out: dict[str, Tensor] = {}
    for name, w in zip(names, arrays):
        if f.arch.permute_qk and ".attn_q." in name:
            w = _unpermute(w, n_heads)
        elif f.arch.permute_qk and ".attn_k." in name:
            w = _unpermute(w, n_kv)
        out[_hf_name(name)] = torch.from_numpy(w)  # type: ignore[index]
    return out


def import_gguf(src: str | Path, *, dtype: torch.dtype = torch.float32) -> tuple[DecoderLM, HFTokenizer]:
    """``(model, tokenizer)`` of a GGUF file (a path or ``pkg:`` path): weights in ``dtype`` (fp32 or bf16)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise UserError(f"GGUF weights come out in float32 or bfloat16, not {dtype}")
    f = read_gguf(src)
    tokenizer = tokenizer_from_gguf(f)
    hf = hf_config_of(f)
    cfg = config_from_hf(hf, where=str(f.path), pad_token_id=tokenizer.pad_id)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UserError(f"{f.path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {cfg.vocab_size} rows")
    tensors = state_dict_from_hf(hf_tensors_of(f, hf), cfg, f.arch.family)
    model = _assemble(DecoderLM, cfg, tensors, f.path, FAMILIES[f.arch.family], dtype)
    return model, tokenizer  # type: ignore[return-value]


def convert_from_gguf(src: str | Path, dst: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Import a GGUF file and save it as a selfattn checkpoint at ``dst`` (loads with ``load_pretrained``)."""
    model, tokenizer = import_gguf(src, dtype=dtype)
    return save_pretrained(model, dst, tokenizer=tokenizer, extra={"imported": {"gguf_source": str(src)}})


# --------------------------------------------------------------------------- tokenizer in


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# tokenizer.ggml.pre -> the split regex of byte-level BPE (transformers' GGUF table; the rest: GPT-2's own)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED, _UNKNOWN, _BYTE = 3, 4, 2, 6  # tokenizer.ggml.token_type values (llama.cpp's)


def _sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens, best
    score first (transformers' ``generate_merges``, which its GGUF loader uses)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [(token[:k], token[k:], score) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _raw_tokenizer(m: dict[str, Any], where: str) -> Any:
    """The ``tokenizers.Tokenizer`` of ``tokenizer.ggml.*`` (``gpt2``: byte-level BPE; ``llama``: SentencePiece BPE)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
    )

    kind, tokens = m.get("tokenizer.ggml.model"), m.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{where}: the file has no tokenizer (tokenizer.ggml.tokens)")
    types = m.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(x.split(" ", 1)) for x in m.get("tokenizer.ggml.merges") or []]
    if kind == "gpt2":
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(spelled)}, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
        split = _SPLITS.get(m.get("tokenizer.ggml.pre"))
        tok.pre_tokenizer = (
            pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            if split else pre_tokenizers.ByteLevel(add_prefix_space=False)
        )  # fmt: skip
        tok.decoder = decoders.ByteLevel()
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL and set(t) <= alphabet]
    elif kind == "llama":
        scores = m.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = m.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(
            vocab={t: i for i, t in enumerate(tokens)}, merges=merges or _sentencepiece_merges(tokens, scores),
            fuse_unk=True, byte_fallback=True, dropout=None, unk_token=tokens[unk] if isinstance(unk, int) and 0 <= unk < len(tokens) else None,
        ))  # fmt: skip
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
        control = [t for t, ty in zip(tokens, types) if ty == _CONTROL]
    else:
        raise UserError(f"{where}: tokenizer.ggml.model {kind!r} is not supported (gpt2 = byte-level BPE, llama = SentencePiece BPE)")
    if len(tok.get_vocab()) != len(tokens):
        raise UserError(f"{where}: tokenizer.ggml.tokens holds duplicate tokens ({len(tokens)} listed, {len(tok.get_vocab())} distinct)")
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    vocab = tok.get_vocab()
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED and t in vocab])
    return tok


def tokenizer_from_gguf(f: GGUFFile) -> HFTokenizer:
    """The file's tokenizer with its special ids (a missing pad / unk / bos falls back on eos)."""
    m = f.metadata
    tok = _raw_tokenizer(m, str(f.path))
    n = len(m["tokenizer.ggml.tokens"])

    def special(name: str) -> int | None:
        i = m.get(f"tokenizer.ggml.{name}_token_id")
        return i if isinstance(i, int) and 0 <= i < n else None

    eos = special("eos")
    if eos is None:
        eos = special("bos")
    if eos is None:
        raise UserError(f"{f.path}: the tokenizer names no eos (nor bos) token id")
    ids = {"bos_id": special("bos"), "eos_id": eos, "pad_id": special("padding"), "unk_id": special("unknown")}
    return HFTokenizer(tokenizer=tok, **{k: (eos if v is None else v) for k, v in ids.items()})


# --------------------------------------------------------------------------- writing


def _tokenizer_metadata(tokenizer: Any) -> dict[str, Any]:
    """``tokenizer.ggml.*`` of a byte-level BPE (``gpt2``) or SentencePiece BPE (``llama``) tokenizer."""
    import json

    raw = getattr(tokenizer, "_tok", None)
    if raw is None:
        raise UserError(f"a {type(tokenizer).__name__} cannot go into a GGUF file: only BPE tokenizers (byte-level or SentencePiece) map onto tokenizer.ggml.*")
    spec = json.loads(raw.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        raise UserError(f"a {model.get('type')} tokenizer cannot go into a GGUF file (BPE only)")
    vocab = raw.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        if 0 <= i < len(tokens):
            tokens[i] = t
    if any(t is None for t in tokens):
        raise UserError("the tokenizer's ids are not contiguous (0 .. vocab_size - 1); GGUF lists tokens by id")
    added = {a["content"]: a["special"] for a in spec.get("added_tokens") or []}
    merges = [" ".join(x) if isinstance(x, list) else x for x in model.get("merges") or []]
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in pres]
    if "ByteLevel" in kinds:
        split = next((p["pattern"].get("Regex") for p in pres if p.get("type") == "Split"), None)
        names = [name for name, regex in _SPLITS.items() if regex == split]
        if split is not None and not names:
            raise UserError(f"the tokenizer splits text with a regex llama.cpp has no name for: {split[:60]!r}")
        types = [(_CONTROL if added[t] else _USER_DEFINED) if t in added else 1 for t in tokens]
        return {"model": "gpt2", "pre": names[0] if names else "gpt2", "tokens": tokens, "token_type": types, "merges": merges}
    if "Metaspace" in kinds and model.get("byte_fallback"):
        rank = {b: -float(k) for k, m_ in enumerate(merges) for b in ["".join(m_.split(" ", 1))]}
        unk = model.get("unk_token")
        types = [
            (_CONTROL if added[t] else _USER_DEFINED) if t in added else _UNKNOWN if t == unk else _BYTE if len(t) == 6 and t.startswith("<0x") else 1
            for t in tokens
        ]  # fmt: skip
        scores = [rank.get(t, 0.0) for t in tokens]
        return {"model": "llama", "pre": "default", "tokens": tokens, "token_type": types, "merges": merges, "scores": scores}
    raise UserError(f"a tokenizer with pre-tokenizers {kinds} cannot go into a GGUF file (byte-level BPE or SentencePiece BPE only)")


def _ggml_type(quant: str, w: np.ndarray) -> Any:
    from gguf import GGMLQuantizationType as Q

    if w.ndim < 2 or quant == "f32":
        return Q.F32
    if quant == "q8_0" and w.shape[-1] % 32:
        return Q.F16  # rows not a whole number of 32-value blocks (llama.cpp falls back the same way)
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[quant]


def gguf_tensors(model: DecoderLM) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
    """``(hf config, {gguf name: float32 array}, architecture)`` of a decoder LM (LoRA merged; q/k permuted for llama)."""
    if not isinstance(model, DecoderLM):
        raise UserError(f"GGUF export writes decoder LMs; got a {type(model).__name__}")
    cfg = model.cfg
    fam = family_of_config(cfg)
    arch = next((a for a in ARCHS.values() if a.family == fam.name), None)
    if arch is None or cfg.attention != "full":
        raise UserError(
            f"this model is a {fam.name} (attention={cfg.attention!r}); GGUF export covers {', '.join(ARCHS)} with full attention"
        )
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind not in ("linear", "yarn"):
        raise UserError(f"rope_scaling kind {cfg.rope_scaling.kind!r} has no GGUF metadata here (linear and yarn do)")
    if cfg.bias and arch.name == "llama":
        raise UserError("a llama with biases cannot be exported to GGUF here")
    hf = config_to_hf(cfg)
    state = {k: v.detach().float().cpu() for k, v in merged_state_dict(model).items()}
    theirs = state_dict_to_hf(state, cfg, fam.name)
    reverse_trunk = {v: k for k, v in _TRUNK.items()}
    reverse_layer = {v: k for k, v in _LAYER.items()}
    out: dict[str, np.ndarray] = {}
    for name, t in theirs.items():
        base, _, kind = name.rpartition(".")
        w = t.numpy()
        if base.startswith("model.layers."):
            i, module = base[len("model.layers.") :].split(".", 1)
            short = reverse_layer[module]
            if arch.permute_qk and short in ("attn_q", "attn_k"):
                w = _permute(w, cfg.n_heads if short == "attn_q" else cfg.kv_heads)
            out[f"blk.{i}.{short}.{kind}"] = np.ascontiguousarray(w)
        else:
            out[f"{reverse_trunk[base]}.{kind}"] = np.ascontiguousarray(w)
    return hf, out, arch.name


def export_gguf(model: DecoderLM, dst: str | Path, tokenizer: Any, *, quant: str = "f32", name: str = "selfattn") -> Path:
    """Write ``model`` (a Llama / Qwen2 / Qwen3 decoder LM; LoRA adapters merged) and ``tokenizer`` as one
    GGUF file. ``quant``: ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the 2-D weights; norms stay F32."""
    gguf = _gguf_module()
    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    if tokenizer is None:
        raise UserError("a GGUF file carries its tokenizer; this model has none (tokenizer/ is missing)")
    tok_meta = _tokenizer_metadata(tokenizer)
    hf, tensors, arch = gguf_tensors(model)
    out = Path(dst)
    if out.exists():
        raise UserError(f"refusing to overwrite {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        w.add_name(name)
        w.add_context_length(hf["max_position_embeddings"])
        w.add_embedding_length(hf["hidden_size"])
        w.add_block_count(hf["num_hidden_layers"])
        w.add_feed_forward_length(hf["intermediate_size"])
        w.add_head_count(hf["num_attention_heads"])
        w.add_head_count_kv(hf["num_key_value_heads"])
        w.add_key_length(hf["head_dim"])
        w.add_value_length(hf["head_dim"])
        w.add_rope_dimension_count(hf["head_dim"])
        w.add_rope_freq_base(float(hf["rope_theta"]))
        w.add_layer_norm_rms_eps(float(hf["rms_norm_eps"]))
        w.add_vocab_size(hf["vocab_size"])
        sc = model.cfg.rope_scaling
        if sc is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if sc.kind == "linear" else gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(sc.factor)
            if sc.original_context_length is not None:
                w.add_rope_scaling_orig_ctx_len(sc.original_context_length)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant])
        w.add_tokenizer_model(tok_meta["model"])
        w.add_tokenizer_pre(tok_meta["pre"])
        w.add_token_list(tok_meta["tokens"])
        w.add_token_types(tok_meta["token_type"])
        if "scores" in tok_meta:
            w.add_token_scores(tok_meta["scores"])
        if tok_meta["merges"]:
            w.add_token_merges(tok_meta["merges"])
        w.add_bos_token_id(tokenizer.bos_id)
        w.add_eos_token_id(tokenizer.eos_id)
        w.add_pad_token_id(tokenizer.pad_id)
        w.add_unk_token_id(tokenizer.unk_id)
        w.add_add_bos_token(tok_meta["model"] == "llama")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, arr in tensors.items():
            qtype = _ggml_type(quant, arr)
            w.add_tensor(tname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def convert_to_gguf(src: str | Path, dst: str | Path, *, quant: str = "f32") -> Path:
    """A selfattn checkpoint directory (a decoder LM with its tokenizer) -> one GGUF file."""
    from selfattn.io.checkpoint import load_pretrained

    pre = load_pretrained(src)
    return export_gguf(pre.model, dst, pre.tokenizer, quant=quant, name=Path(src).name or "selfattn")

