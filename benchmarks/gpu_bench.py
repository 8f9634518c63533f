"""One prepared CUDA run (an H200): CUDA tests, attention TFLOP/s, GPT-2-124M pretraining MFU, the fine-tune.

    bash benchmarks/gpu.sh                                  # on the GPU machine (wraps this script)
    python benchmarks/gpu_bench.py --dry-run                # anywhere: preflight + the plan, in seconds
    python benchmarks/gpu_bench.py --rehearse --output r.json   # on CPU: every section at toy sizes (~1 min)

Sections, each in its own process under its own time budget (a hang or a crash in one leaves the
others and the JSON intact; the JSON is rewritten after every section, rows as they come):

1. ``tests``: the CUDA-marked tests (:data:`CUDA_TEST_FILES`: parity of the fused GPU kernels, bf16
   autocast, ``torch.compile``, the engine and its checkpoints against float64 CPU references).
2. ``attention``: causal fwd+bwd, bf16, ``--tokens`` (B*T) per call, H=16, D=128 (FlashAttention's
   benchmark shape) at T = 1k..16k: torch SDPA with each backend (flash / efficient / cuDNN), our
   ``scaled_dot_product_attention`` (the backend torch picks), our ``sliding_window_attention``
   (w = ``--window``) and compiled FlexAttention (causal and window). TFLOP/s of the useful work
   (:func:`causal_flops`, :func:`window_flops`), the fraction of the H200's 989 TFLOP/s dense bf16
   peak, the window's speed-up over SDPA causal, and peak memory. FlexAttention rows come last (each
   shape compiles) and stop when the section's budget runs short.
3. ``pretrain``: a GPT-2-124M-shaped DecoderLM (12 x 768, 12 heads, context 1024, vocab 50304),
   bf16 autocast, fused AdamW, random tokens; eager, then ``torch.compile``: tokens/s and MFU =
   (6 N + 12 L T d) tokens/s / peak (PaLM's count; N includes the tied embedding).
4. ``finetune``: ``benchmarks/finetune_sst2.py --device cuda --stages pretrain,finetune`` at a
   small scale: the engine's pretraining and fine-tuning on CUDA (bf16 autocast, fused AdamW) on SST-2.

The device machine has no registry: what its image lacks travels as wheels, prepared here by
``benchmarks/gpu_prepare.sh`` (see BENCHMARKS.md, "GPU run"). The preflight names
anything still missing, and a section whose needs are missing is recorded as skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PEAK_BF16_TFLOPS = 989.0  # H200 SXM, dense bf16 (spec sheet)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks/ is importable from the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks.attention import causal_flops  # noqa: E402  (the one FLOP count of causal attention)

SECTIONS = ("tests", "attention", "pretrain", "finetune")
# seconds each section may take on the GPU (the whole call stays under gpu.sh's 470 s limit)
BUDGET = {"tests": 100, "attention": 130, "pretrain": 110, "finetune": 100}
# the test files that hold CUDA-marked tests (a default-suite test keeps this list complete)
CUDA_TEST_FILES = ("tests/unit/selfattn/test_devices.py", "tests/unit/selfattn/nn/test_functional_flex.py")
# what each section imports, by distribution name (the device image lacks pydantic and datasets)
NEEDS = {
    "tests": ("pytest", "pydantic", "yaml", "tokenizers", "safetensors", "datasets", "pandas"),
    "attention": (),
    "pretrain": ("pydantic", "yaml"),
    "finetune": ("pydantic", "yaml", "tokenizers", "safetensors", "datasets", "pandas", "sklearn", "matplotlib"),
}
PREPARE_HINT = ("on a machine with PyPI, run `bash benchmarks/gpu_prepare.sh` and carry .whl and the data "
                "(BENCHMARKS.md, 'GPU run')")


# --------------------------------------------------------------------------- FLOP counts


def window_flops(b: int, h: int, t: int, d: int, window: int) -> float:
    """fwd+bwd FLOPs of causal sliding-window attention: query i sees min(i + 1, w) keys."""
    w = min(window, t)
    pairs = w * t - w * (w - 1) / 2
    return 3.5 * 2 * 2 * b * h * pairs * d


# --------------------------------------------------------------------------- sections


class Rows:
    """Rows of a section, written to ``path`` after each one (a killed section keeps what it did)."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.rows, self.deadline = path, [], time.monotonic() + budget_s

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.path.write_text(json.dumps({"rows": self.rows}, indent=1))

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


def _timed(fn: Callable[[], Any], device: str, warmup: int = 3, repeats: int = 10) -> float:
    """Seconds per call of ``fn`` (device-synchronized, after ``warmup`` calls)."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def bench_attention(args: argparse.Namespace, rows: Rows) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend

    from selfattn.nn.functional import scaled_dot_product_attention
    from selfattn.nn.window import flex_masked_attention, sliding_window_attention

    device, dtype = args.device, torch.bfloat16
    h, d, w = args.heads, args.head_dim, args.window
    repeats = 10 if device == "cuda" else 2
    flex_jobs = []
    for t in args.lengths:
        b = max(1, args.tokens // t)
        q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        impls = [
            ("sdpa_flash", sdpa, SDPBackend.FLASH_ATTENTION, None),
            ("sdpa_efficient", sdpa, SDPBackend.EFFICIENT_ATTENTION, None),
            ("sdpa_cudnn", sdpa, SDPBackend.CUDNN_ATTENTION, None),
            ("selfattn", lambda: scaled_dot_product_attention(q, k, v, is_causal=True), None, None),
            ("selfattn_window", lambda: sliding_window_attention(q, k, v, w), None, w),
        ]
        dense_ms = None
        for name, fn, backend, window in impls:
            row = _attention_row(name, fn, backend, window, (q, k, v), grad, (b, h, t, d), device, repeats)
            if name == "selfattn" and "ms" in row:
                dense_ms = row["ms"]
            if window is not None and dense_ms and "ms" in row:
                row["speedup_vs_causal"] = round(dense_ms / row["ms"], 3)
            rows.add(row)
        flex_jobs.append((t, b, dense_ms))
        q = k = v = grad = None  # free them before the next size (the lambdas above read these names)
    # FlexAttention last: every shape compiles (seconds each); stop when the budget runs short.
    # Up to 10 shapes x masks: above dynamo's default limit of 8 recompiles it would silently fall
    # back to the unfused kernel (every score materialised), so the limit is raised here
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    for t, b, dense_ms in flex_jobs:
        for name, window in (("flex_causal", None), ("flex_window", w)):
            if rows.left_s() < args.flex_reserve_s:
                rows.add({"T": t, "impl": name, "skipped": f"budget: {rows.left_s():.0f} s left"})
                continue
            q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
            fn = lambda q=q, k=k, v=v, window=window: flex_masked_attention(  # noqa: E731
                q, k, v, causal=True, window=window, compile=device == "cuda")
            row = _attention_row(name, fn, None, window, (q, k, v), torch.randn_like(q), (b, h, t, d), device, repeats)
            if window is not None and dense_ms and "ms" in row:
                row["speedup_vs_causal"] = round(dense_ms / row["ms"], 3)
            rows.add(row)
            q = k = v = None
    return {"rows": rows.rows}


def _attention_row(name, fn, backend, window, leaves, grad, shape, device, repeats) -> dict:
    import contextlib

    import torch
    from torch.nn.attention import sdpa_kernel

    b, h, t, d = shape
    row: dict[str, Any] = {"T": t, "B": b, "H": h, "D": d, "impl": name, **({"window": window} if window else {})}
    flops = causal_flops(b, h, t, d) if window is None else window_flops(b, h, t, d, window)

    def step() -> None:
        fn().backward(grad)
        for leaf in leaves:
            leaf.grad = None

    try:
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step()  # first call: compiles where it compiles
            row["first_call_s"] = round(time.perf_counter() - t0, 2)
            sec = _timed(step, device, warmup=2, repeats=repeats)
        row.update(ms=round(sec * 1e3, 4), tflops=round(flops / sec / 1e12, 2),
                   peak_fraction=round(flops / sec / 1e12 / PEAK_BF16_TFLOPS, 4))
        if device == "cuda":
            row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    except Exception as exc:  # a backend torch does not offer for this shape or device: record it
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    return row


def bench_pretrain(args: argparse.Namespace, rows: Rows) -> dict:
    import torch

    from selfattn.config import ModelConfig
    from selfattn.nn.models import build_decoder_lm
    from selfattn.utils import autocast_context

    device = torch.device(args.device)
    if args.rehearse:  # the same code path at a toy size
        shape = dict(vocab_size=512, context_length=128, n_layers=2, d_model=64, n_heads=4)
    else:
        shape = dict(vocab_size=50304, context_length=1024, n_layers=12, d_model=768, n_heads=12)
    cfg = ModelConfig(**shape, position="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    model = build_decoder_lm(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    x = torch.randint(0, cfg.vocab_size, (args.pretrain_batch, cfg.context_length), device=device)
    y = torch.roll(x, -1, dims=1)
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.context_length * cfg.d_model  # PaLM-style
    tokens = args.pretrain_batch * cfg.context_length
    result: dict[str, Any] = {"params": n_params, "batch": args.pretrain_batch, "context": cfg.context_length}

    def make_step(m):
        def step() -> float:
            with autocast_context(device, torch.bfloat16):
                loss = m(x, targets=y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    modes = [("eager", model)] + ([("compiled", torch.compile(model))] if args.compile else [])
    for mode, m in modes:
        step = make_step(m)
        t0 = time.perf_counter()
        step()  # warm-up (compiles the compiled one)
        first_s = time.perf_counter() - t0
        sec = _timed(step, device.type, warmup=2, repeats=args.pretrain_steps)
        tokens_per_s = tokens / sec
        row = dict(mode=mode, first_step_s=round(first_s, 2), step_ms=round(sec * 1e3, 2), tokens_per_s=round(tokens_per_s),
                   mfu=round(flops_per_token * tokens_per_s / (PEAK_BF16_TFLOPS * 1e12), 4), loss=round(step(), 4))
        if device.type == "cuda":
            row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rows.add(row)
        result[mode] = row
    return result


def run_tests(args: argparse.Namespace, rows: Rows) -> dict:
    # on the GPU the CUDA cases only (CI ran the CPU ones); the rehearsal runs the CPU cases of the same files
    marker = "cuda or not (integration or slow)" if args.rehearse else "cuda"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, *CUDA_TEST_FILES]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, rows.left_s() - 5))
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    out = dict(returncode=proc.returncode, seconds=round(time.perf_counter() - t0, 1), summary=summary,
               command=" ".join(cmd[1:]), tail=(proc.stdout + proc.stderr)[-3000:])
    if proc.returncode != 0:
        out["error"] = f"pytest exit {proc.returncode}: {summary}"
    return out


def run_finetune(args: argparse.Namespace, rows: Rows) -> dict:
    budget_min = max(0.2, (rows.left_s() - 30) / 60)  # leave room for dev evaluation and start-up
    cmd = [sys.executable, "benchmarks/finetune_sst2.py", "--device", args.device, "--stages", "pretrain,finetune",
           "--scale", str(args.finetune_scale), "--budget-minutes", f"{budget_min:.2f}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, rows.left_s() - 3))
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = {"tail": proc.stdout[-1500:] + proc.stderr[-1500:]}
    out = dict(returncode=proc.returncode, seconds=round(time.perf_counter() - t0, 1), command=" ".join(cmd[1:]), result=result)
    if proc.returncode != 0:
        out["error"] = f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}"[:500]
    return out


RUNNERS = {"tests": run_tests, "attention": bench_attention, "pretrain": bench_pretrain, "finetune": run_finetune}


# --------------------------------------------------------------------------- report


def report(result: dict[str, Any], plot_path: Path | None = None) -> str:
    """Markdown tables of a ``gpu_bench.json`` (for BENCHMARKS.md) and, with ``plot_path``, a plot
    of attention TFLOP/s against T per implementation."""
    lines = [f"Device: {result.get('device')}, torch {result.get('torch')}, Python {result.get('python')}"
             + (" (CPU rehearsal: toy sizes, not figures)" if result.get("rehearsal") else "")]
    tests = result.get("tests", {})
    if tests:
        lines += ["", f"CUDA tests: {tests.get('summary') or tests.get('skipped') or tests.get('error')}"]
    rows = result.get("attention", {}).get("rows", [])
    if rows:
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        lengths = sorted({r["T"] for r in rows})
        lines += ["", "Attention fwd+bwd, bf16: TFLOP/s (fraction of peak) [speed-up over SDPA causal]", "",
                  "| impl | " + " | ".join(f"T={t}" for t in lengths) + " |", "| --- |" + " --- |" * len(lengths)]
        for impl in impls:
            cells = []
            for t in lengths:
                r = next((r for r in rows if r["impl"] == impl and r["T"] == t), {})
                if "tflops" in r:
                    cell = f"{r['tflops']:.1f} ({r['peak_fraction']:.0%})"
                    cell += f" [{r['speedup_vs_causal']:.2f}x]" if "speedup_vs_causal" in r else ""
                else:
                    cell = "skipped" if "skipped" in r else ("error" if "error" in r else "")
                cells.append(cell)
            lines.append(f"| {impl} | " + " | ".join(cells) + " |")
    pre = result.get("pretrain", {})
    modes = [m for m in ("eager", "compiled") if m in pre]
    if modes:
        lines += ["", f"Pretraining, {pre.get('params', 0) / 1e6:.1f} M parameters, batch {pre.get('batch')} x {pre.get('context')}:", "",
                  "| mode | tokens/s | MFU | step ms | first step s | peak MiB |", "| --- | --- | --- | --- | --- | --- |"]
        for m in modes:
            r = pre[m]
            lines.append(f"| {m} | {r['tokens_per_s']:,} | {r['mfu']:.1%} | {r['step_ms']} | {r['first_step_s']} | {r.get('peak_mib', '')} |")
    ft = result.get("finetune", {}).get("result", {})
    if "finetune" in ft:
        a, b = ft.get("pretrain", {}), ft["finetune"]
        lines += ["", f"Fine-tune on {ft.get('device')}: pretrain {a.get('steps')} steps at {a.get('tokens_per_s')} tokens/s; "
                  f"fine-tune {b.get('steps')} steps at {b.get('tokens_per_s')} tokens/s, dev accuracy {b.get('dev_accuracy')}"]
    for name in SECTIONS:
        section = result.get(name, {})
        if "error" in section or "skipped" in section:
            lines.append(f"\n[{name}] {section.get('error') or section.get('skipped')}")
    if plot_path is not None and rows:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for impl in dict.fromkeys(r["impl"] for r in rows):
            pts = sorted((r["T"], r["tflops"]) for r in rows if r["impl"] == impl and "tflops" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("TFLOP/s (useful work)")
        ax.set_title(f"attention fwd+bwd, bf16, {result.get('device')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot_path, dpi=120)
        plt.close(fig)
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def missing_modules(section: str) -> list[str]:
    return [m for m in NEEDS[section] if importlib.util.find_spec(m) is None]


def data_dir() -> Path:
    return Path(os.environ.get("SELFATTN_DATA_DIR", ROOT.parent / "shared" / "data"))


def preflight(sections: list[str]) -> dict[str, str]:
    """Why a section cannot run here (missing packages or data); empty when all can."""
    problems = {}
    for name in sections:
        missing = missing_modules(name)
        if missing:
            problems[name] = f"missing Python packages {missing}: {PREPARE_HINT}"
        elif name == "finetune" and not (data_dir() / "sst2" / "train.tsv").is_file():
            problems[name] = f"SST-2 not found under {data_dir()} (set SELFATTN_DATA_DIR): {PREPARE_HINT}"
    return problems


def run_section(name: str, args: argparse.Namespace, part: Path) -> int:
    """The child: one section in this process, its JSON to ``part``."""
    rows = Rows(part, args.section_budget)
    result = RUNNERS[name](args, rows)
    part.write_text(json.dumps(result, indent=1))
    return 0


def child_args(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device, "--lengths", *map(str, args.lengths), "--tokens", str(args.tokens),
           "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--window", str(args.window),
           "--flex-reserve-s", str(args.flex_reserve_s), "--pretrain-steps", str(args.pretrain_steps),
           "--pretrain-batch", str(args.pretrain_batch), "--finetune-scale", str(args.finetune_scale)]
    return out + (["--rehearse"] if args.rehearse else []) + ([] if args.compile else ["--no-compile"])


def drive(args: argparse.Namespace, sections: list[str], header: dict[str, Any]) -> dict:
    """Run each section as a child process under its budget; rewrite the JSON after each."""
    output = Path(args.output)
    result: dict[str, Any] = dict(header)
    problems = preflight(sections)
    for name in sections:
        t0 = time.perf_counter()
        if name in problems:
            result[name] = {"skipped": problems[name]}
        else:
            budget = args.budgets[name]
            part = output.with_name(f".{output.name}.{name}.part")
            part.unlink(missing_ok=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--section-budget", str(budget),
                   "--output", str(part), *child_args(args)]
            try:
                proc = subprocess.run(cmd, cwd=ROOT, timeout=budget + 15, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
                failure = None if proc.returncode == 0 else {
                    "error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or [""])[-1][:500],
                    "stderr_tail": proc.stderr[-1500:]}
            except subprocess.TimeoutExpired:
                failure = {"error": f"timed out after {budget + 15} s (rows so far kept)"}
            section = json.loads(part.read_text()) if part.is_file() else {}  # what the child wrote, partial or whole
            result[name] = {**section, **(failure or {})}
            part.unlink(missing_ok=True)
        result[name]["section_s"] = round(time.perf_counter() - t0, 1)
        print(f"[{name}] {result[name]['section_s']:.0f} s" + (f" ({result[name]['skipped']})" if "skipped" in result[name] else ""), flush=True)
        output.write_text(json.dumps(result, indent=1))  # after each section, in case of a timeout
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="preflight and the plan; runs nothing, writes nothing")
    ap.add_argument("--rehearse", action="store_true", help="every section on the CPU at toy sizes (checks the plumbing)")
    ap.add_argument("--report", metavar="JSON", default=None, help="print markdown tables of a finished run's JSON "
                    "(and write a TFLOP/s plot beside it); runs nothing")
    ap.add_argument("--output", default="gpu_bench.json")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--lengths", type=int, nargs="+", default=None, help="attention T values (default 1k..16k)")
    ap.add_argument("--tokens", type=int, default=None, help="B*T per attention call (default 16384)")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--window", type=int, default=None, help="sliding window for the window rows (default 256)")
    ap.add_argument("--flex-reserve-s", type=float, default=25.0, help="start a FlexAttention shape only with this much budget left")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--pretrain-batch", type=int, default=None)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="pretrain: eager only")
    ap.add_argument("--finetune-scale", type=float, default=None)
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--section", choices=SECTIONS, default=None, help=argparse.SUPPRESS)  # the child
    ap.add_argument("--section-budget", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # GPU sizes, or toy sizes for the CPU rehearsal
    gpu = dict(lengths=[1024, 2048, 4096, 8192, 16384], tokens=16384, heads=16, head_dim=128, window=256,
               pretrain_steps=20, pretrain_batch=16, finetune_scale=0.05, device="cuda")
    toy = dict(lengths=[128, 256], tokens=512, heads=2, head_dim=32, window=32,
               pretrain_steps=3, pretrain_batch=4, finetune_scale=0.004, device="cpu")
    for key, value in (toy if args.rehearse else gpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rehearse:
        args.compile = False  # inductor on a 2-core CPU takes minutes; the GPU run compiles
    args.budgets = {name: (sec if not args.rehearse else 120) for name, sec in BUDGET.items()}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"unknown sections {sorted(unknown)}; choose from {','.join(SECTIONS)}", file=sys.stderr)
        return 2
    if args.section:
        return run_section(args.section, args, Path(args.output))
    if args.report:
        path = Path(args.report)
        if not path.is_file():
            print(f"--report: no such file {path}", file=sys.stderr)
            return 2
        plot = path.with_name(path.stem + "_attention.png")
        print(report(json.loads(path.read_text()), plot))
        print(f"\nplot: {plot}" if plot.is_file() else "")
        return 0

    import torch

    cuda = torch.cuda.is_available()
    plan = {
        "tests": f"pytest -m cuda {' '.join(CUDA_TEST_FILES)}",
        "attention": f"causal fwd+bwd bf16, B*T={args.tokens}, H={args.heads}, D={args.head_dim}, T={args.lengths}: "
                     f"sdpa flash/efficient/cudnn, selfattn, selfattn window w={args.window}, flex causal/window",
        "pretrain": f"{'toy' if args.rehearse else 'GPT-2-124M'} shape, bf16 autocast, eager"
                    f"{' + torch.compile' if args.compile else ''}, batch {args.pretrain_batch}, {args.pretrain_steps} timed steps",
        "finetune": f"benchmarks/finetune_sst2.py --device {args.device} --stages pretrain,finetune --scale {args.finetune_scale}",
    }
    print(f"torch {torch.__version__}; CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    problems = preflight(sections)
    for name in sections:
        print(f"would run [{name}] (budget {args.budgets[name]} s): {plan[name]}")
        if name in problems:
            print(f"  cannot run here: {problems[name]}")
    if args.dry_run:
        print(f"dry run: arguments OK; {len(sections) - len(problems)} of {len(sections)} sections can run here; "
              f"would write {args.output}")
        return 0
    if not cuda and not args.rehearse:
        print("no CUDA device: run with --dry-run or --rehearse on CPU", file=sys.stderr)
        return 2
    header = {"device": torch.cuda.get_device_name() if cuda and not args.rehearse else "cpu (rehearsal)",
              "torch": torch.__version__, "python": sys.version.split()[0], "peak_bf16_tflops": PEAK_BF16_TFLOPS,
              "rehearsal": args.rehearse}
    result = drive(args, sections, header)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
