"""The prepared GPU run (benchmarks/gpu.sh): the dry run and the preflight work anywhere, the
rehearsal runs every section on the CPU at toy sizes, and the list of CUDA test files is complete."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_dry_run_checks_and_prints_the_plan(tmp_path):
    env = dict(os.environ, GPU_BENCH_OUT=str(tmp_path / "gpu.json"))
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for section in ("tests", "attention", "pretrain", "finetune"):
        assert f"would run [{section}]" in proc.stdout
    assert "CUDA available:" in proc.stdout
    assert not (tmp_path / "gpu.json").exists()  # a dry run writes nothing
    bad = subprocess.run(["bash", "benchmarks/gpu.sh", "--dry-run", "--sections", "tests,nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "nope" in bad.stderr


def test_every_test_file_with_cuda_tests_is_in_the_gpu_run():
    marked = {
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
        if re.search(r"pytest\.mark\.cuda\b", p.read_text(encoding="utf-8"))
    }
    assert marked  # the scan finds the marked files
    assert marked == set(_gpu_bench().CUDA_TEST_FILES)


def test_a_section_whose_packages_are_missing_is_skipped_with_the_fix(tmp_path, monkeypatch, capsys):
    gpu_bench = _gpu_bench()
    monkeypatch.setitem(gpu_bench.NEEDS, "attention", ("no_such_module_for_the_gpu_run",))
    args = gpu_bench.parse_args(["--rehearse", "--output", str(tmp_path / "gpu.json")])
    result = gpu_bench.drive(args, ["attention"], {"device": "test"})
    skipped = result["attention"]["skipped"]
    assert "no_such_module_for_the_gpu_run" in skipped and "gpu_prepare.sh" in skipped
    assert json.loads((tmp_path / "gpu.json").read_text())["attention"]["skipped"] == skipped  # written
    assert gpu_bench.main(["--dry-run", "--sections", "attention"]) == 0
    assert "cannot run here" in capsys.readouterr().out


def test_flop_counts_agree_with_a_count_of_the_mask():
    import torch

    from selfattn.nn.functional import sliding_window_mask

    gpu_bench = _gpu_bench()
    b, h, t, d, w = 2, 3, 40, 8, 7
    per_pair = 3.5 * 2 * 2 * b * h * d  # fwd: two matmuls of 2*d FLOPs per (query, key) pair; bwd 2.5x
    window_pairs = int(sliding_window_mask(t, t, w).sum())
    assert gpu_bench.window_flops(b, h, t, d, w) == pytest.approx(per_pair * window_pairs)
    causal_pairs = int(torch.ones(t, t).tril().sum())  # T(T+1)/2; the count uses T*T/2 (FA's convention)
    assert gpu_bench.causal_flops(b, h, t, d) == pytest.approx(per_pair * causal_pairs, rel=1.5 / t)


def test_report_turns_a_run_into_tables_and_a_plot(tmp_path):
    gpu_bench = _gpu_bench()
    rows = [
        {"T": 1024, "impl": "sdpa_flash", "ms": 1.0, "tflops": 400.0, "peak_fraction": 0.4044},
        {"T": 1024, "impl": "selfattn_window", "ms": 0.5, "tflops": 100.0, "peak_fraction": 0.1011, "speedup_vs_causal": 2.0},
        {"T": 2048, "impl": "sdpa_flash", "error": "RuntimeError: no kernel"},
        {"T": 2048, "impl": "flex_window", "skipped": "budget: 10 s left"},
    ]
    result = {"device": "NVIDIA H200", "torch": "2.11.0", "python": "3.12.3", "tests": {"summary": "9 passed in 30s"},
              "attention": {"rows": rows},
              "pretrain": {"params": 124_000_000, "batch": 16, "context": 1024,
                           "eager": {"tokens_per_s": 400000, "mfu": 0.31, "step_ms": 41.0, "first_step_s": 1.2, "peak_mib": 20000.0}},
              "finetune": {"error": "exit 1: boom"}}
    text = gpu_bench.report(result, tmp_path / "plot.png")
    assert "| sdpa_flash | 400.0 (40%) | error |" in text
    assert "| selfattn_window | 100.0 (10%) [2.00x] |  |" in text
    assert "| flex_window |  | skipped |" in text
    assert "| eager | 400,000 | 31.0% | 41.0 | 1.2 | 20000.0 |" in text
    assert "9 passed in 30s" in text and "[finetune] exit 1: boom" in text
    assert (tmp_path / "plot.png").stat().st_size > 1000


@pytest.mark.slow  # ~80 s on 2 cores: the fine-tune section trains a BPE tokenizer on SST-2
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_script_rehearsal_runs_every_section_on_cpu(tmp_path, data_dir):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, GPU_BENCH_OUT=str(out), SELFATTN_DATA_DIR=str(data_dir), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--rehearse"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["rehearsal"] is True
    for section in ("tests", "attention", "pretrain", "finetune"):
        assert "error" not in result[section] and "skipped" not in result[section], (section, result[section])
    assert result["tests"]["returncode"] == 0 and " passed" in result["tests"]["summary"]
    rows = result["attention"]["rows"]
    for impl in ("selfattn", "selfattn_window", "sdpa_flash"):  # the CPU runs these; the rest record why not
        assert sorted(r["T"] for r in rows if r["impl"] == impl and r.get("ms", 0) > 0) == [128, 256], impl
    assert all("ms" in r or "error" in r or "skipped" in r for r in rows)
    assert result["pretrain"]["eager"]["tokens_per_s"] > 0
    finetune = result["finetune"]["result"]
    assert finetune["device"] == "cpu" and 0.0 <= finetune["finetune"]["dev_accuracy"] <= 1.0
    shown = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--report", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "| selfattn_window |" in shown.stdout and "| eager |" in shown.stdout
    assert (tmp_path / "gpu_attention.png").is_file()
