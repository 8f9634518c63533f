"""Attention maps: per-layer, per-head attention weights for one text, and heatmaps of them.

::

    tokens, weights = attention_maps(model, tokenizer, "To be, or not to be")  # weights [L, H, T, T]
    plot_attention(tokens, weights, "attn.png")                # last layer: one panel per head + mean
    plot_attention(tokens, weights, "l0h1.png", layer=0, head=1)

Row ``i`` of a map is the distribution of query token ``i`` over the key tokens (sums to 1 over
the keys it may attend to; a causal LM's maps are zero above the diagonal). Needs ``full`` or
``sliding_window`` attention: a ``low_rank`` model attends to projected keys, not tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from selfattn.models import SequenceClassifier
from selfattn.tokenization import BPETokenizer, CharTokenizer


@torch.no_grad()
def attention_maps(
    model: nn.Module,
    tokenizer: CharTokenizer | BPETokenizer,
    text: str,
    device: str | torch.device = "cpu",
) -> tuple[list[str], Tensor]:
    """``(tokens, weights [n_layers, n_heads, T, T])`` for ``text`` (cut to ``context_length`` tokens).

    ``tokens[i]`` is the text of token ``i`` (``tokenizer.decode([id])``; a byte-level BPE token
    holding part of a multi-byte character shows as U+FFFD). Works for a DecoderLM (causal) and a
    SequenceClassifier (as configured). The model is run in eval mode and left as it was.
    """
    cfg = model.cfg
    if cfg.attention == "low_rank":
        raise ValueError("attention maps need attention='full' or 'sliding_window'; 'low_rank' attends to projected keys")
    ids = tokenizer.encode(text)[: cfg.context_length]
    if not ids:
        raise ValueError(f"text {text[:40]!r} encodes to no tokens")
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # [1, T]
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, SequenceClassifier):
            out = model(input_ids, torch.ones_like(input_ids, dtype=torch.bool), return_attention=True)
        else:
            out = model(input_ids, return_attention=True)
    finally:
        model.train(was_training)
    weights = torch.stack([a[0] for a in out.attentions]).float().cpu()  # [L, H, T, T]
    tokens = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return tokens, weights


def _label(token: str) -> str:
    """Make whitespace visible on an axis."""
    return token.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def plot_attention(
    tokens: Sequence[str],
    weights: Tensor,  # [L, H, T, T], [H, T, T] or [T, T]
    path: str | Path,
    layer: int | None = None,
    head: int | None = None,
) -> Path:
    """Draw attention heatmaps (rows = queries, columns = keys, tokens on both axes) to ``path``.

    ``layer=None`` takes the last layer. ``head=None`` draws a grid with one panel per head plus
    their mean; ``head=h`` draws that head alone. Uses matplotlib's Agg canvas directly (no pyplot,
    no global backend change), so it works headless and leaves a notebook's backend alone.
    Returns ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    w = weights.detach().float().cpu()
    while w.dim() < 4:
        w = w.unsqueeze(0)
    if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        raise ValueError(f"weights must be [L, H, T, T] (or [H, T, T], [T, T]), got shape {tuple(weights.shape)}")
    n_layers, n_heads, T, _ = w.shape
    if len(tokens) != T:
        raise ValueError(f"len(tokens) ({len(tokens)}) must equal the maps' size T ({T})")
    layer = n_layers - 1 if layer is None else layer
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer ({layer}) out of range for {n_layers} layers")
    if head is not None and not -n_heads <= head < n_heads:
        raise ValueError(f"head ({head}) out of range for {n_heads} heads")
    layer = layer % n_layers

    if head is not None:
        panels = [(f"layer {layer}, head {head % n_heads}", w[layer, head])]
    else:
        panels = [(f"head {h}", w[layer, h]) for h in range(n_heads)]
        panels.append(("mean of heads", w[layer].mean(dim=0)))
    n_cols = min(len(panels), 3)
    n_rows = -(-len(panels) // n_cols)
    cell = max(3.0, 0.22 * T + 1.5)
    fig = Figure(figsize=(cell * n_cols, cell * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    labels = [_label(t) for t in tokens]
    font = max(4, min(10, int(200 / max(T, 1))))
    for i, (title, grid) in enumerate(panels):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        image = ax.imshow(grid.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="equal")
        ax.set_xticks(range(T), labels, rotation=90, fontsize=font)
        ax.set_yticks(range(T), labels, fontsize=font)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(title if head is not None else f"layer {layer}, {title}")
        fig.colorbar(image, ax=ax, shrink=0.8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
