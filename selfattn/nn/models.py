"""Models: a causal decoder LM and a sequence classifier sharing one transformer trunk.

Trunk (both models, same parameter names, so weights move from one to the other)::

    tok_emb [V, D] (+ pos_emb when position="learned") -> dropout
    -> blocks.0 .. blocks.{L-1} (pre-norm TransformerBlock) -> norm_f

``DecoderLM`` adds ``lm_head`` (tied to ``tok_emb`` when ``cfg.tie_embeddings``) and decodes
through a KV cache. ``SequenceClassifier`` pools the trunk's output and adds ``head``:

* ``pooling="mean"``: average over real tokens (``attention_mask`` True) - the default for a
  bidirectional encoder trained from scratch;
* ``pooling="last"``: the last real token - natural for a causal trunk, where only the last token
  has seen the whole sentence (the default of :meth:`SequenceClassifier.from_decoder`);
* ``pooling="first"``: the first real token (BERT's [CLS] position; only sensible bidirectionally).

The classifier's attention is bidirectional (``causal=False``) unless ``cfg.causal`` is set;
``from_decoder`` defaults to ``causal=True`` so the copied weights see what they saw in pretraining.
Padding is expected on the right for ``position="learned"`` (positions count from the first slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn.config import ModelConfig
from selfattn.nn.kv_cache import KVCache, RollingKVCache
from selfattn.nn.layers import RMSNorm, TransformerBlock, make_norm
from selfattn.nn.lora import merged_state_dict
from selfattn.nn.positions import LearnedPositions

IGNORE_INDEX = -100
# parameters that write into the residual stream: GPT-2 scales their init by 1/sqrt(2 * n_layers)
_RESIDUAL_PROJECTIONS = ("attn.out_proj.weight", "mlp.down_proj.weight")


@dataclass
class ModelOutput:
    """``logits`` ``[B, T, V]`` (LM) or ``[B, C]`` (classifier); ``loss`` a scalar when targets/labels
    were given; ``attentions`` one ``[B, H, T, S]`` tensor per layer when ``return_attention=True``."""

    logits: Tensor
    loss: Tensor | None = None
    attentions: tuple[Tensor, ...] | None = None


def _as_config(cfg: ModelConfig | dict[str, Any]) -> ModelConfig:
    return cfg if isinstance(cfg, ModelConfig) else ModelConfig.model_validate(cfg)


class _Trunk(nn.Module):
    """Embeddings, blocks and final norm; subclasses add a head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = LearnedPositions(cfg.context_length, cfg.d_model) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg)

    def _init_weights(self) -> None:
        """GPT-2 init: N(0, 0.02) for Linear/Embedding, residual projections N(0, 0.02 / sqrt(2 L))."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith(_RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, mean=0.0, std=residual_std)

    def _hidden_states(
        self,
        input_ids: Tensor,  # [B, T] int
        *,
        attention_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        return_attention: bool,
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        offset = kv_cache.length if kv_cache is not None else 0
        if offset + T > self.cfg.context_length:
            raise ValueError(
                f"sequence length ({offset + T} = cached {offset} + new {T}) exceeds context_length "
                f"({self.cfg.context_length})"
            )
        x = self.tok_emb(input_ids)  # [B, T, D]
        if self.pos_emb is not None:
            x = x + self.pos_emb(T, offset)  # [T, D] broadcast over B
        x = self.drop(x)
        attentions: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            out = block(
                x,
                attention_mask=attention_mask,
                is_causal=is_causal,
                kv_cache=kv_cache,
                layer_idx=i,
                return_weights=return_attention,
            )
            if return_attention:
                x, weights = out
                attentions.append(weights)  # [B, H, T, S]
            else:
                x = out
        return self.norm_f(x), (tuple(attentions) if return_attention else None)


# --------------------------------------------------------------------------- decoder LM


class DecoderLM(_Trunk):
    """Causal language model: ``forward(input_ids [B, T]) -> ModelOutput(logits [B, T, V], loss)``."""

    def __init__(self, cfg: ModelConfig | dict[str, Any]) -> None:
        cfg = _as_config(cfg)
        if cfg.attention == "low_rank":
            raise ValueError(
                "DecoderLM needs causal attention; attention='low_rank' (Linformer) is bidirectional only - "
                "use 'full' or 'sliding_window'"
            )
        super().__init__(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # one [V, D] matrix for input and output
        self._init_weights()

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, S] bool, True = real token (S includes cached positions)
        kv_cache: KVCache | None = None,
        targets: Tensor | None = None,  # [B, T], IGNORE_INDEX (-100) = no loss
        return_attention: bool = False,
    ) -> ModelOutput:
        h, attentions = self._hidden_states(
            input_ids,
            attention_mask=attention_mask,
            is_causal=True,
            kv_cache=kv_cache,
            return_attention=return_attention,
        )
        logits = self.lm_head(h)  # [B, T, V]
        loss = None
        if targets is not None:
            if targets.shape != input_ids.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
            loss = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
            )
        return ModelOutput(logits=logits, loss=loss, attentions=attentions)

    def new_kv_cache(
        self, batch_size: int, max_len: int | None = None, rolling: bool | None = None
    ) -> KVCache | RollingKVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` (default context_length) tokens.

        ``rolling`` (default: True for sliding-window models) returns a
        :class:`RollingKVCache` that keeps only the last ``window - 1`` positions per layer.
        """
        max_len = self.cfg.context_length if max_len is None else max_len
        if max_len > self.cfg.context_length:
            raise ValueError(f"max_len ({max_len}) exceeds context_length ({self.cfg.context_length})")
        w = self.tok_emb.weight
        windowed = self.cfg.attention == "sliding_window"  # a DecoderLM is always causal
        if rolling is None:
            rolling = windowed
        if rolling:
            if not windowed:
                raise ValueError(f"rolling=True needs attention='sliding_window', got {self.cfg.attention!r}")
            return RollingKVCache(
                n_layers=self.cfg.n_layers,
                batch_size=batch_size,
                n_kv_heads=self.cfg.kv_heads,
                head_dim=self.cfg.head_dim,
                window=self.cfg.window,
                device=w.device,
                dtype=w.dtype,
            )
        return KVCache(
            n_layers=self.cfg.n_layers,
            batch_size=batch_size,
            n_kv_heads=self.cfg.kv_heads,
            head_dim=self.cfg.head_dim,
            max_len=max_len,
            device=w.device,
            dtype=w.dtype,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,  # [B, T0], unpadded prompts of equal length
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
        rolling_cache: bool | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt; returns ``[B, T0 + n]`` (prompt included).

        Runs the prompt once (prefill) into a KV cache, then one token per step. ``temperature=0``
        or ``top_k=1`` is greedy; ``top_p`` keeps the smallest set of tokens whose probability
        reaches ``top_p`` (nucleus sampling). With ``eos_id``, a sequence that produced it is padded
        with ``cfg.pad_token_id`` afterwards and decoding stops once every sequence has (so ``n``
        may be smaller than ``max_new_tokens``).

        Refuses (``ValueError``) when ``T0 + max_new_tokens`` exceeds ``context_length`` rather than
        sliding the window: with a cache, sliding would silently change what the model conditions
        on. Crop the prompt to its last ``context_length - max_new_tokens`` tokens to fit.
        The model is put in eval mode while generating and restored afterwards. ``rolling_cache``
        (default: on for causal sliding-window models) keeps only the last ``window - 1`` positions
        per layer, so memory stays bounded by the window (see :meth:`new_kv_cache`).
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, T0] with T0 >= 1, got shape {tuple(input_ids.shape)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) must be >= 0")
        _check_sampling(temperature, top_k, top_p)
        B, T0 = input_ids.shape
        total = T0 + max_new_tokens
        if total > self.cfg.context_length:
            raise ValueError(
                f"prompt length ({T0}) + max_new_tokens ({max_new_tokens}) = {total} exceeds context_length "
                f"({self.cfg.context_length}); keep the prompt's last {max(self.cfg.context_length - max_new_tokens, 0)} "
                "tokens or ask for fewer new tokens"
            )
        if max_new_tokens == 0:
            return input_ids.clone()

        was_training = self.training
        self.eval()
        try:
            cache = self.new_kv_cache(B, max_len=total, rolling=rolling_cache)
            logits = self(input_ids, kv_cache=cache).logits[:, -1]  # prefill -> [B, V]
            pieces = [input_ids]
            finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            for step in range(max_new_tokens):
                next_ids = sample_next_token(
                    logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
                )  # [B]
                if eos_id is not None:
                    next_ids = torch.where(finished, torch.full_like(next_ids, self.cfg.pad_token_id), next_ids)
                    finished |= next_ids == eos_id
                pieces.append(next_ids[:, None])
                if step == max_new_tokens - 1 or (eos_id is not None and bool(finished.all())):
                    break
                logits = self(next_ids[:, None], kv_cache=cache).logits[:, -1]  # [B, V]
            return torch.cat(pieces, dim=1)
        finally:
            self.train(was_training)


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature ({temperature}) must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k ({top_k}) must be >= 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p ({top_p}) must be in (0, 1]")


def sample_next_token(
    logits: Tensor,  # [B, V]
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """One token id per row ``[B]``: temperature, then top-k, then top-p (nucleus), then sampling."""
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly better tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # the top token survives
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# --------------------------------------------------------------------------- classifier


class SequenceClassifier(_Trunk):
    """``forward(input_ids [B, T], attention_mask [B, T] bool) -> ModelOutput(logits [B, C], loss)``.

    ``pooling`` / ``causal`` default to ``cfg.pooling`` / ``cfg.causal``; the values used are
    written back into ``self.cfg`` (so they are saved with the checkpoint).
    """

    def __init__(
        self, cfg: ModelConfig | dict[str, Any], *, pooling: str | None = None, causal: bool | None = None
    ) -> None:
        cfg = _as_config(cfg)
        updates = {k: v for k, v in (("pooling", pooling), ("causal", causal)) if v is not None}
        if updates:
            cfg = ModelConfig.model_validate({**cfg.model_dump(), **updates})
        if cfg.n_classes is None:
            raise ValueError("SequenceClassifier needs cfg.n_classes (>= 2), got None")
        if cfg.causal and cfg.attention == "low_rank":
            raise ValueError("causal=True cannot use attention='low_rank' (Linformer is bidirectional only)")
        super().__init__(cfg)
        self.head_drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        self._init_weights()

    @property
    def pooling(self) -> str:
        return self.cfg.pooling

    @property
    def causal(self) -> bool:
        return self.cfg.causal

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, T] bool, True = real token; None = all real
        labels: Tensor | None = None,  # [B] int in [0, n_classes)
        return_attention: bool = False,
    ) -> ModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        mask = attention_mask.to(torch.bool)
        h, attentions = self._hidden_states(
            input_ids, attention_mask=mask, is_causal=self.cfg.causal, kv_cache=None, return_attention=return_attention
        )
        pooled = pool(h, mask, self.cfg.pooling)  # [B, D]
        logits = self.head(self.head_drop(pooled))  # [B, C]
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, attentions=attentions)

    @classmethod
    def from_decoder(
        cls,
        lm: DecoderLM,
        n_classes: int,
        pooling: str = "last",
        causal: bool = True,
        dropout: float | None = None,
    ) -> "SequenceClassifier":
        """A classifier whose trunk is a copy of ``lm``'s (LoRA adapters folded in); ``head`` is new.

        ``causal=True`` keeps attention as in pretraining (pair it with ``pooling="last"``);
        ``causal=False`` turns the trunk bidirectional for fine-tuning. ``dropout`` overrides
        ``cfg.dropout`` for the new model. The copy lives on ``lm``'s device and dtype.
        """
        updates: dict[str, Any] = {"n_classes": n_classes, "pooling": pooling, "causal": causal}
        if dropout is not None:
            updates["dropout"] = dropout
        cfg = ModelConfig.model_validate({**lm.cfg.model_dump(), **updates})
        clf = cls(cfg)
        w = lm.tok_emb.weight
        clf.to(device=w.device, dtype=w.dtype)
        source = merged_state_dict(lm)
        trunk = {k: source[k] for k in clf.state_dict() if not k.startswith(("head.", "head_drop."))}
        clf.load_state_dict(trunk, strict=False)
        return clf


def pool(h: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """``h [B, T, D]``, ``mask [B, T]`` bool (True = real) -> ``[B, D]``.

    A row without any real token pools to zeros (mean, max) or position 0 (first/last).
    """
    B, T, _ = h.shape
    if pooling == "mean":
        weights = mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
        return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if pooling == "max":  # per feature, over the real tokens
        pooled = h.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)  # [B, D]
        return torch.where(mask.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))
    positions = torch.arange(T, device=h.device).expand(B, T)
    if pooling == "last":
        index = torch.where(mask, positions, -1).max(dim=1).values.clamp(min=0)  # [B]
    elif pooling == "first":
        index = torch.where(mask, positions, T).min(dim=1).values.clamp(max=T - 1)
    else:
        raise ValueError(f"pooling ({pooling!r}) must be 'mean', 'max', 'last' or 'first'")
    return h[torch.arange(B, device=h.device), index]


# --------------------------------------------------------------------------- helpers


def build_decoder_lm(cfg: ModelConfig | dict[str, Any]) -> DecoderLM:
    """A freshly initialised :class:`DecoderLM` for ``cfg``."""
    return DecoderLM(cfg)


def build_classifier(cfg: ModelConfig | dict[str, Any]) -> SequenceClassifier:
    """A freshly initialised :class:`SequenceClassifier` for ``cfg`` (``cfg.n_classes`` required)."""
    return SequenceClassifier(cfg)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups: weight matrices decay; norms, biases and embeddings do not.

    Only parameters with ``requires_grad`` are included (so frozen LoRA bases are left out).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay ({weight_decay}) must be >= 0")
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm, RMSNorm, nn.RMSNorm)):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay_params, no_decay_params = [], []
    for name, p in model.named_parameters():  # tied weights appear once
        if not p.requires_grad:
            continue
        if id(p) in no_decay or p.dim() < 2 or name.endswith("bias"):
            no_decay_params.append(p)
        else:
            decay_params.append(p)
    return [
        {"params": decay_params, "weight_decay": weight_decay},
        {"params": no_decay_params, "weight_decay": 0.0},
    ]


def num_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
