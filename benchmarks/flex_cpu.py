"""Compiled FlexAttention on CPU (forward only: torch has no CPU FlexAttention backward) against
``sliding_window_attention`` and dense SDPA ``is_causal``, for inference with a sliding window.

    python -m benchmarks.flex_cpu                              # T = 1024..8192, w = 256, fp32 and bf16
    python -m benchmarks.flex_cpu --lengths 4096 --dtypes float32

B=1, H=8, D=64, under ``torch.inference_mode``. Time: process CPU time, ONE torch thread, best of
``--repeats`` interleaved passes (the same for the three peers). The compile time of the flex kernel
(the first call at each shape; ``dynamic=False``) is printed apart and not counted in its pass
time; the block mask is built inside each pass, as ``flex_masked_attention`` does per call.
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from benchmarks.sliding_window import _cpu_time
from selfattn.nn.window import flex_masked_attention, sliding_window_attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    w, rows = args.window, []
    print(f"{'dtype':9} {'T':>6} {'dense ms':>9} {'window ms':>9} {'flex ms':>9} {'flex/dense':>10} "
          f"{'flex/window':>11} {'compile s':>9} {'max |flex-window|':>17}")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for t in args.lengths:
            g = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(1, 8, t, 64, generator=g).to(dtype) for _ in range(3))
            peers = {
                "dense": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                "window": lambda: sliding_window_attention(q, k, v, w),
                "flex": lambda: flex_masked_attention(q, k, v, causal=True, window=w, compile=True),
            }
            with torch.inference_mode():
                start = time.perf_counter()
                out_flex = peers["flex"]()  # compiles at this shape
                compile_s = time.perf_counter() - start
                err = (out_flex.float() - peers["window"]().float()).abs().max().item()
                best = {name: float("inf") for name in peers}
                for _ in range(args.repeats):
                    for name, fn in peers.items():
                        best[name] = min(best[name], _cpu_time(fn, 1))
            row = dict(dtype=dtype_name, T=t, window=w, **{f"{n}_ms": s * 1e3 for n, s in best.items()},
                       flex_vs_dense=best["dense"] / best["flex"], flex_vs_window=best["window"] / best["flex"],
                       compile_s=compile_s, max_abs_diff=err)
            rows.append(row)
            print(f"{dtype_name:9} {t:6d} {row['dense_ms']:9.1f} {row['window_ms']:9.1f} {row['flex_ms']:9.1f} "
                  f"{row['flex_vs_dense']:9.2f}x {row['flex_vs_window']:10.2f}x {compile_s:9.1f} {err:17.2e}", flush=True)
    print(json.dumps({"flex_cpu_forward": rows}))


if __name__ == "__main__":
    main()
