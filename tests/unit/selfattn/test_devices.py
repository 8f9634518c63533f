"""The library on every device it runs on: each test runs on the CPU (default suite) and on CUDA
(``-m cuda``, run by ``benchmarks/gpu.sh``; skipped without a GPU), against float64 references
computed on the CPU, so the same assertions hold for the fused GPU kernels (flash / efficient /
cuDNN SDPA, bf16 autocast, ``torch.compile``) as for the CPU ones.

Tolerances are relative norm errors ``||out - ref|| / ||ref||``: float32 far under 1e-3 (TF32
matmuls on a GPU land near 3e-4), bf16 / fp16 operands between 1e-3 and 1e-2.
"""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch

from selfattn.config import ModelConfig
from selfattn.nn.functional import naive_attention, scaled_dot_product_attention, sliding_window_mask
from selfattn.nn.window import sliding_window_attention
from selfattn.nn.models import DecoderLM

_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, _NEEDS_CUDA])]
CUDA_ONLY = [pytest.param("cuda", marks=[pytest.mark.cuda, _NEEDS_CUDA])]
# relative norm error allowed per dtype (see the module docstring)
REL_TOL = {torch.float32: 1e-3, torch.bfloat16: 1.5e-2, torch.float16: 3e-3}
CPU_FP32_TOL = 1e-5  # float32 without TF32 (CPU matmuls): a computation in bf16 / fp16 shows at 1e-4 to 1e-3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(out).all(), "non-finite values in the output"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _dtypes(device: str) -> list[torch.dtype]:
    # CPU: float32 and bf16 (fp16 SDPA on CPU is slow and not what CPUs run); CUDA: all three
    return [torch.float32, torch.bfloat16] + ([torch.float16] if device == "cuda" else [])


def _qkv(device, dtype, b=2, h=4, h_kv=2, lq=48, lk=64, e=32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g)
    k, v = (torch.randn(b, h_kv, lk, e, generator=g) for _ in range(2))
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (q, k, v)]


def _dense_reference(q, k, v, mask):
    """float64 on the CPU, grouped heads repeated, rows that see nothing -> zeros (the library's rule)."""
    q, k, v = (t.detach().double().cpu().requires_grad_(True) for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = mask.cpu()
    alive = mask.any(-1, keepdim=True)
    out = naive_attention(q, kk, vv, attn_mask=mask | ~alive) * alive
    return out, (q, k, v)


def _check_against_float64(out, leaves, mask, what):
    """``out`` and its gradients w.r.t. ``leaves`` (q, k, v) against the float64 CPU reference."""
    dtype, device = out.dtype, out.device
    ref, ref_leaves = _dense_reference(*leaves, mask)
    assert rel_err(out, ref) < REL_TOL[dtype], (what, dtype)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = torch.autograd.grad(out, leaves, grad.to(device=device, dtype=dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for which, a, b in zip("qkv", got, want):
        assert rel_err(a, b) < 2 * REL_TOL[dtype], (what, dtype, which)


def _masks(b, lq, lk, device):
    """(name, attn_mask for the library, the same as a bool [B, 1, Lq, Lk] for the reference, is_causal)."""
    pad = torch.ones(b, 1, 1, lk, dtype=torch.bool)
    pad[1, ..., : lk - lq + 5] = False  # row 1: left padding; its first 5 queries see nothing under causal
    causal = sliding_window_mask(lq, lk, lk + lq)  # bottom-right causal, [Lq, Lk]
    additive = torch.zeros(b, 1, lq, lk).masked_fill(~pad, float("-inf"))
    full = torch.ones(b, 1, lq, lk, dtype=torch.bool)
    return [
        ("none", None, full, False),
        ("causal", None, full & causal, True),
        ("bool_padding+causal", pad.to(device), pad & causal, True),
        ("additive_padding", additive.to(device), pad.expand(b, 1, lq, lk), False),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_forward_and_backward_match_float64(device):
    for dtype in _dtypes(device):
        q, k, v = _qkv(device, dtype, grad=True)
        for name, mask, ref_mask, causal in _masks(q.shape[0], q.shape[-2], k.shape[-2], device):
            if mask is not None and mask.is_floating_point():
                mask = mask.to(dtype)
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            assert out.device.type == device and out.dtype == dtype
            _check_against_float64(out, (q, k, v), ref_mask, name)
            if name == "bool_padding+causal":  # row 1's first queries see nothing: zeros, no NaN
                assert torch.count_nonzero(out[1, :, :5].float()) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_sliding_window_matches_masked_dense_with_padding_and_a_cached_prefix(device):
    window, lq, lk = 16, 96, 112  # 16 cached keys before the queries
    for dtype in _dtypes(device):
        q, k, v = _qkv(device, dtype, lq=lq, lk=lk, seed=2, grad=True)
        key_mask = torch.ones(2, 1, 1, lk, dtype=torch.bool)
        key_mask[0, ..., :40] = False
        band = sliding_window_mask(lq, lk, window)
        for path, block in (("auto", None), ("blocks", 16)):
            out = sliding_window_attention(q, k, v, window, key_mask=key_mask.to(device), block_size=block)
            _check_against_float64(out, (q, k, v), band & key_mask, path)


def _lm(device: str, **overrides) -> DecoderLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, context_length=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2)
    return DecoderLM(ModelConfig(**{**cfg, **overrides})).to(device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ["full", "sliding_window"])
def test_decoder_lm_fp32_and_bf16_autocast_match_the_float64_model(device, attention):
    from selfattn.utils import autocast_context

    extra = {"attention": attention, "window": 8} if attention == "sliding_window" else {}
    lm = _lm(device, **extra)
    ref_lm = _lm("cpu", **extra).double()
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = ref_lm(ids).logits
        fp32 = lm(ids.to(device)).logits
        with autocast_context(torch.device(device), torch.bfloat16):
            bf16 = lm(ids.to(device)).logits
    assert rel_err(fp32, ref) < REL_TOL[torch.float32]
    assert rel_err(bf16, ref) < 3 * REL_TOL[torch.bfloat16]  # every matmul of two layers in bf16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ["full", "sliding_window"])
def test_kv_cache_decoding_matches_the_full_forward(device, attention):
    extra = {"attention": attention, "window": 8} if attention == "sliding_window" else {}
    lm = _lm(device, **extra)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.no_grad():
        full = lm(ids).logits  # [B, T, V]
        cache = lm.new_kv_cache(2)  # rolling for the windowed model
        steps = [lm(ids[:, :10], kv_cache=cache).logits]
        steps += [lm(ids[:, t : t + 1], kv_cache=cache).logits for t in range(10, 30)]
    assert rel_err(torch.cat(steps, dim=1), full) < REL_TOL[torch.float32]
    out = lm.generate(ids[:, :5], max_new_tokens=12, temperature=0)
    assert out.shape == (2, 17) and out.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_windowed_lm_training_step_matches_float64(device, monkeypatch):
    """Training mode, no dropout: the window layers run FlexAttention (compiled) on CUDA, the
    blocks on the CPU (``window_kernel="auto"``); loss and gradients against the float64 CPU model."""
    import selfattn.nn.attention as attention

    calls = []
    real_flex = attention.flex_masked_attention
    monkeypatch.setattr(attention, "flex_masked_attention", lambda *a, **kw: calls.append(1) or real_flex(*a, **kw))
    lm = _lm(device, attention="sliding_window", window=8).train()
    ref_lm = _lm("cpu", attention="sliding_window", window=8).double().train()
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(7))
    loss = lm(ids.to(device), targets=ids.to(device)).loss
    grads = torch.autograd.grad(loss, list(lm.parameters()))
    ref_loss = ref_lm(ids, targets=ids).loss
    ref_grads = torch.autograd.grad(ref_loss, list(ref_lm.parameters()))
    assert len(calls) == (2 if device == "cuda" else 0)  # one per layer on CUDA
    assert rel_err(loss, ref_loss) < REL_TOL[torch.float32]
    for (name, _), a, b in zip(lm.named_parameters(), grads, ref_grads):
        assert rel_err(a, b) < 5 * REL_TOL[torch.float32], name


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("attention", ["full", "sliding_window"])
def test_compiled_model_matches_eager_forward_and_backward(device, attention):
    extra = {"attention": attention, "window": 8} if attention == "sliding_window" else {}
    lm = _lm(device, **extra).train()  # the window: FlexAttention traced inside the compiled model
    compiled = torch.compile(lm)
    ids = torch.randint(0, 97, (2, 48), generator=torch.Generator().manual_seed(6)).to(device)
    eager = lm(ids, targets=ids).loss
    grads_eager = torch.autograd.grad(eager, list(lm.parameters()))
    fast = compiled(ids, targets=ids).loss
    grads_fast = torch.autograd.grad(fast, list(lm.parameters()))
    assert rel_err(fast, eager) < REL_TOL[torch.float32]
    for a, b in zip(grads_fast, grads_eager):
        assert rel_err(a, b) < 5 * REL_TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
def test_pretrain_on_the_device_and_the_checkpoint_loads_on_cpu(device, tmp_path, monkeypatch):
    """The engine on the device (bf16 autocast and fused AdamW on CUDA): the loss falls, and the
    best checkpoint it writes there loads on a CPU-only machine and scores the same."""
    from selfattn.io.checkpoint import load_pretrained
    from selfattn.train import PretrainConfig, pretrain

    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    rng = random.Random(0)
    words = "the a film was good bad very plot and fun dull".split()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)))
    cfg = PretrainConfig.model_validate({
        "data": {"path": str(corpus), "block_size": 32},
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": 30, "batch_size": 8, "eval_every": 15, "eval_batches": 2, "log_every": 5,
                  "checkpoint_every": 15, "progress": False, "device": device},
    })
    # the engine turns TF32 on for CUDA matmuls: restore the flags so later tests see the defaults
    # (plain save/restore: monkeypatch cannot undo torch's cuBLAS flag, a module property)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        result = pretrain(cfg, tmp_path / "run")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    losses = [row["train_loss"] for row in result.history if "train_loss" in row]  # one per 5 steps
    assert len(losses) == 6 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    pre = load_pretrained(result.best_dir)  # loads onto the CPU whatever device wrote it
    on_device = load_pretrained(result.best_dir, map_location=device)
    assert next(pre.model.parameters()).device.type == "cpu"
    assert next(on_device.model.parameters()).device.type == device
    ids = torch.tensor([pre.tokenizer.encode("the film was good and fun")])
    with torch.no_grad():
        ref_logits = copy.deepcopy(pre.model).double().eval()(ids).logits  # float64 on the CPU
        cpu_logits = pre.model.eval()(ids).logits
        device_logits = on_device.model.eval()(ids.to(device)).logits
    # each against the float64 model (on a CPU run the two float32 ones are the same computation);
    # float32 on the CPU has no TF32: its error is rounding alone, near 1e-7
    assert rel_err(cpu_logits, ref_logits) < CPU_FP32_TOL
    assert rel_err(device_logits, ref_logits) < (CPU_FP32_TOL if device == "cpu" else REL_TOL[torch.float32])
