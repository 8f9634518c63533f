"""Sliding-window attention (block-local) against dense torch SDPA ``is_causal``: fwd+bwd time and memory.

    python benchmarks/sliding_window.py                       # T = 512..8192, w = 256, fp32 and bf16
    python benchmarks/sliding_window.py --lengths 4096 8192 --dtypes float32

B=1, H=8, D=64. Time is the best of ``--repeats`` passes in process CPU time with ONE torch thread:
on a shared, loaded machine wall-clock varies 2-3x between runs, CPU time of a single-threaded
pass much less (both peers are measured the same way, interleaved). Memory: peak RSS above the
starting RSS during one pass (see benchmarks/attention.py). Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.attention import CpuPeakMemory
from selfattn.functional import _window_block_size, _window_kernel, sliding_window_attention, window_path


def _cpu_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    meter = CpuPeakMemory()
    rows = []
    print(f"{'dtype':9} {'T':>6} {'path':11} {'kernel':6} {'b':>4} {'dense ms':>9} {'window ms':>9} {'speedup':>7} "
          f"{'ideal':>6} {'dense MiB':>9} {'window MiB':>10}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for t in args.lengths:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 8, t, 64, generator=g).to(dtype).requires_grad_() for _ in range(3))

            def dense() -> None:
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

            def window() -> None:
                sliding_window_attention(q, k, v, args.window).sum().backward()

            dense(), window()  # warm-up
            t_dense, t_window = float("inf"), float("inf")
            for _ in range(args.repeats):  # interleaved so load hits both alike
                t_dense = min(t_dense, _cpu_time(dense, 1))
                t_window = min(t_window, _cpu_time(window, 1))
            m_dense, m_window = meter.measure(dense), meter.measure(window)
            ideal = max(1.0, (t / 2) / args.window)  # causal scores per query / window scores per query
            row = dict(
                dtype=dtype_name, T=t, window=args.window,
                path=window_path(t, t, args.window, _window_kernel(q, 0.0)),  # the automatic path taken
                kernel=_window_kernel(q, 0.0),  # the automatic block kernel: flash, or bf16 matmuls on CPU
                block=_window_block_size(t, args.window), dense_ms=t_dense * 1e3, window_ms=t_window * 1e3,
                speedup=t_dense / t_window, ideal=ideal, dense_peak_bytes=m_dense, window_peak_bytes=m_window,
            )
            rows.append(row)
            mib = lambda x: f"{x / 2**20:.1f}" if x is not None else "n/a"  # noqa: E731
            print(f"{dtype_name:9} {t:6d} {row['path']:11} {row['kernel']:6} {row['block']:4d} {row['dense_ms']:9.1f} "
                  f"{row['window_ms']:9.1f} {row['speedup']:6.2f}x {ideal:5.1f}x {mib(m_dense):>9} {mib(m_window):>10}",
                  flush=True)
    print(json.dumps({"sliding_window_vs_sdpa_causal": rows}))


if __name__ == "__main__":
    main()
