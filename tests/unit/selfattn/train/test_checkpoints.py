"""Training checkpoints: SHA-256 recorded at save time, the newest ``keep_checkpoints`` kept, a corrupt
newest checkpoint named and skipped on resume, and a full disk stopping the run with DiskFull.
Tiny models on CPU; every resumed run is compared with an uninterrupted run of the same seed."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch

from selfattn.errors import EXIT_DISK_FULL, DiskFull, UserError
from selfattn.train import Callback, StopTraining, pretrain
from selfattn.train.checkpoints import (
    MANIFEST_FILE,
    STATE_FILE,
    problem_with,
    step_dirs,
)
from tests.unit.selfattn.train import test_train

# the engine tests' tiny corpus, private home and one intra-op thread
files, _home_and_one_thread, lm_config = test_train.files, test_train._home_and_one_thread, test_train.lm_config



class Losses(Callback):
    """Training losses by step, the start info, and an optional action at one checkpoint."""

    def __init__(self, *, stop_at: int | None = None, at_checkpoint: dict | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.info: dict | None = None
        self.stop_at, self.at_checkpoint = stop_at, at_checkpoint or {}

    def on_train_start(self, info):
        self.info = info

    def on_step(self, step, metrics):
        self.losses[step] = metrics["train_loss"]
        if step == self.stop_at:
            raise StopTraining

    def on_checkpoint(self, step, path):
        if step in self.at_checkpoint:
            self.at_checkpoint[step]()


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """An uninterrupted run (8 steps, a checkpoint every 2): its losses and final validation loss."""
    rec = Losses()
    result = pretrain(lm_config(files, checkpoint_every=2), tmp_path_factory.mktemp("ref") / "out", [rec])
    return {"losses": rec.losses, "val_loss": result.metrics["val_loss"], "out": result.out_dir}


def test_checkpoints_keep_the_newest_two_with_their_sha256(reference):
    dirs = step_dirs(reference["out"] / "checkpoints")
    assert [step for step, _ in dirs] == [8, 6]  # written at 2, 4, 6, 8; keep_checkpoints=2
    for step, d in dirs:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
        data = (d / STATE_FILE).read_bytes()
        assert manifest["step"] == step and manifest["bytes"] == len(data)
        assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
        assert torch.load(d / STATE_FILE, weights_only=True)["step"] == step
        assert problem_with(d) is None


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zero(path):
    path.write_bytes(b"\0" * path.stat().st_size)  # same length: only the checksum tells


@pytest.mark.parametrize("damage", [_truncate, _zero], ids=["truncated", "zeroed"])
def test_a_corrupt_newest_checkpoint_is_named_and_the_previous_one_resumes(files, tmp_path, reference, damage, caplog):
    cfg = lm_config(files, checkpoint_every=2)
    first = Losses(stop_at=5)  # checkpoints at 2, 4 and 5 (the stop): step-4 and step-5 are kept
    pretrain(cfg, tmp_path / "out", [first])
    root = tmp_path / "out" / "checkpoints"
    assert [s for s, _ in step_dirs(root)] == [5, 4]
    bad = root / "step-00000005" / STATE_FILE
    damage(bad)

    second = Losses()
    with caplog.at_level(logging.WARNING, logger="selfattn.train.engine"):
        result = pretrain(cfg, tmp_path / "out", [second])
    warned = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warned) == 1 and str(bad) in warned[0] and "step 4" in warned[0], warned
    assert second.info["start_step"] == 4 and str(bad) in second.info["corrupt_checkpoints"][0]
    assert (root / "step-00000005.corrupt" / STATE_FILE).is_file()  # set aside for inspection, never read again
    # steps 5-8 redone from step 4: the same losses as the uninterrupted run
    assert second.losses == {s: reference["losses"][s] for s in range(5, 9)}
    assert result.metrics["steps"] == 8 and result.metrics["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)


def test_every_checkpoint_corrupt_is_a_clear_error_naming_each_file(files, tmp_path):
    cfg = lm_config(files, checkpoint_every=2)
    pretrain(cfg, tmp_path / "out", [Losses(stop_at=3)])
    root = tmp_path / "out" / "checkpoints"
    bad = [d / STATE_FILE for _, d in step_dirs(root)]
    assert len(bad) == 2
    for p in bad:
        _zero(p)
    with pytest.raises(UserError, match="every checkpoint there is corrupt") as err:
        pretrain(cfg, tmp_path / "out")
    assert all(str(p) in str(err.value) for p in bad) and "train.resume=false" in str(err.value)


def test_a_legacy_last_pt_still_resumes(files, tmp_path, reference):
    cfg = lm_config(files, checkpoint_every=2)
    pretrain(cfg, tmp_path / "out", [Losses(stop_at=3)])
    root = tmp_path / "out" / "checkpoints"
    shutil.move(root / "step-00000003" / STATE_FILE, root / "last.pt")  # the single-file layout of earlier versions
    for _, d in step_dirs(root):
        shutil.rmtree(d)
    second = Losses()
    pretrain(cfg, tmp_path / "out", [second])
    assert second.info["start_step"] == 3 and second.losses == {s: reference["losses"][s] for s in range(4, 9)}
    assert not (root / "last.pt").exists() and [s for s, _ in step_dirs(root)] == [8, 6]


def test_a_full_disk_during_a_checkpoint_stops_with_disk_full_and_the_same_command_resumes(files, small_disk, reference):
    """The disk fills right after the checkpoint of step 4; the one of step 6 cannot be written."""
    cfg = lm_config(files, checkpoint_every=2, eval_every=8)  # nothing else is written between 4 and 6
    out = small_disk.path / "out"
    with pytest.raises(DiskFull) as err:
        pretrain(cfg, out, [Losses(at_checkpoint={4: small_disk.fill})])
    message = str(err.value)
    assert err.value.exit_code == EXIT_DISK_FULL
    assert str(out / "checkpoints" / "step-00000006") in message and "free" in message and "needs about" in message
    root = out / "checkpoints"
    assert [s for s, _ in step_dirs(root)] == [4, 2] and all(problem_with(d) is None for _, d in step_dirs(root))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the half-written directory was removed

    small_disk.free_space()
    second = Losses()
    result = pretrain(cfg, out, [second])
    assert second.info["start_step"] == 4
    assert second.losses == {s: reference["losses"][s] for s in range(5, 9)}
    assert result.metrics["val_loss"] == pytest.approx(reference["val_loss"], abs=1e-6)
