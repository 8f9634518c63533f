"""benchmarks/hf_import.py end to end at toy size: both loaders run in their own processes and the
report carries what BENCHMARKS.md quotes (load time, peak memory, the ratios)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


@pytest.mark.slow  # six child processes, each importing torch
def test_hf_import_benchmark_runs_both_loaders():
    from benchmarks.hf_import import main

    report = main(["--layers", "1", "--hidden", "64", "--vocab", "128", "--repeats", "1"])
    assert report["params_m"] > 0 and report["safetensors_mib"] > 0 and report["baseline_mib"] > 0
    for loader in ("selfattn", "transformers"):
        row = report["loaders"][loader]
        assert row["load_s"] > 0 and row["peak_after_forward_mib"] >= row["peak_after_load_mib"] > 0
    assert report["transformers_over_selfattn"]["load_time"] > 0
