"""The disk under SELFATTN_HOME fills up mid-pipeline: ``selfattn run --config smoke`` with its home on
a small tmpfs (mounted by the test; skipped where it cannot mount), filled as the first fine-tuning
checkpoint lands. The run stops with exit code 5 and one paragraph naming the path and the space;
every finished stage and the last good checkpoint are intact; once space is freed the same command
resumes and ends with the metrics of an uninterrupted run of the same seed.

Prefect's own database is kept off the small disk (``PREFECT_API_DATABASE_CONNECTION_URL``): a full
disk under the orchestrator's server is the server's to report, and the test is about what
selfattn writes (checkpoints, stage markers, the MLflow store and its artifacts).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from selfattn.errors import EXIT_DISK_FULL
from selfattn.train.checkpoints import problem_with, step_dirs

from .conftest import SMOKE_SETS, Pipeline, pipeline_env, stage_dirs

pytestmark = [pytest.mark.slow]  # three smoke pipelines (~2 min each on 2 loaded cores)


def _result_metrics(home: Path) -> dict[str, float]:
    results = sorted((home / "runs").glob("pipeline-*/result.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(results[-1].read_text())["metrics"]


def _finished(home: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (home / "runs").glob("*/_SUCCESS")}


@pytest.mark.parametrize("small_disk", ["512M"], indirect=True)
def test_a_full_disk_mid_finetune_stops_in_one_paragraph_and_the_same_command_resumes(small_disk, tmp_path, data_dir):
    work = tmp_path / "work"
    work.mkdir()

    def env(home: Path) -> dict[str, str]:
        prefect = tmp_path / f"prefect-{home.parent.name}-{home.name}"
        return pipeline_env(home, data_dir, PREFECT_HOME=str(prefect), PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{prefect}/prefect.db")

    def start(home: Path, name: str) -> Pipeline:
        return Pipeline(env=env(home), cwd=work, log_dir=tmp_path / "logs", name=name, sets=SMOKE_SETS)

    # the uninterrupted reference, on an ordinary disk
    ref_home = tmp_path / "reference" / "home"
    ref = start(ref_home, "reference")
    assert ref.wait(timeout=1200) == 0, ref.stderr[-4000:]

    home = small_disk.path / "home"
    p = start(home, "1-fills")
    p.wait_for("a fine-tuning checkpoint", lambda: any(home.glob("runs/finetune-*/train/checkpoints/step-*/state.pt")))
    filled = threading.Thread(target=small_disk.fill, kwargs={"leave": 64 * 1024})
    filled.start()
    filled.join()
    finished_before = _finished(home)
    rc = p.wait(timeout=900)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert rc == EXIT_DISK_FULL, p.stderr[-4000:]
    assert len(errors) == 1 and "no space left on the device" in errors[0] and str(home) in errors[0] and "free" in errors[0], errors
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    # finished stages intact (none lost, none rewritten); fine-tuning unfinished with good checkpoints
    assert _finished(home) == finished_before and {n.split("-")[0] for n in finished_before} >= {"pretrain", "search"}
    ft = stage_dirs(home, "finetune")
    assert len(ft) == 1 and not (ft[0] / "_SUCCESS").is_file()
    kept = step_dirs(ft[0] / "train" / "checkpoints")
    assert kept and all(problem_with(d) is None for _, d in kept)

    small_disk.free_space()
    p = start(home, "2-resumes")
    assert p.wait(timeout=1200) == 0, p.stderr[-4000:]
    assert {k: v for k, v in _finished(home).items() if k in finished_before} == finished_before  # not redone
    assert _result_metrics(home) == pytest.approx(_result_metrics(ref_home), abs=1e-6)
