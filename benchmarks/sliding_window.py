"""Sliding-window attention (block-local) against dense torch SDPA ``is_causal``: fwd+bwd time and memory.

    python benchmarks/sliding_window.py                       # T = 512..8192, w = 256, fp32 and bf16
    python benchmarks/sliding_window.py --lengths 4096 8192 --dtypes float32
    python benchmarks/sliding_window.py --padded --prefix 512   # batch 2, row 2 left-padded; 512 cached keys

B=1, H=8, D=64. ``--padded``: B=2 with a key-padding mask (row 2's first quarter of the keys is
padding) and ``--prefix P``: P cached keys before the T queries; the dense peer is then
``selfattn.nn.functional.scaled_dot_product_attention`` with the same mask, ``is_causal=True``
(bottom-right), i.e. what runs without the window. Time is the best of ``--repeats`` passes in process CPU time with ONE torch thread:
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
from selfattn.nn.window import _window_block_size, _window_kernel, sliding_window_attention, window_path
from selfattn.nn.functional import scaled_dot_product_attention


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
    parser.add_argument("--padded", action="store_true", help="batch 2 with a key-padding mask")
    parser.add_argument("--prefix", type=int, default=0, help="cached keys before the queries")
    args = parser.parse_args()
    if args.prefix < 0:
        parser.error(f"--prefix ({args.prefix}) must be >= 0")
    torch.set_num_threads(1)
    meter = CpuPeakMemory()
    rows = []
    print(f"{'dtype':9} {'T':>6} {'path':11} {'kernel':6} {'b':>4} {'dense ms':>9} {'window ms':>9} {'speedup':>7} "
          f"{'ideal':>6} {'dense MiB':>9} {'window MiB':>10}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for t in args.lengths:
            g = torch.Generator().manual_seed(0)
            batch, lk = (2 if args.padded else 1), t + args.prefix
            q = torch.randn(batch, 8, t, 64, generator=g).to(dtype).requires_grad_()
            k, v = (torch.randn(batch, 8, lk, 64, generator=g).to(dtype).requires_grad_() for _ in range(2))
            key_mask = None
            if args.padded:
                key_mask = torch.ones(batch, 1, 1, lk, dtype=torch.bool)
                key_mask[1, ..., : lk // 4] = False  # left padding

            def dense() -> None:
                if key_mask is None and not args.prefix:
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                else:  # what runs without the window: the mask (and bottom-right causal) on the fused kernel
                    scaled_dot_product_attention(q, k, v, attn_mask=key_mask, is_causal=True).sum().backward()

            def window() -> None:
                sliding_window_attention(q, k, v, args.window, key_mask=key_mask).sum().backward()

            dense(), window()  # warm-up
            t_dense, t_window = float("inf"), float("inf")
            for _ in range(args.repeats):  # interleaved so load hits both alike
                t_dense = min(t_dense, _cpu_time(dense, 1))
                t_window = min(t_window, _cpu_time(window, 1))
            m_dense, m_window = meter.measure(dense), meter.measure(window)
            ideal = max(1.0, (args.prefix + t / 2) / args.window)  # causal scores per query / window's
            row = dict(
                dtype=dtype_name, T=t, window=args.window, padded=args.padded, prefix=args.prefix,
                path=window_path(t, lk, args.window, _window_kernel(q, 0.0)),  # the automatic path taken
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
