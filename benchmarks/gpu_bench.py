"""One prepared CUDA run (an H200): attention TFLOP/s, GPT-2-124M pretraining MFU, the fine-tune stage.

    python benchmarks/gpu_bench.py --output gpu.json      # on the GPU machine (benchmarks/gpu.sh wraps it)
    python benchmarks/gpu_bench.py --dry-run              # on CPU: checks imports/arguments, prints the plan

Sections (each timed, each failure recorded in the JSON instead of aborting the run):

1. ``tests``: ``pytest -m cuda`` (the CUDA-marked parity tests).
2. ``attention``: causal fwd+bwd, bf16, B*T = 16k tokens, H=16, D=64 at T = 1k..16k: torch
   SDPA with each backend it offers (flash / efficient / cudnn), our ``scaled_dot_product_attention``
   (the backend torch picks) and ``flex_masked_attention`` (compiled), TFLOP/s and the fraction of
   the H200's 989 TFLOP/s dense-bf16 peak (FLOPs: ``causal_flops``).
3. ``pretrain``: a GPT-2-124M-shaped DecoderLM (12 x 768, 12 heads, context 1024, vocab 50304),
   bf16 autocast + torch.compile, AdamW, random tokens; tokens/s and MFU = 6 * N * tokens/s
   (+ attention 12 * L * T * d per token) / peak.
4. ``finetune``: ``benchmarks/finetune_sst2.py --device cuda --stages finetune`` on a small scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

PEAK_BF16_TFLOPS = 989.0  # H200 SXM, dense bf16 (spec sheet)
ROOT = Path(__file__).resolve().parents[1]


def causal_flops(b: int, h: int, t: int, d: int) -> float:
    """fwd+bwd FLOPs of causal attention: fwd 2 matmuls x 2*T*T*D, halved by causality; bwd = 2.5 x fwd."""
    fwd = 2 * 2 * b * h * t * t * d / 2
    return 3.5 * fwd


def _timed_cuda(fn, warmup: int = 3, repeats: int = 10) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench_attention(lengths: list[int]) -> list[dict]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from selfattn.functional import flex_masked_attention, scaled_dot_product_attention

    rows = []
    h, d, tokens = 16, 64, 16384
    for t in lengths:
        b = max(1, tokens // t)
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        flops = causal_flops(b, h, t, d)
        impls = {
            "sdpa_flash": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), SDPBackend.FLASH_ATTENTION),
            "sdpa_efficient": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), SDPBackend.EFFICIENT_ATTENTION),
            "sdpa_cudnn": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), SDPBackend.CUDNN_ATTENTION),
            "selfattn": (lambda: scaled_dot_product_attention(q, k, v, is_causal=True), None),
            "selfattn_flex": (lambda: flex_masked_attention(q, k, v, causal=True), None),
        }
        for name, (fn, backend) in impls.items():
            row = {"T": t, "B": b, "H": h, "D": d, "impl": name}
            try:
                def step(fn=fn):
                    fn().backward(grad)
                    q.grad = k.grad = v.grad = None

                if backend is not None:
                    with sdpa_kernel(backend):
                        sec = _timed_cuda(step)
                else:
                    sec = _timed_cuda(step)
                row.update(ms=sec * 1e3, tflops=flops / sec / 1e12, peak_fraction=flops / sec / 1e12 / PEAK_BF16_TFLOPS)
            except Exception as exc:  # a backend torch does not offer for this shape: record it
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def bench_pretrain(steps: int, batch: int) -> dict:
    import torch

    from selfattn.config import ModelConfig
    from selfattn.models import build_decoder_lm
    from selfattn.utils import autocast_context

    cfg = ModelConfig(vocab_size=50304, context_length=1024, n_layers=12, d_model=768, n_heads=12,
                      position="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
    torch.manual_seed(0)
    model = build_decoder_lm(cfg).cuda()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    compiled = torch.compile(model)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length), device="cuda")
    y = torch.roll(x, -1, dims=1)

    def step() -> float:
        with autocast_context(torch.device("cuda"), torch.bfloat16):
            loss = compiled(x, targets=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    t0 = time.perf_counter()
    step()  # compile
    compile_s = time.perf_counter() - t0
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / steps
    tokens_per_s = batch * cfg.context_length / sec
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.context_length * cfg.d_model  # PaLM-style
    mfu = flops_per_token * tokens_per_s / (PEAK_BF16_TFLOPS * 1e12)
    return dict(params=n_params, batch=batch, context=cfg.context_length, steps=steps, compile_s=compile_s,
                step_ms=sec * 1e3, tokens_per_s=tokens_per_s, mfu=mfu, loss=loss)


def run_tests() -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    return dict(returncode=proc.returncode, seconds=time.perf_counter() - t0, tail=proc.stdout[-1500:])


def run_finetune(scale: float) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "benchmarks/finetune_sst2.py", "--device", "cuda", "--stages", "finetune",
           "--scale", str(scale), "--budget-minutes", "1.5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = {"tail": proc.stdout[-1500:] + proc.stderr[-1500:]}
    return dict(returncode=proc.returncode, seconds=time.perf_counter() - t0, command=" ".join(cmd), result=result)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="check imports and arguments on CPU, print the plan")
    ap.add_argument("--output", default="gpu_bench.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--pretrain-steps", type=int, default=20)
    ap.add_argument("--pretrain-batch", type=int, default=16)
    ap.add_argument("--finetune-scale", type=float, default=0.05)
    ap.add_argument("--sections", default="tests,attention,pretrain,finetune")
    args = ap.parse_args()
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - {"tests", "attention", "pretrain", "finetune"}
    if unknown:
        print(f"unknown sections {sorted(unknown)}; choose from tests,attention,pretrain,finetune", file=sys.stderr)
        return 2

    import torch
    import torch.nn.attention.flex_attention  # noqa: F401  (the flex path must import)

    import selfattn.functional  # noqa: F401
    import selfattn.models  # noqa: F401
    from selfattn.utils import autocast_context  # noqa: F401

    for script in ("benchmarks/finetune_sst2.py",):
        if not (ROOT / script).is_file():
            print(f"missing {script}", file=sys.stderr)
            return 2
    cuda = torch.cuda.is_available()
    plan = {
        "tests": "pytest -m cuda tests/",
        "attention": f"causal fwd+bwd bf16 T={args.lengths}: sdpa flash/efficient/cudnn, selfattn, flex (compiled)",
        "pretrain": f"GPT-2-124M shape, bf16 autocast + torch.compile, batch {args.pretrain_batch} x 1024, "
                    f"{args.pretrain_steps} timed steps",
        "finetune": f"benchmarks/finetune_sst2.py --device cuda --stages finetune --scale {args.finetune_scale}",
    }
    print(f"torch {torch.__version__}; CUDA available: {cuda}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    for name in sections:
        print(f"would run [{name}]: {plan[name]}")
    if args.dry_run:
        print(f"dry run: imports and arguments OK; would write {args.output}")
        return 0
    if not cuda:
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2

    result: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_bf16_tflops": PEAK_BF16_TFLOPS}
    runners = {
        "tests": run_tests,
        "attention": lambda: bench_attention(args.lengths),
        "pretrain": lambda: bench_pretrain(args.pretrain_steps, args.pretrain_batch),
        "finetune": lambda: run_finetune(args.finetune_scale),
    }
    for name in sections:
        t0 = time.perf_counter()
        try:
            result[name] = runners[name]()
        except Exception as exc:  # keep going: one JSON with what worked and why the rest did not
            result[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"[{name}] {time.perf_counter() - t0:.0f} s", flush=True)
        Path(args.output).write_text(json.dumps(result, indent=1))  # after each section, in case of a timeout
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
