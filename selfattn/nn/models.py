"""Models on one transformer trunk: a causal decoder LM, a bidirectional encoder (plain and masked
LM) and a sequence classifier.

Trunk (every model, same parameter names, so weights move from one to the other)::

    tok_emb [V, D] (+ type_emb when type_vocab_size > 0) (+ pos_emb when position="learned")
    -> emb_norm (when embedding_norm) -> dropout
    -> blocks.0 .. blocks.{L-1} (TransformerBlock, pre- or post-norm) -> norm_f (pre-norm only)
    (+ pooler [D, D] when cfg.pooler != "none": encoders and classifiers)

``DecoderLM`` adds ``lm_head`` (tied to ``tok_emb`` when ``cfg.tie_embeddings``) and decodes
through a KV cache. ``Encoder`` returns the hidden states (``last_hidden_state``, Hugging Face's
name) and ``MaskedLM`` adds BERT's MLM head (``mlm_head``: dense, GELU, norm, a decoder tied to
``tok_emb`` with its own bias); both attend bidirectionally and never generate.
``SequenceClassifier`` pools the trunk's output (optionally through ``pooler``) and adds ``head``:

* ``pooling="mean"``: average over real tokens (``attention_mask`` True) - the default for a
  bidirectional encoder trained from scratch, and sentence-transformers' MiniLM;
* ``pooling="last"``: the last real token - natural for a causal trunk, where only the last token
  has seen the whole sentence (the default of :meth:`SequenceClassifier.from_decoder`);
* ``pooling="first"``: the first real token (BERT's [CLS] position; only sensible bidirectionally).

The classifier's attention is bidirectional (``causal=False``) unless ``cfg.causal`` is set;
``from_decoder`` defaults to ``causal=True`` so the copied weights see what they saw in pretraining.
Padding is expected on the right for ``position="learned"`` (positions count from the first slot;
RoBERTa's ``position_offset`` counts non-pad tokens, as transformers does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn.config import ModelConfig
from selfattn.errors import UserError
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
    """Embeddings, blocks and final norm (and an encoder's pooler); subclasses add a head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.pos_emb = LearnedPositions(cfg.context_length + cfg.position_offset, cfg.d_model) if cfg.position == "learned" else None
        self.emb_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_f = make_norm(cfg) if cfg.norm_position == "pre" else None  # post-norm blocks end normalised
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.pooler != "none" else None

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

    def _embed(self, input_ids: Tensor, token_type_ids: Tensor | None, offset: int) -> Tensor:
        """Token (+ token type) (+ learned position) embeddings, normalised when ``cfg.embedding_norm``: ``[B, T, D]``."""
        T = input_ids.shape[1]
        x = self.tok_emb(input_ids)  # [B, T, D]
        if self.type_emb is not None:
            # every id 0 when none are given: row 0 is added all the same (BERT does)
            x = x + (self.type_emb.weight[0] if token_type_ids is None else self.type_emb(self._check_types(token_type_ids, input_ids)))
        elif token_type_ids is not None and bool((token_type_ids != 0).any()):
            raise UserError("token_type_ids were given but this model has no token-type embeddings (type_vocab_size=0)")
        if self.pos_emb is not None and self.cfg.position_offset:
            # RoBERTa (fairseq): real tokens count from position_offset, pad tokens take position_offset - 1
            real = (input_ids != self.cfg.pad_token_id).long()
            x = x + self.pos_emb.embedding(real.cumsum(dim=1) * real + (self.cfg.position_offset - 1))
        elif self.pos_emb is not None:
            x = x + self.pos_emb(T, offset)  # [T, D] broadcast over B
        if self.emb_norm is not None:
            x = self.emb_norm(x)
        return self.drop(x)

    def _check_types(self, token_type_ids: Tensor, input_ids: Tensor) -> Tensor:
        if token_type_ids.shape != input_ids.shape or token_type_ids.is_floating_point():
            raise UserError(f"token_type_ids must be an integer tensor shaped like input_ids {tuple(input_ids.shape)}, got {token_type_ids.dtype} {tuple(token_type_ids.shape)}")
        lo, hi = int(token_type_ids.min()), int(token_type_ids.max())
        if lo < 0 or hi >= self.cfg.type_vocab_size:
            bad = hi if hi >= self.cfg.type_vocab_size else lo
            raise UserError(f"token_type_ids holds {bad}, outside the model's {self.cfg.type_vocab_size} token types (type_vocab_size)")
        return token_type_ids

    def _pool_dense(self, pooled: Tensor) -> Tensor:
        """``pooled [B, D]`` through ``pooler`` and its activation (tanh: BERT, RoBERTa; relu: DistilBERT)."""
        assert self.pooler is not None
        out = self.pooler(pooled)
        return torch.tanh(out) if self.cfg.pooler == "tanh" else F.relu(out)

    def _hidden_states(
        self,
        input_ids: Tensor,  # [B, T] int
        *,
        attention_mask: Tensor | None,
        is_causal: bool,
        kv_cache: KVCache | None,
        return_attention: bool,
        token_type_ids: Tensor | None = None,  # [B, T] int < type_vocab_size; None = all 0
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
        x = self._embed(input_ids, token_type_ids, offset)  # [B, T, D]
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
        if self.norm_f is not None:
            x = self.norm_f(x)
        return x, (tuple(attentions) if return_attention else None)


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
        if cfg.position_offset or cfg.pooler != "none":
            raise ValueError(
                f"DecoderLM takes no position_offset ({cfg.position_offset}) or pooler ({cfg.pooler!r}): they are encoder "
                "options (RoBERTa positions count non-pad tokens, which a KV cache cannot)"
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


# --------------------------------------------------------------------------- encoders


@dataclass
class EncoderOutput:
    """``last_hidden_state`` ``[B, T, D]``; ``pooler_output`` ``[B, D]`` (the pooler over position 0, as
    Hugging Face's BertModel) when the model has a pooler; ``attentions`` as in :class:`ModelOutput`."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None = None
    attentions: tuple[Tensor, ...] | None = None


class _Bidirectional(_Trunk):
    """What the two encoders share: bidirectional attention over real tokens, no generation."""

    def _encode(
        self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None, return_attention: bool
    ) -> tuple[Tensor, tuple[Tensor, ...] | None]:
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        return self._hidden_states(
            input_ids, attention_mask=mask, is_causal=False, kv_cache=None, return_attention=return_attention, token_type_ids=token_type_ids
        )

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        raise UserError(
            f"a {type(self).__name__} is a bidirectional encoder: every token sees the whole input, so it cannot "
            "generate text left to right. Fine-tune it as a classifier (SequenceClassifier.from_encoder), or use a "
            "decoder LM (DecoderLM, e.g. imported from GPT-2 or Llama) to generate"
        )


class Encoder(_Bidirectional):
    """Bidirectional encoder (BERT, RoBERTa, DistilBERT, or a trunk trained here):
    ``forward(input_ids [B, T], attention_mask [B, T] bool, token_type_ids [B, T]) -> EncoderOutput``."""

    def __init__(self, cfg: ModelConfig | dict[str, Any]) -> None:
        super().__init__(_as_config(cfg))
        self._init_weights()

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, T] bool, True = real token; None = all real
        token_type_ids: Tensor | None = None,  # [B, T] int < type_vocab_size; None = all 0
        return_attention: bool = False,
    ) -> EncoderOutput:
        h, attentions = self._encode(input_ids, attention_mask, token_type_ids, return_attention)  # [B, T, D]
        pooled = self._pool_dense(h[:, 0]) if self.pooler is not None else None
        return EncoderOutput(last_hidden_state=h, pooler_output=pooled, attentions=attentions)


class MLMHead(nn.Module):
    """BERT's masked-LM head: ``decoder(norm(gelu(dense(h))))``; ``decoder.weight`` is tied to the token
    embedding by :class:`MaskedLM` (``cfg.tie_embeddings``) and has its own bias ``[V]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.approximate = cfg.gelu_approximate
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)

    def forward(self, h: Tensor) -> Tensor:  # [..., D] -> [..., V]
        return self.decoder(self.norm(F.gelu(self.dense(h), approximate=self.approximate)))


class MaskedLM(_Bidirectional):
    """Encoder + MLM head: ``forward(input_ids, attention_mask, token_type_ids, labels) -> ModelOutput``.

    ``logits`` are ``[B, T, V]``; with ``labels`` (``[B, T]``, ``IGNORE_INDEX`` = not predicted) the head
    runs on the labelled positions only (it is the costliest layer of a small encoder: ``D x V`` per
    token) and ``logits`` holds their rows ``[N, V]`` in row-major order, ``loss`` their mean cross-entropy.
    Masking (80 % ``[MASK]``, 10 % random, 10 % kept) is :func:`selfattn.data.mlm.mask_tokens`.
    """

    def __init__(self, cfg: ModelConfig | dict[str, Any]) -> None:
        super().__init__(_as_config(cfg))
        self.mlm_head = MLMHead(self.cfg)
        self._init_weights()
        if self.cfg.tie_embeddings:
            self.mlm_head.decoder.weight = self.tok_emb.weight  # one [V, D] matrix for input and output

    @classmethod
    def from_encoder(cls, encoder: "Encoder | MaskedLM") -> "MaskedLM":
        """A masked LM on a copy of ``encoder``'s trunk (its pooler dropped); a :class:`MaskedLM`'s head is
        copied too, an :class:`Encoder` gets a new head (e.g. sentence-transformers' MiniLM, shipped
        without one), its decoder tied to the copied embedding. For continued pretraining."""
        if not isinstance(encoder, _Bidirectional):
            raise ValueError(f"MaskedLM.from_encoder takes an Encoder or a MaskedLM, got {type(encoder).__name__}")
        mlm = cls(encoder.cfg.model_copy(update={"pooler": "none", "n_classes": None}))
        w = encoder.tok_emb.weight
        mlm.to(device=w.device, dtype=w.dtype)
        source = merged_state_dict(encoder)
        mlm.load_state_dict({k: v for k, v in source.items() if k in mlm.state_dict()}, strict=False)
        return mlm

    def forward(
        self,
        input_ids: Tensor,  # [B, T]
        attention_mask: Tensor | None = None,  # [B, T] bool, True = real token
        token_type_ids: Tensor | None = None,
        labels: Tensor | None = None,  # [B, T] original ids at masked positions, IGNORE_INDEX elsewhere
        return_attention: bool = False,
    ) -> ModelOutput:
        h, attentions = self._encode(input_ids, attention_mask, token_type_ids, return_attention)  # [B, T, D]
        if labels is None:
            return ModelOutput(logits=self.mlm_head(h), attentions=attentions)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}")
        picked = labels != IGNORE_INDEX  # [B, T]
        logits = self.mlm_head(h[picked])  # [N, V]
        loss = F.cross_entropy(logits.float(), labels[picked]) if logits.shape[0] else logits.sum() * 0.0
        return ModelOutput(logits=logits, loss=loss, attentions=attentions)


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
        token_type_ids: Tensor | None = None,  # [B, T] int < type_vocab_size; None = all 0
    ) -> ModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        mask = attention_mask.to(torch.bool)
        h, attentions = self._hidden_states(
            input_ids, attention_mask=mask, is_causal=self.cfg.causal, kv_cache=None, return_attention=return_attention,
            token_type_ids=token_type_ids,
        )  # fmt: skip
        pooled = pool(h, mask, self.cfg.pooling)  # [B, D]
        if self.pooler is not None:
            pooled = self._pool_dense(pooled)
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


    @classmethod
    def from_encoder(
        cls,
        encoder: "Encoder | MaskedLM",
        n_classes: int,
        pooling: str | None = None,
        dropout: float | None = None,
        pooler: bool | str | None = None,
    ) -> "SequenceClassifier":
        """A classifier whose trunk is a copy of ``encoder``'s (an :class:`Encoder` or a :class:`MaskedLM`,
        LoRA folded in); ``head`` is new, attention stays bidirectional.

        ``pooling`` defaults to the encoder's ``cfg.pooling``. ``pooler``: None keeps the encoder's
        pooler for ``pooling="first"`` (BERT's sequence classifier uses it on [CLS]) and drops it
        otherwise (a mean-pooled MiniLM embedding is used without it); True / False keep / drop it;
        ``"tanh"`` / ``"relu"`` start a new one (as transformers' RoBERTa and DistilBERT classifiers do).
        """
        if not isinstance(encoder, _Bidirectional):
            raise ValueError(f"from_encoder takes an Encoder or a MaskedLM, got {type(encoder).__name__} (a DecoderLM: use from_decoder)")
        pooling = pooling or encoder.cfg.pooling
        if pooler is None:
            pooler = pooling == "first" and encoder.pooler is not None
        if pooler is True and encoder.pooler is None:
            raise ValueError("pooler=True but the encoder has no pooler; pass pooler='tanh' or 'relu' for a new one")
        kind = encoder.cfg.pooler if pooler is True else "none" if pooler is False else pooler
        updates: dict[str, Any] = {"n_classes": n_classes, "pooling": pooling, "causal": False, "pooler": kind}
        if dropout is not None:
            updates["dropout"] = dropout
        clf = cls(ModelConfig.model_validate({**encoder.cfg.model_dump(), **updates}))
        w = encoder.tok_emb.weight
        clf.to(device=w.device, dtype=w.dtype)
        source = merged_state_dict(encoder)
        fresh = ("head.",) if pooler is True else ("head.", "pooler.")
        clf.load_state_dict({k: source[k] for k in clf.state_dict() if not k.startswith(fresh)}, strict=False)
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


# what a checkpoint's "task" names: save_pretrained writes it, load_pretrained builds the class
TASKS: dict[str, type[nn.Module]] = {"lm": DecoderLM, "classifier": SequenceClassifier, "encoder": Encoder, "mlm": MaskedLM}


def task_of(model: nn.Module) -> str:
    """``"lm"``, ``"classifier"``, ``"encoder"`` or ``"mlm"``; a ValueError for anything else."""
    for task, cls in TASKS.items():
        if type(model) is cls:
            return task
    raise ValueError(f"expected one of {', '.join(c.__name__ for c in TASKS.values())}, got {type(model).__name__}")


def tied_aliases(model: nn.Module) -> list[str]:
    """State-dict keys that are the same tensor as ``tok_emb.weight`` (recreated by the constructor)."""
    if isinstance(model, DecoderLM) and model.cfg.tie_embeddings:
        return ["lm_head.weight"]
    if isinstance(model, MaskedLM) and model.cfg.tie_embeddings:
        return ["mlm_head.decoder.weight"]
    return []


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
