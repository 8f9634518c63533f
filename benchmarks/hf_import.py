"""Loading a Hugging Face checkpoint: ``selfattn.io.hf.import_hf`` against transformers'
``AutoModelForCausalLM.from_pretrained`` on the same files, each in a fresh process.

    python -m benchmarks.hf_import [--layers 24 --hidden 1024 --vocab 32000] [--repeats 3]

Writes a random Llama-shaped model in bf16 with transformers (no hub) to a temporary directory,
then for each loader (three processes each, interleaved; medians): wall time of the load, and the
process's peak RSS after the load and after one forward pass, which touches every weight (a
loader that maps the file lazily pays there). The baseline is the same process without a load
(Python, torch and the imports). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys, time
import torch
which, path = sys.argv[1], sys.argv[2]

def hwm_mib():  # this process's peak RSS (VmHWM: unlike ru_maxrss, not inherited from the parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

if which == "selfattn":
    from selfattn.io.hf import import_hf
elif which == "transformers":
    import transformers
base = hwm_mib()
t = time.perf_counter()
if which == "selfattn":
    model = import_hf(path)[0]
elif which == "transformers":
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()
else:
    model = None
load_s = time.perf_counter() - t
after_load = hwm_mib()
if model is not None:  # touches every weight: mmapped pages count from here on
    with torch.no_grad():
        logits = model(torch.arange(16)[None]).logits
    assert torch.isfinite(logits.float()).all()
print(json.dumps({"load_s": load_s, "peak_after_load_mib": after_load, "peak_after_forward_mib": hwm_mib(), "base_mib": base}))
"""

def _write_model(d: Path, layers: int, hidden: int, vocab: int) -> float:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                                   max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(d)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _run(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, which, str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{which} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hf-import-") as tmp:
        d = Path(tmp) / "model"
        params_m = _write_model(d, args.layers, args.hidden, args.vocab)
        size_mib = sum(f.stat().st_size for f in d.glob("*.safetensors")) / 2**20
        runs: dict[str, list[dict]] = {"none": [], "selfattn": [], "transformers": []}
        for _ in range(args.repeats):  # interleaved, so a busy moment hits both
            for which in runs:
                runs[which].append(_run(which, d))
    base = statistics.median(r["peak_after_forward_mib"] for r in runs["none"])
    rows = {}
    print(f"random Llama, {params_m:.0f} M parameters, {size_mib:.0f} MiB of bf16 safetensors; baseline process {base:.0f} MiB")
    print(f"{'loader':<14}{'load s':>8}{'peak MiB after load':>21}{'after a forward':>17}{'above baseline':>16}")
    for which in ("selfattn", "transformers"):
        med = {k: statistics.median(r[k] for r in runs[which]) for k in ("load_s", "peak_after_load_mib", "peak_after_forward_mib")}
        rows[which] = {**med, "above_baseline_mib": med["peak_after_forward_mib"] - base}
        print(f"{which:<14}{med['load_s']:>8.2f}{med['peak_after_load_mib']:>21.0f}{med['peak_after_forward_mib']:>17.0f}"
              f"{rows[which]['above_baseline_mib']:>16.0f}")  # fmt: skip
    ratio = {"load_time": rows["transformers"]["load_s"] / rows["selfattn"]["load_s"],
             "memory_above_baseline": rows["transformers"]["above_baseline_mib"] / max(rows["selfattn"]["above_baseline_mib"], 1.0)}  # fmt: skip
    print(f"transformers / selfattn: load time {ratio['load_time']:.2f}x, peak memory above baseline {ratio['memory_above_baseline']:.2f}x")
    report = {"benchmark": "hf_import", "params_m": params_m, "safetensors_mib": size_mib, "baseline_mib": base,
              "loaders": rows, "transformers_over_selfattn": ratio}  # fmt: skip
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
