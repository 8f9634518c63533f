"""Training checkpoints on disk: one directory per saved step, with the SHA-256 recorded at save time.

Layout::

    out_dir/checkpoints/step-00000020/state.pt        torch.save of the TrainState (weights_only-loadable)
                                      manifest.json   {"format": 1, "step": 20, "file": "state.pt",
                                                       "bytes": N, "sha256": "<hex>"}

:func:`write_checkpoint` hashes the bytes while ``torch.save`` streams them (no read-back), fills a
staged directory that is renamed into place (:func:`selfattn.utils.atomic_dir`: a crash leaves
the previous checkpoints as they were), then removes all but the newest ``keep`` step directories.
A full disk is a :class:`~selfattn.errors.DiskFull` naming the directory and the bytes needed.

:func:`read_latest` tries the newest directory first; one whose ``state.pt`` is missing, of another
size or digest than its manifest says (a truncated or zeroed file after a power cut on a
filesystem that did not honour fsync), or does not load is reported by name and the next older
one is used. A ``checkpoints/last.pt`` written before manifests existed is still read (unverified)
when no step directory is there.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfattn.errors import UserError
from selfattn.utils import HashingWriter, atomic_dir, sha256_file

MANIFEST_FORMAT = 1
STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LEGACY_FILE = "last.pt"  # the single-file layout of earlier versions
CORRUPT_SUFFIX = ".corrupt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class LoadedCheckpoint:
    """What :func:`read_latest` found: the newest good checkpoint and the newer ones it skipped."""

    step: int
    path: Path  # the state file
    saved: dict[str, Any]  # what torch.save wrote (weights_only-loaded)
    corrupt: list[str] = field(default_factory=list)  # one sentence per skipped directory, naming the file
    corrupt_dirs: list[Path] = field(default_factory=list)


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every checkpoint directory under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside ``obj`` (nested dicts, lists, tuples): about what torch.save writes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_checkpoint(root: Path, step: int, payload: dict[str, Any], *, keep: int) -> Path:
    """``payload`` to ``root/step-<step>/state.pt`` with its manifest, atomically; then keep the newest
    ``keep`` step directories. Returns the state file's path."""
    import torch

    if keep < 1:
        raise ValueError(f"keep ({keep}) must be at least 1")
    d = step_dir(root, step)
    need = tensor_bytes(payload)
    with atomic_dir(d, need_bytes=need, what=f"the training checkpoint of step {step}") as tmp:
        with open(tmp / STATE_FILE, "wb") as fh:
            writer = HashingWriter(fh)
            torch.save(payload, writer)
        manifest = {"format": MANIFEST_FORMAT, "step": step, "file": STATE_FILE, "bytes": writer.n_bytes, "sha256": writer.sha256.hexdigest()}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    prune(root, keep)
    (root / LEGACY_FILE).unlink(missing_ok=True)  # superseded by the step directories
    return d / STATE_FILE


def prune(root: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` step directories; returns the removed ones."""
    import shutil

    removed = [d for _, d in step_dirs(root)[keep:]]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def problem_with(d: Path) -> str | None:
    """Why checkpoint directory ``d`` cannot be trusted (a sentence naming the file), or None."""
    manifest_path, state = d / MANIFEST_FILE, d / STATE_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        recorded, size = str(manifest["sha256"]), int(manifest["bytes"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is missing or unreadable ({type(exc).__name__}: {exc})"
    if not state.is_file():
        return f"{state} is missing"
    actual_size = state.stat().st_size
    if actual_size != size:
        return f"{state} is corrupt: {actual_size} bytes, but {size} were written (truncated?)"
    actual = sha256_file(state)
    if actual != recorded:
        return f"{state} is corrupt: its SHA-256 ({actual[:12]}...) is not the one recorded at save time ({recorded[:12]}...)"
    return None


def read_latest(root: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint under ``root`` that passes its checksum and loads; None when there is none.

    Raises a UserError when every checkpoint there is corrupt (naming each file), or when a legacy
    ``last.pt`` does not load."""
    import torch

    corrupt: list[str] = []
    corrupt_dirs: list[Path] = []
    for step, d in step_dirs(root):
        problem = problem_with(d)
        if problem is None:
            try:
                saved = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - a checksummed file that still does not load
                problem = f"{d / STATE_FILE} does not load ({type(exc).__name__}: {exc})"
        if problem is not None:
            corrupt.append(problem)
            corrupt_dirs.append(d)
            continue
        return LoadedCheckpoint(step=step, path=d / STATE_FILE, saved=saved, corrupt=corrupt, corrupt_dirs=corrupt_dirs)
    legacy = root / LEGACY_FILE
    if legacy.is_file():
        try:
            saved = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - unreadable / not a weights-only file
            raise UserError(f"cannot resume from {legacy}: {type(exc).__name__}: {exc}") from None
        step = saved.get("step", 0) if isinstance(saved, dict) else 0
        return LoadedCheckpoint(step=int(step), path=legacy, saved=saved, corrupt=corrupt, corrupt_dirs=corrupt_dirs)
    if corrupt:
        raise UserError(
            f"cannot resume from {root}: every checkpoint there is corrupt: {'; '.join(corrupt)}. "
            "Set train.resume=false to start over in this directory"
        )
    return None


def set_aside(d: Path) -> Path:
    """Rename corrupt checkpoint directory ``d`` to ``step-N.corrupt`` (kept for inspection, never read again)."""
    target = d.with_name(d.name + CORRUPT_SUFFIX)
    if target.exists():
        import shutil

        shutil.rmtree(target, ignore_errors=True)
    os.replace(d, target)
    return target
