"""Tokenizers: character-level, byte-level BPE and imported (Hugging Face) ones, saved as JSON only.

All share one small interface (:class:`Tokenizer`). The two over HF ``tokenizers`` share one base,
:class:`HFBackedTokenizer` (special ids, ``encode``, ``encode_batch``, ``decode``, ``save``). The
char and BPE tokenizers trained here have the same four special tokens, in this order, so ``<pad>``
is always id 0::

    <pad> = 0, <unk> = 1, <bos> = 2, <eos> = 3

``encode`` never adds special tokens unless asked (``add_bos`` / ``add_eos``), except an imported
encoder tokenizer, which adds what ``transformers`` adds (``[CLS] ... [SEP]``); ``decode`` drops
them unless ``skip_special_tokens=False``. ``save(dir)`` writes JSON only (``vocab.json`` for the
char tokenizer, HF's ``tokenizer.json`` for the others) and ``load_tokenizer(dir)`` reads it back
without unpickling anything.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Protocol, Sequence, runtime_checkable

from selfattn.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Tokenizer as RawTokenizer

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)

CHAR_VOCAB_FILE = "vocab.json"
BPE_FILE = "tokenizer.json"
HF_SPECIAL_FILE = "special_tokens.json"  # beside tokenizer.json: marks an imported (Hugging Face) tokenizer
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
CHAR_FORMAT_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    """What the models, the training engine and the checkpoint code rely on."""

    kind: str

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    @property
    def unk_id(self) -> int: ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    def save(self, directory: str | Path) -> Path: ...


# --------------------------------------------------------------------------- characters


class CharTokenizer:
    """One id per character: the four special tokens, then the training characters sorted.

    Characters not seen in training encode to ``<unk>``.
    """

    kind = "char"

    def __init__(self, *, chars: Sequence[str]) -> None:
        chars = list(chars)
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise ValueError(f"CharTokenizer chars must be single characters, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer chars must be unique")
        self.chars: list[str] = chars
        self._itos: list[str] = list(SPECIAL_TOKENS) + chars
        self._stoi: dict[str, int] = {c: i + len(SPECIAL_TOKENS) for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str] | str) -> "CharTokenizer":
        """Vocabulary = every distinct character of ``texts``, sorted by code point."""
        if isinstance(texts, str):
            texts = [texts]
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise ValueError("CharTokenizer.train needs at least one non-empty text")
        return cls(chars=sorted(seen))

    # ---- ids of the special tokens
    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def bos_id(self) -> int:
        return 2

    @property
    def eos_id(self) -> int:
        return 3

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        unk = self.unk_id
        ids = [self._stoi.get(c, unk) for c in text]
        return _wrap(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        return [self.encode(t, add_bos=add_bos, add_eos=add_eos) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, spans)``: token ``i`` is character ``i``, so its span is ``(i, i + 1)``."""
        return self.encode(text), [(i, i + 1) for i in range(len(text))]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        n_special = len(SPECIAL_TOKENS)
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._itos):
                raise ValueError(f"token id {i} is outside the vocabulary (size {len(self._itos)})")
            if i < n_special and skip_special_tokens:
                continue
            out.append(self._itos[i])
        return "".join(out)

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/vocab.json``; returns the directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        payload = {
            "kind": self.kind,
            "format_version": CHAR_FORMAT_VERSION,
            "special_tokens": list(SPECIAL_TOKENS),
            "chars": self.chars,
        }
        (d / CHAR_VOCAB_FILE).write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "CharTokenizer":
        path = Path(directory) / CHAR_VOCAB_FILE
        data = _read_json(path)
        if not isinstance(data, dict) or data.get("kind") != cls.kind or not isinstance(data.get("chars"), list):
            raise UserError(f"{path} is not a char tokenizer vocabulary (expected kind 'char' and a 'chars' list)")
        if data.get("special_tokens", list(SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise UserError(f"{path}: special_tokens {data.get('special_tokens')!r} differ from {list(SPECIAL_TOKENS)!r}")
        try:
            return cls(chars=data["chars"])
        except ValueError as exc:
            raise UserError(f"{path}: {exc}") from None

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- over HF tokenizers


class HFBackedTokenizer:
    """The shared half of :class:`BPETokenizer` and :class:`HFTokenizer`: a ``tokenizers.Tokenizer``
    and the ids of its special tokens.

    ``ids`` maps ``pad_id``, ``unk_id``, ``bos_id``, ``eos_id`` (always) and ``mask_id``, ``cls_id``,
    ``sep_id`` (when the tokenizer has them) to token ids. ``template`` applies the tokenizer's
    post-processor in ``encode`` (BERT's ``[CLS] ... [SEP]``, RoBERTa's ``<s> ... </s>``), as
    ``transformers``' ``AutoTokenizer(text)`` does; without it ``encode`` adds nothing unless asked
    (``add_bos`` / ``add_eos``). Padding and truncation stored in ``tokenizer.json`` are switched off:
    batches are padded by the data code, which also builds the attention mask.
    """

    kind = "hf-backed"
    REQUIRED = ("pad_id", "unk_id", "bos_id", "eos_id")
    OPTIONAL = ("mask_id", "cls_id", "sep_id")

    def __init__(self, *, tokenizer: "RawTokenizer", ids: dict[str, int], template: bool = False) -> None:
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._tok = tokenizer
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        unknown = sorted(set(ids) - set(self.REQUIRED) - set(self.OPTIONAL))
        if unknown:
            raise ValueError(f"unknown special token names {unknown}; known: {self.REQUIRED + self.OPTIONAL}")
        missing = [k for k in self.REQUIRED if k not in ids]
        if missing:
            raise ValueError(f"special token ids {missing} are missing")
        bad = {k: v for k, v in ids.items() if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n}
        if bad:
            raise ValueError(f"special token ids {bad} are outside the tokenizer's vocabulary (size {n})")
        self._ids = dict(ids)
        self.template = template

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._ids["pad_id"]

    @property
    def unk_id(self) -> int:
        return self._ids["unk_id"]

    @property
    def bos_id(self) -> int:
        return self._ids["bos_id"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos_id"]

    @property
    def mask_id(self) -> int | None:
        """The masked-LM token (``[MASK]``, ``<mask>``), or None when the tokenizer has none."""
        return self._ids.get("mask_id")

    def token(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=self.template).ids
        return _wrap(ids, self.bos_id if add_bos else None, self.eos_id if add_eos else None)

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        bos, eos = (self.bos_id if add_bos else None), (self.eos_id if add_eos else None)
        return [_wrap(e.ids, bos, eos) for e in self._tok.encode_batch(list(texts), add_special_tokens=self.template)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """``(ids, spans)``: ``text[start:end]`` is what token ``i`` covers (HF offsets; the bytes of one
        character split over two tokens give both tokens that character's span; template tokens ``(0, 0)``)."""
        enc = self._tok.encode(text, add_special_tokens=self.template)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return _hf_decode(self._tok, self.vocab_size, ids, skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        """Write ``<directory>/tokenizer.json`` (HF format) and whatever the subclass adds; returns the directory."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / BPE_FILE))
        self._save_extra(d)
        return d

    def _save_extra(self, d: Path) -> None:
        """Files beside ``tokenizer.json`` (none here)."""

    @staticmethod
    def _read_raw(path: Path) -> "RawTokenizer":
        """A ``tokenizers.Tokenizer`` from ``path``; a UserError for a missing, malformed or unusable file."""
        from tokenizers import Tokenizer as _Raw

        _read_json(path)  # a clear error for a missing or malformed file
        try:
            return _Raw.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise UserError(f"{path} is not a usable HF tokenizer file: {exc}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# --------------------------------------------------------------------------- byte-level BPE


class BPETokenizer(HFBackedTokenizer):
    """Byte-level BPE (GPT-2 style) trained and run by HF ``tokenizers``.

    Every byte is in the base alphabet, so any text round-trips exactly and ``<unk>`` is never
    produced; it exists so both tokenizers expose the same special ids.
    """

    kind = "bpe"

    def __init__(self, *, tokenizer: "RawTokenizer") -> None:
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"BPE tokenizer lacks special tokens {missing}")
        if ids[PAD] != 0:
            raise ValueError(f"BPE tokenizer must have {PAD} at id 0, found it at {ids[PAD]}")
        super().__init__(tokenizer=tokenizer, ids={"pad_id": ids[PAD], "unk_id": ids[UNK], "bos_id": ids[BOS], "eos_id": ids[EOS]})

    @classmethod
    def train(cls, texts: Iterable[str] | str, vocab_size: int, min_frequency: int = 2) -> "BPETokenizer":
        """Learn merges on ``texts`` until ``vocab_size`` tokens (fewer if the corpus runs out of pairs)."""
        from tokenizers import Tokenizer as _Raw
        from tokenizers import decoders, models, pre_tokenizers, trainers

        alphabet = pre_tokenizers.ByteLevel.alphabet()
        smallest = len(alphabet) + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise ValueError(
                f"vocab_size ({vocab_size}) must be at least {smallest} "
                f"({len(alphabet)} bytes + {len(SPECIAL_TOKENS)} special tokens)"
            )
        if min_frequency < 1:
            raise ValueError(f"min_frequency ({min_frequency}) must be >= 1")
        if isinstance(texts, str):
            texts = [texts]
        tok = _Raw(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer=tok)

    @classmethod
    def load(cls, directory: str | Path) -> "BPETokenizer":
        tok = cls._read_raw(Path(directory) / BPE_FILE)
        try:
            return cls(tokenizer=tok)
        except ValueError as exc:
            raise UserError(f"{Path(directory) / BPE_FILE} is not a usable HF tokenizer file: {exc}") from None

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------- imported (Hugging Face)


class HFTokenizer(HFBackedTokenizer):
    """Any ``tokenizer.json`` (a pretrained model's, e.g. GPT-2's, Llama's or BERT's), run by HF ``tokenizers``.

    Unlike :class:`BPETokenizer` its special tokens are the model's own, so the ids are stored:
    ``save(dir)`` writes ``tokenizer.json`` and ``special_tokens.json`` (the ids, their strings and
    ``template``). A model without a pad (or unk / bos) token uses its eos token there, as GPT-2
    fine-tuning recipes do; the attention mask keeps padding out. An encoder's tokenizer (BERT:
    ``[CLS]`` / ``[SEP]``) has no bos/eos: ``[CLS]`` and ``[SEP]`` stand in for them.
    ``template`` (encoders) makes ``encode`` add what the tokenizer's post-processor adds.
    """

    kind = "hf"

    def __init__(
        self, *, tokenizer: "RawTokenizer", pad_id: int, unk_id: int, bos_id: int, eos_id: int,
        mask_id: int | None = None, cls_id: int | None = None, sep_id: int | None = None, template: bool = False,
    ) -> None:  # fmt: skip
        named = {"pad_id": pad_id, "unk_id": unk_id, "bos_id": bos_id, "eos_id": eos_id, "mask_id": mask_id, "cls_id": cls_id, "sep_id": sep_id}
        super().__init__(tokenizer=tokenizer, ids={k: v for k, v in named.items() if v is not None or k in self.REQUIRED}, template=template)

    @classmethod
    def from_pretrained_dir(cls, directory: str | Path, model_config: dict | None = None, *, template: bool = False) -> "HFTokenizer":
        """Read ``tokenizer.json`` (+ ``tokenizer_config.json``, ``config.json`` ids) of a HF model directory."""
        d = Path(directory)
        tok = cls._read_raw(d / BPE_FILE)
        conf = _read_json(d / HF_TOKENIZER_CONFIG) if (d / HF_TOKENIZER_CONFIG).is_file() else {}
        conf = conf if isinstance(conf, dict) else {}
        model_config = model_config or {}

        def resolve(name: str) -> int | None:
            value = conf.get(f"{name}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and tok.token_to_id(value) is not None:
                return tok.token_to_id(value)
            value = model_config.get(f"{name}_token_id")
            if isinstance(value, list):
                value = value[0] if value else None
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        found = {name: resolve(name) for name in ("pad", "unk", "bos", "eos", "mask", "cls", "sep")}
        eos = next((found[n] for n in ("eos", "sep", "bos", "cls") if found[n] is not None), None)
        if eos is None:
            raise UserError(f"{d}: the tokenizer names no eos (nor bos, sep, cls) token in {HF_TOKENIZER_CONFIG} or config.json")
        bos = next((found[n] for n in ("bos", "cls") if found[n] is not None), eos)
        ids = {"pad_id": found["pad"], "unk_id": found["unk"], "bos_id": bos, "eos_id": eos}
        ids = {k: (eos if v is None else v) for k, v in ids.items()}
        ids.update({f"{n}_id": found[n] for n in ("mask", "cls", "sep") if found[n] is not None})
        try:
            return cls(tokenizer=tok, **ids, template=template)
        except ValueError as exc:
            raise UserError(f"{d}: {exc}") from None

    def _named(self) -> dict[str, str]:
        """``{"pad_token": "[PAD]", ...}`` for every special id held."""
        return {k.replace("_id", "_token"): self.token(v) for k, v in self._ids.items()}

    def _save_extra(self, d: Path) -> None:
        payload = {"kind": self.kind, **self._ids, **self._named(), "template": self.template}
        (d / HF_SPECIAL_FILE).write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def save_hf(self, directory: str | Path, *, model_input_names: Sequence[str] | None = None) -> Path:
        """Write the Hugging Face layout (``tokenizer.json`` + ``tokenizer_config.json``) into ``directory``;
        ``model_input_names`` (e.g. with ``token_type_ids`` for BERT) is what ``AutoTokenizer`` returns."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(d / BPE_FILE))
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", **self._named(), "model_max_length": 1_000_000_000}
        if model_input_names is not None:
            conf["model_input_names"] = list(model_input_names)
        (d / HF_TOKENIZER_CONFIG).write_text(json.dumps(conf, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "HFTokenizer":
        d = Path(directory)
        data = _read_json(d / HF_SPECIAL_FILE)
        if not isinstance(data, dict) or data.get("kind") != cls.kind:
            raise UserError(f"{d / HF_SPECIAL_FILE} is not an imported tokenizer's special_tokens.json (kind 'hf')")
        tok = cls._read_raw(d / BPE_FILE)
        ids = {k: data.get(k) for k in cls.REQUIRED} | {k: data[k] for k in cls.OPTIONAL if k in data}
        try:
            return cls(tokenizer=tok, **ids, template=bool(data.get("template", False)))
        except ValueError as exc:
            raise UserError(f"{d}: not a usable imported tokenizer: {exc}") from None


# --------------------------------------------------------------------------- loading


def load_tokenizer(directory: str | Path) -> CharTokenizer | BPETokenizer | HFTokenizer:
    """Load a tokenizer saved by ``save(dir)``: ``special_tokens.json`` -> imported (HF),
    ``tokenizer.json`` -> BPE, ``vocab.json`` -> char."""
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"tokenizer directory not found: {d}")
    if (d / HF_SPECIAL_FILE).is_file():
        return HFTokenizer.load(d)
    if (d / BPE_FILE).is_file():
        return BPETokenizer.load(d)
    if (d / CHAR_VOCAB_FILE).is_file():
        return CharTokenizer.load(d)
    found = sorted(p.name for p in d.iterdir())
    raise UserError(f"{d} holds no tokenizer: expected {BPE_FILE} (BPE) or {CHAR_VOCAB_FILE} (char), found {found}")


def _wrap(ids: list[int], bos: int | None, eos: int | None) -> list[int]:
    return ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])


def _read_json(path: Path) -> object:
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"tokenizer file {path} is not valid JSON: {exc}") from None


def _hf_decode(tok: Any, vocab_size: int, ids: Iterable[int], skip_special_tokens: bool) -> str:
    """Decode with an HF ``tokenizers.Tokenizer``; ids outside the vocabulary are a ValueError naming the first."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (size {vocab_size})")
    return tok.decode(ids, skip_special_tokens=skip_special_tokens)


def train_tokenizer(kind: str, texts: Sequence[str], vocab_size: int) -> "Tokenizer":
    """Train a char or byte-level BPE tokenizer on ``texts``."""
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size)
    raise ValueError(f"tokenizer kind must be 'char' or 'bpe', got {kind!r}")


def tokenizer_digest(tokenizer: "Tokenizer") -> str:
    """Digest of a tokenizer's saved files (keys the token cache)."""
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for f in sorted(Path(d).rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(d)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()
