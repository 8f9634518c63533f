"""Forward+backward time and peak memory: selfattn vs PyTorch SDPA vs naive attention.

    python benchmarks/attention.py                 # T = 256, 1024, 2048; B=4, H=8, D=64, causal, float32
    python benchmarks/attention.py --quick         # T = 256, 1024, fewer repeats
    python benchmarks/attention.py --device cuda   # adds TFLOP/s and the SDPA backend chosen

Time: median of ``--repeats`` forward+backward passes after ``--warmup`` passes; the three
implementations are interleaved within each repeat so machine noise hits them alike.

Peak memory (extra bytes while one forward+backward runs, inputs excluded):
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU: the process' resident-set high-water mark (``VmHWM``), reset before the pass by writing
  ``5`` to ``/proc/self/clear_refs`` after ``malloc_trim(0)`` returns freed heap to the OS; the peak is
  ``VmHWM - VmRSS(before)``. (``tracemalloc`` does not see torch's allocations.) Linux only;
  elsewhere the column shows ``n/a``.

Prints a table, then one JSON line with the ratios (selfattn/sdpa time, naive/selfattn time).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from selfattn.nn.functional import naive_attention, scaled_dot_product_attention

IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "selfattn": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "naive": lambda q, k, v: naive_attention(q, k, v, is_causal=True),
}


# --------------------------------------------------------------------------- memory


class CpuPeakMemory:
    """Peak RSS above the starting RSS during a block (Linux /proc; None when unavailable)."""

    def __init__(self) -> None:
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._status("VmHWM")
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self.available = True
        except (OSError, AttributeError, ValueError):
            self.available = False

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as fh:
            match = re.search(rf"{key}:\s+(\d+) kB", fh.read())
        if match is None:
            raise ValueError(f"{key} not in /proc/self/status")
        return int(match.group(1)) * 1024

    def measure(self, fn: Callable[[], None]) -> int | None:
        if not self.available:
            fn()
            return None
        self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # reset VmHWM to the current RSS
        before = self._status("VmRSS")
        fn()
        return max(0, self._status("VmHWM") - before)


def peak_memory(fn: Callable[[], None], device: torch.device, cpu_meter: CpuPeakMemory) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    return cpu_meter.measure(fn)


# --------------------------------------------------------------------------- timing


def fwd_bwd(impl: Callable[..., torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> None:
    out = impl(q, k, v)
    out.backward(grad)
    q.grad = k.grad = v.grad = None


def timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """Name of the aten kernel PyTorch's dispatcher picks for causal SDPA on these inputs."""
    from torch.profiler import ProfilerActivity, profile

    saved_stderr = os.dup(2)  # the profiler prints start/stop lines on fd 2 in some builds
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    names = [e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")]
    for tag in ("cudnn", "flash_attention_for_cpu", "flash", "efficient", "math"):
        for name in names:
            if tag in name:
                return name.removeprefix("aten::_scaled_dot_product_")
    return names[0] if names else "math (composite)"


def causal_flops(b: int, h: int, t: int, d: int) -> float:
    """Forward+backward FLOPs of causal attention: fwd 4*B*H*T^2*D / 2, bwd = 2.5 * fwd."""
    fwd = 4 * b * h * t * t * d / 2
    return 3.5 * fwd


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 256, 1024 only, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="override the sequence lengths")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    args = parser.parse_args()

    device = torch.device(args.device)
    lengths = args.lengths or ([256, 1024] if args.quick else [256, 1024, 2048])
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    B, H, D = args.batch, args.heads, args.head_dim
    dtype = torch.float32
    cpu_meter = CpuPeakMemory()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    print(f"# attention fwd+bwd, B={B} H={H} D={D} causal {dtype}, device={device} ({where}), torch {torch.__version__}")
    print(f"# median of {repeats} after {warmup} warmup; memory: {'cuda max_memory_allocated' if device.type == 'cuda' else 'RSS high-water delta (/proc)'}")

    rows = []
    ratios = {}
    header = f"{'T':>6} {'impl':>9} {'time ms':>10} {'peak MiB':>9}" + (f" {'TFLOP/s':>8}" if device.type == "cuda" else "")
    print(header)
    for T in lengths:
        g = torch.Generator(device="cpu").manual_seed(T)
        q, k, v, grad = (torch.randn(B, H, T, D, generator=g, dtype=dtype).to(device) for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        backend = sdpa_backend(q, k, v)
        times: dict[str, list[float]] = {name: [] for name in IMPLS}
        for name, impl in IMPLS.items():
            for _ in range(warmup):
                fwd_bwd(impl, q, k, v, grad)
        for r in range(repeats):
            order = list(IMPLS)[r % len(IMPLS) :] + list(IMPLS)[: r % len(IMPLS)]  # rotate the order
            for name in order:
                times[name].append(timed(lambda: fwd_bwd(IMPLS[name], q, k, v, grad), device))
        for name, impl in IMPLS.items():
            median = statistics.median(times[name])
            peak = peak_memory(lambda: fwd_bwd(impl, q, k, v, grad), device, cpu_meter)
            row = {"T": T, "impl": name, "time_ms": round(median * 1e3, 3), "peak_mib": None if peak is None else round(peak / 2**20, 1)}
            line = f"{T:>6} {name:>9} {row['time_ms']:>10.2f} {('n/a' if peak is None else f'{peak / 2**20:.1f}'):>9}"
            if device.type == "cuda":
                row["tflops"] = round(causal_flops(B, H, T, D) / median / 1e12, 2)
                line += f" {row['tflops']:>8.2f}"
            rows.append(row)
            print(line)
        med = {name: statistics.median(ts) for name, ts in times.items()}
        ratios[f"T={T}"] = {
            "selfattn_over_sdpa_time": round(med["selfattn"] / med["sdpa"], 3),
            "naive_over_selfattn_time": round(med["naive"] / med["selfattn"], 2),
            "sdpa_backend": backend,
        }
        print(f"{'':>6} sdpa backend: {backend}; selfattn/sdpa {ratios[f'T={T}']['selfattn_over_sdpa_time']:.3f}x, "
              f"naive/selfattn {ratios[f'T={T}']['naive_over_selfattn_time']:.2f}x")
        q = k = v = grad = None  # free them before the next size (the lambdas above read these names)

    print(json.dumps({
        "benchmark": "attention_fwd_bwd", "device": str(device), "device_name": where, "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."), "B": B, "H": H, "D": D, "causal": True,
        "repeats": repeats, "warmup": warmup,
        "memory_method": "cuda.max_memory_allocated" if device.type == "cuda" else ("rss_hwm_delta" if cpu_meter.available else None),
        "ratios": ratios, "rows": rows,
    }))


if __name__ == "__main__":
    main()
