"""Attention maps and token attributions: which tokens a classifier's prediction rests on.

Attributions (:func:`explain`; one score per token, mapped back to words with
:meth:`Attribution.words`)::

    [a] = explain(clf, tokenizer, ["a gripping, beautifully acted film"], method="integrated_gradients")
    a.words()   # [("a", 0.01), ("gripping,", 0.21), ...]; the scores add up to p(x) - p(baseline)

* ``integrated_gradients`` (Sundararajan et al. 2017): the path integral of the gradient of the
  explained class's probability along the straight line from a baseline (every token's embedding
  replaced by the ``<pad>`` or ``<unk>`` embedding; positions and mask unchanged) to the input,
  times (input - baseline), summed over the embedding dimension. Gauss-Legendre quadrature with
  ``steps`` nodes, all texts and nodes of a batch in one forward/backward (at most
  ``max_rows`` rows at a time). Complete: the scores sum to ``p(x) - p(baseline)`` (``delta``
  reports the quadrature error).
* ``gradient_x_input``: gradient of that probability times the token's embedding (one backward).
* ``attention_rollout`` (Abnar & Zuidema 2020): per layer the head-mean attention plus the
  identity for the residual stream, rows renormalised, multiplied through the layers; a token's
  score is the rollout weight the pooled positions put on it (non-negative, sums to 1, not
  class-specific).
* ``attention_last``: the last layer's head-mean attention, pooled the same way - the raw
  attention baseline that rollout and the gradients are compared against.

Padding gets exactly zero; texts longer than ``max_tokens`` (default the model's context) are
cut and the :class:`Attribution` says so in ``note``; an empty text gets no tokens and a note.

::

    tokens, weights = attention_maps(model, tokenizer, "To be, or not to be")  # weights [L, H, T, T]
    plot_attention(tokens, weights, "attn.png")                # last layer: one panel per head + mean
    plot_attention(tokens, weights, "l0h1.png", layer=0, head=1)

Row ``i`` of a map is the distribution of query token ``i`` over the key tokens (sums to 1 over
the keys it may attend to; a causal LM's maps are zero above the diagonal). Needs ``full`` or
``sliding_window`` attention: a ``low_rank`` model attends to projected keys, not tokens.
"""

from __future__ import annotations

import bisect
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from selfattn.data.tokenization import BPETokenizer, CharTokenizer
from selfattn.errors import UserError
from selfattn.eval.calibration import check_temperature
from selfattn.nn.models import DecoderLM, SequenceClassifier, pool

METHODS = ("integrated_gradients", "gradient_x_input", "attention_rollout", "attention_last")
ATTENTION_METHODS = ("attention_rollout", "attention_last")
BASELINES = ("pad", "unk")
MAX_STEPS = 512  # quadrature nodes; beyond this the error is far below float32 noise


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


# --------------------------------------------------------------------------- attributions


@dataclass
class Attribution:
    """One text's explanation: ``scores[i]`` belongs to ``tokens[i]`` = ``text[spans[i][0]:spans[i][1]]``.

    ``target`` is the class explained (default: the predicted one), ``probs`` the model's class
    probabilities on the (possibly truncated) text. For integrated gradients ``delta`` is
    ``p(x) - p(baseline) - sum(scores)``, the quadrature error. ``note`` says what was cut or
    skipped ("" when nothing was).
    """

    text: str
    tokens: list[str]
    scores: list[float]
    spans: list[tuple[int, int]]
    method: str
    target: int | None
    probs: list[float]
    note: str = ""
    delta: float | None = None

    def words(self) -> list[tuple[str, float]]:
        """Whitespace-separated words of the explained text with the summed scores of their tokens.

        A token belongs to the word holding its first non-space character (a BPE token's leading
        space does not move it); a token of spaces only goes to the next word (or the last one).
        Summing keeps integrated gradients' completeness at the word level, except for the tokens
        an encoder's tokenizer adds (``[CLS]``, ``[SEP]``: empty spans), which belong to no word.
        """
        covered = max((end for _, end in self.spans), default=0)
        words = [(m.start(), min(m.end(), covered)) for m in re.finditer(r"\S+", self.text[:covered])]
        if not words:
            return []
        starts = [w[0] for w in words]
        totals = [0.0] * len(words)
        for (start, end), score in zip(self.spans, self.scores):
            if start == end:  # a template token: no text
                continue
            solid = next((p for p in range(start, end) if not self.text[p].isspace()), None)
            if solid is None:  # spaces only: the next word, else the last
                k = min(bisect.bisect_left(starts, end), len(words) - 1)
            else:
                k = bisect.bisect_right(starts, solid) - 1
            totals[k] += score
        return [(self.text[a:b], t) for (a, b), t in zip(words, totals)]

    def pairs(self, unit: str = "token") -> list[list]:
        """``[[token, score], ...]`` (``unit="token"``) or ``[[word, score], ...]`` (``unit="word"``)."""
        if unit == "word":
            return [[w, float(v)] for w, v in self.words()]
        if unit == "token":
            return [[t, float(v)] for t, v in zip(self.tokens, self.scores)]
        raise UserError(f"attribution unit ({unit!r}) must be 'token' or 'word'")


def check_explainable(model: object, method: str) -> None:
    """Raise :class:`UserError` naming the method and the model kind when ``method`` cannot explain ``model``."""
    if method not in METHODS:
        raise UserError(f"explanation method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if isinstance(model, (list, tuple)):
        raise UserError(
            f"{method} explains one classifier; got an ensemble of {len(model)} models (their averaged "
            "probabilities have no single set of embeddings or attention maps) - explain each member instead"
        )
    if isinstance(model, DecoderLM):
        raise UserError(
            f"{method} explains a classifier's class prediction; got a language model (DecoderLM), which "
            "predicts next tokens - fine-tune a SequenceClassifier from it to explain sentiment"
        )
    if not isinstance(model, SequenceClassifier):
        raise UserError(f"{method} explains a SequenceClassifier; got a {type(model).__name__}")
    if method in ATTENTION_METHODS and model.cfg.attention == "low_rank":
        raise UserError(
            f"{method} needs token-to-token attention; this classifier uses attention='low_rank' (it attends "
            "to projected keys) - use integrated_gradients or gradient_x_input"
        )


@contextmanager
def _embeddings_replaced(model: SequenceClassifier, embeds: Tensor) -> Iterator[None]:
    """Within the block, the token embedding layer outputs ``embeds`` [B, T, D] instead of looking up ids
    (positions, mask and everything downstream run as usual)."""
    handle = model.tok_emb.register_forward_hook(lambda module, args, out: embeds)
    try:
        yield
    finally:
        handle.remove()


def _probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``softmax(logits / temperature)`` over the last dim, in at least float32."""
    return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).softmax(dim=-1)


def _class_prob(logits: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """Probability of ``target [N]`` under ``logits [N, C]`` scaled by ``temperature``, in at least float32."""
    return _probs(logits, temperature).gather(1, target[:, None]).squeeze(1)  # [N]


def gradient_x_input(
    model: SequenceClassifier,
    input_ids: Tensor,  # [B, T]
    attention_mask: Tensor,  # [B, T] bool
    target: Tensor,  # [B] class to explain
    temperature: float = 1.0,
) -> Tensor:
    """``[B, T]``: d p(target) / d embedding, dotted with the embedding; zero on padding.
    ``p = softmax(logits / temperature)``: a calibrated model's probability as it is served."""
    embeds = model.tok_emb(input_ids).detach().requires_grad_(True)  # [B, T, D]
    with _embeddings_replaced(model, embeds):
        prob = _class_prob(model(input_ids, attention_mask).logits, target, temperature)
    (grad,) = torch.autograd.grad(prob.sum(), embeds)
    return (grad * embeds.detach()).sum(-1) * attention_mask  # [B, T]


def integrated_gradients(
    model: SequenceClassifier,
    input_ids: Tensor,  # [B, T]
    attention_mask: Tensor,  # [B, T] bool
    target: Tensor,  # [B]
    *,
    steps: int = 32,
    baseline_id: int = 0,
    max_rows: int = 512,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """``(scores [B, T], delta [B])``: integrated gradients of p(target) on the token embeddings,
    ``p = softmax(logits / temperature)`` (a calibrated model's probability as it is served).

    Baseline: the embedding of ``baseline_id`` at every real position. ``delta`` = p(x) -
    p(baseline) - sum(scores) (zero for exact integration). Rows are the ``B * steps``
    interpolation points, run ``max_rows`` at a time (bounded memory for any batch).
    """
    import numpy as np

    if not 1 <= steps <= MAX_STEPS:
        raise UserError(f"integrated gradients steps ({steps}) must be between 1 and {MAX_STEPS}")
    B, T = input_ids.shape
    weight = model.tok_emb.weight
    x = model.tok_emb(input_ids).detach()  # [B, T, D]
    base = weight[baseline_id].detach().expand_as(x)  # [B, T, D]
    diff = x - base
    nodes, w = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    alphas = torch.tensor((nodes + 1) / 2, dtype=x.dtype, device=x.device)  # [S] on [0, 1]
    weights = torch.tensor(w / 2, dtype=torch.float64, device=x.device)  # [S], sum 1
    grad_sum = torch.zeros_like(x)
    rows = torch.arange(B * steps, device=x.device)
    for chunk in rows.split(max(1, max_rows)):
        b, s = chunk // steps, chunk % steps
        points = (base[b] + alphas[s, None, None] * diff[b]).requires_grad_(True)  # [n, T, D]
        with _embeddings_replaced(model, points):
            prob = _class_prob(model(input_ids[b], attention_mask[b]).logits, target[b], temperature)  # [n]
        (grad,) = torch.autograd.grad((prob * weights[s].to(prob.dtype)).sum(), points)
        grad_sum.index_add_(0, b, grad)
    scores = (grad_sum * diff).sum(-1) * attention_mask  # [B, T]
    with torch.no_grad():
        p_x = _class_prob(model(input_ids, attention_mask).logits, target, temperature)
        with _embeddings_replaced(model, base):
            p_base = _class_prob(model(input_ids, attention_mask).logits, target, temperature)
    delta = p_x - p_base - scores.sum(-1).to(p_x.dtype)
    return scores, delta


def attention_rollout(
    attentions: Sequence[Tensor],  # n_layers x [B, H, T, T]
    attention_mask: Tensor | None = None,  # [B, T] bool; None = all real
) -> Tensor:
    """``[B, T, T]`` rollout: ``R = Â_L ... Â_1`` with ``Â = rownorm(0.5 * mean_heads(A) + 0.5 * I)``.

    Row ``i`` is how much of position ``i``'s last-layer state traces back to each input token;
    every row sums to 1. Real rows put nothing on padding (their attention there is zero).
    """
    if not attentions:
        raise ValueError("attention_rollout needs at least one layer's attention")
    B, _, T, S = attentions[0].shape
    if S != T:
        raise ValueError(f"attention_rollout needs square maps [B, H, T, T], got {tuple(attentions[0].shape)}")
    eye = torch.eye(T, dtype=torch.float64, device=attentions[0].device)
    rollout = eye.expand(B, T, T)
    for a in attentions:
        a_hat = 0.5 * a.double().mean(dim=1) + 0.5 * eye  # [B, T, T]
        a_hat = a_hat / a_hat.sum(dim=-1, keepdim=True)
        rollout = a_hat @ rollout
    if attention_mask is not None:  # a padded query's row carries no information: keep it stochastic, on itself
        pad_rows = ~attention_mask.bool()
        rollout = torch.where(pad_rows[:, :, None], eye.expand(B, T, T), rollout)
    return rollout


def _query_weights(attention_mask: Tensor, pooling: str) -> Tensor:
    """``[B, T]``: how the classifier's pooling weighs each position's final state (mean and max: uniform
    over real tokens, max's per-feature choice having no single weight; last/first: one-hot)."""
    mask = attention_mask.to(torch.float64)
    if pooling in ("mean", "max"):
        return mask / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    eye = torch.eye(mask.shape[1], dtype=torch.float64, device=mask.device)
    return pool(eye.expand(mask.shape[0], -1, -1), attention_mask.bool(), pooling)  # picks row last/first


def attention_scores(model: SequenceClassifier, input_ids: Tensor, attention_mask: Tensor, method: str) -> Tensor:
    """``[B, T]`` token scores from attention: ``attention_rollout`` or raw ``attention_last``."""
    with torch.no_grad():
        out = model(input_ids, attention_mask, return_attention=True)
    maps = [a.detach() for a in out.attentions]  # n_layers x [B, H, T, T]
    if method == "attention_rollout":
        matrix = attention_rollout(maps, attention_mask)
    elif method == "attention_last":
        matrix = maps[-1].double().mean(dim=1)
    else:
        raise ValueError(f"attention method ({method!r}) must be one of {ATTENTION_METHODS}")
    q = _query_weights(attention_mask, model.cfg.pooling)  # [B, T]
    scores = torch.einsum("bt,bts->bs", q, matrix)  # [B, T]
    return scores * attention_mask


def _encode(tokenizer: CharTokenizer | BPETokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    if hasattr(tokenizer, "encode_with_offsets"):
        return tokenizer.encode_with_offsets(text)
    ids = tokenizer.encode(text)  # a tokenizer without offsets: spans from decoding, token by token
    spans, pos = [], 0
    for i in ids:
        n = len(tokenizer.decode([i], skip_special_tokens=False))
        spans.append((min(pos, len(text)), min(pos + n, len(text))))
        pos += n
    return ids, spans


@dataclass
class _Encoded:
    """A text ready to explain: its index in the input, token ids and character spans, and a note."""

    index: int
    ids: list[int]
    spans: list[tuple[int, int]]
    note: str = ""


def explain(
    model: SequenceClassifier,
    tokenizer: CharTokenizer | BPETokenizer,
    texts: Sequence[str],
    *,
    method: str = "integrated_gradients",
    targets: Sequence[int | None] | None = None,
    steps: int = 32,
    baseline: str = "pad",
    max_tokens: int | None = None,
    batch_size: int = 16,
    max_rows: int = 512,
    temperature: float = 1.0,
) -> list[Attribution]:
    """One :class:`Attribution` per text (same order), explaining ``targets`` (default: the predicted class).

    ``temperature``: a calibrated checkpoint's (:func:`selfattn.eval.calibration.temperature_of`), so
    ``probs`` and the gradient methods' scores are those of the probabilities the model serves
    (integrated gradients' scores then sum to that probability's change from the baseline).

    ``max_tokens`` (default and at most the model's ``context_length``) bounds each text's cost;
    longer texts are cut with a note. Work per batch: ``batch_size`` texts, and for integrated
    gradients ``batch_size * steps`` interpolation rows in chunks of ``max_rows``. The model runs
    in eval mode and is restored; its parameters get no ``.grad``.

    Three steps: :func:`_prepare` (encode, cut, set empty texts aside), :func:`_pad` (a batch as
    ``[B, T]`` ids and mask), :func:`_score` (probabilities, targets, the method's scores).
    """
    limit = _check_explain_args(model, method, temperature, baseline, steps, max_tokens, targets, texts)
    results, todo = _prepare(tokenizer, texts, limit, method)
    device = model.tok_emb.weight.device
    baseline_id = tokenizer.pad_id if baseline == "pad" else tokenizer.unk_id
    score = {"method": method, "steps": steps, "baseline_id": baseline_id, "max_rows": max_rows, "temperature": temperature}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), max(1, batch_size)):
            chunk = todo[start : start + max(1, batch_size)]
            input_ids, mask = _pad(chunk, tokenizer.pad_id, device)
            wanted = [targets[e.index] if targets is not None else None for e in chunk]
            for e, attribution in zip(chunk, _score(model, texts, chunk, input_ids, mask, wanted, **score)):
                results[e.index] = attribution
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def _check_explain_args(
    model: SequenceClassifier, method: str, temperature: float, baseline: str, steps: int,
    max_tokens: int | None, targets: Sequence[int | None] | None, texts: Sequence[str],
) -> int:
    """The token limit per text; a UserError (ValueError for mismatched ``targets``) naming the bad argument."""
    check_explainable(model, method)
    check_temperature(temperature)
    if baseline not in BASELINES:
        raise UserError(f"integrated gradients baseline ({baseline!r}) must be one of {BASELINES}")
    if method == "integrated_gradients" and not 1 <= steps <= MAX_STEPS:
        raise UserError(f"integrated gradients steps ({steps}) must be between 1 and {MAX_STEPS}")
    limit = model.cfg.context_length if max_tokens is None else min(max_tokens, model.cfg.context_length)
    if limit < 1:
        raise UserError(f"max_tokens ({max_tokens}) must be >= 1")
    if targets is not None and len(targets) != len(texts):
        raise ValueError(f"targets ({len(targets)}) must have one entry per text ({len(texts)})")
    return limit


def _prepare(
    tokenizer: CharTokenizer | BPETokenizer, texts: Sequence[str], limit: int, method: str
) -> tuple[list[Attribution | None], list[_Encoded]]:
    """Results with empty texts already answered, and the texts to score (cut to ``limit`` tokens, with a note)."""
    results: list[Attribution | None] = [None] * len(texts)
    todo = []
    for i, text in enumerate(texts):
        ids, spans = _encode(tokenizer, text)
        if not ids:
            results[i] = Attribution(text, [], [], [], method, None, [], note="empty text: nothing to explain")
            continue
        note = ""
        if len(ids) > limit:
            note = f"truncated from {len(ids)} to {limit} tokens; only the first {limit} are explained"
            ids, spans = ids[:limit], spans[:limit]
        todo.append(_Encoded(i, ids, spans, note))
    return results, todo


def _pad(chunk: Sequence[_Encoded], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``input_ids [B, T]`` right-padded with ``pad_id`` and ``mask [B, T]`` (True = real token)."""
    T = max(len(e.ids) for e in chunk)
    input_ids = torch.full((len(chunk), T), pad_id, dtype=torch.long, device=device)  # [B, T]
    mask = torch.zeros((len(chunk), T), dtype=torch.bool, device=device)  # [B, T]
    for j, e in enumerate(chunk):
        input_ids[j, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
        mask[j, : len(e.ids)] = True
    return input_ids, mask


def _score(
    model: SequenceClassifier, texts: Sequence[str], chunk: Sequence[_Encoded], input_ids: Tensor, mask: Tensor,
    wanted: Sequence[int | None], *, method: str, steps: int, baseline_id: int, max_rows: int, temperature: float,
) -> list[Attribution]:
    """The batch's probabilities, explained classes (``wanted`` or the predicted one) and scores, per text."""
    with torch.no_grad():
        probs = _probs(model(input_ids, mask).logits, temperature)  # [B, C]
    target = torch.tensor([int(t) if t is not None else int(p.argmax()) for t, p in zip(wanted, probs)], device=input_ids.device)  # [B]
    delta = None
    if method == "integrated_gradients":
        scores, delta = integrated_gradients(
            model, input_ids, mask, target, steps=steps, baseline_id=baseline_id, max_rows=max_rows, temperature=temperature
        )
    elif method == "gradient_x_input":
        scores = gradient_x_input(model, input_ids, mask, target, temperature)
    else:
        scores = attention_scores(model, input_ids, mask, method)
    scores = scores.detach().double().cpu()
    return [
        Attribution(
            text=texts[e.index],
            tokens=[texts[e.index][a:b] for a, b in e.spans],
            scores=scores[j, : len(e.ids)].tolist(),
            spans=[(int(a), int(b)) for a, b in e.spans],
            method=method,
            target=int(target[j]),
            probs=probs[j].tolist(),
            note=e.note,
            delta=float(delta[j]) if delta is not None else None,
        )
        for j, e in enumerate(chunk)
    ]


def score_colour(score: float, scale: float) -> str:
    """``#rrggbb`` for a score: green for positive, red for negative, white at zero, full at ``|score| = scale``."""
    level = 0.0 if scale <= 0 or not math.isfinite(score) else max(-1.0, min(1.0, score / scale))
    fade = int(round(255 * (1 - abs(level))))
    return f"#{fade:02x}ff{fade:02x}" if level >= 0 else f"#ff{fade:02x}{fade:02x}"
