"""selfattn: self-attention models in plain PyTorch.

Importing the package is cheap and has no side effects: the public names below are
resolved lazily on first access (so ``selfattn --help`` does not pay for ``import torch``).
"""

from __future__ import annotations

from selfattn.utils import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "scaled_dot_product_attention": "selfattn.nn.functional",
    "naive_attention": "selfattn.nn.functional",
    "MultiHeadAttention": "selfattn.nn.attention",
    "KVCache": "selfattn.nn.kv_cache",
    "ModelConfig": "selfattn.config",
    "RopeScaling": "selfattn.config",
    "DecoderLM": "selfattn.nn.models",
    "SequenceClassifier": "selfattn.nn.models",
    "Encoder": "selfattn.nn.models",
    "MaskedLM": "selfattn.nn.models",
    "build_decoder_lm": "selfattn.nn.models",
    "build_classifier": "selfattn.nn.models",
    "save_pretrained": "selfattn.io.checkpoint",
    "load_pretrained": "selfattn.io.checkpoint",
    "read_table": "selfattn.data.tables",
    "UserError": "selfattn.errors",
    "LoRAConfig": "selfattn.nn.lora",
    "apply_lora": "selfattn.nn.lora",
    "merge_lora": "selfattn.nn.lora",
    "unmerge_lora": "selfattn.nn.lora",
    "CharTokenizer": "selfattn.data.tokenization",
    "BPETokenizer": "selfattn.data.tokenization",
    "load_tokenizer": "selfattn.data.tokenization",
    "HFTokenizer": "selfattn.data.tokenization",
    "import_hf": "selfattn.io.hf",
    "export_hf": "selfattn.io.hf",
    "export_peft": "selfattn.io.hf",
    "attention_maps": "selfattn.eval.interpret",
    "plot_attention": "selfattn.eval.interpret",
}

__all__ = sorted(_EXPORTS) + ["__version__"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, extra=["__version__"])
