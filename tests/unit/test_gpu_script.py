"""benchmarks/gpu.sh --dry-run works on CPU: the prepared GPU run imports, parses and plans."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
