"""selfattn: self-attention models in plain PyTorch.

Importing the package is cheap and has no side effects: the public names below are
resolved lazily on first access (so ``selfattn --help`` does not pay for ``import torch``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "scaled_dot_product_attention": "selfattn.functional",
    "naive_attention": "selfattn.functional",
    "MultiHeadAttention": "selfattn.attention",
    "KVCache": "selfattn.attention",
    "ModelConfig": "selfattn.config",
    "RopeScaling": "selfattn.config",
    "DecoderLM": "selfattn.models",
    "SequenceClassifier": "selfattn.models",
    "build_decoder_lm": "selfattn.models",
    "build_classifier": "selfattn.models",
    "save_pretrained": "selfattn.checkpoint",
    "load_pretrained": "selfattn.checkpoint",
    "read_table": "selfattn.data",
    "UserError": "selfattn.errors",
    "LoRAConfig": "selfattn.lora",
    "apply_lora": "selfattn.lora",
    "merge_lora": "selfattn.lora",
    "unmerge_lora": "selfattn.lora",
    "CharTokenizer": "selfattn.tokenization",
    "BPETokenizer": "selfattn.tokenization",
    "load_tokenizer": "selfattn.tokenization",
    "HFTokenizer": "selfattn.tokenization",
    "import_hf": "selfattn.hf",
    "export_hf": "selfattn.hf",
    "export_peft": "selfattn.hf",
    "attention_maps": "selfattn.interpret",
    "plot_attention": "selfattn.interpret",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'selfattn' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
