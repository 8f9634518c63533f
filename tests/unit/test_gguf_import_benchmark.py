"""benchmarks/gguf_import.py end to end on a tiny file: both loaders run in their own processes and
the report carries what BENCHMARKS.md quotes (load time, tokenizer time, peak memory, the ratios)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gguf")


@pytest.mark.slow  # three child processes, each importing torch (and transformers)
def test_gguf_import_benchmark_runs_both_loaders(tmp_path):
    from benchmarks.gguf_import import main
    from tests.unit.selfattn.io.test_gguf import (
        _byte_level_tokenizer,
        _hf_model,
        write_gguf,
    )

    tok = _byte_level_tokenizer()
    path = tmp_path / "tiny.gguf"
    write_gguf(path, _hf_model("qwen2", len(tok["tokens"])), "qwen2", tok)
    report = main(["--file", str(path), "--repeats", "1"])
    assert report["file_mib"] > 0 and report["baseline_mib"] > 0
    for loader in ("selfattn", "transformers"):
        row = report["loaders"][loader]
        assert row["load_s"] > row["tokenizer_s"] > 0 and row["peak_after_forward_mib"] >= row["peak_after_load_mib"] > 0
    assert report["transformers_over_selfattn"]["load_time"] > 0
