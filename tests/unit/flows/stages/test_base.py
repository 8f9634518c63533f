"""Stage directories: keys follow the inputs, markers are atomic, finished stages are skipped, claims lock."""

from __future__ import annotations

import json
from pathlib import Path

from flows.stages import base as stages


def test_stage_key_depends_on_inputs_and_marker_roundtrip(tmp_path):
    a = stages.Stage(tmp_path, "pretrain", {"lr": 1e-3, "data": "abc"})
    b = stages.Stage(tmp_path, "pretrain", {"data": "abc", "lr": 1e-3})
    c = stages.Stage(tmp_path, "pretrain", {"lr": 2e-3, "data": "abc"})
    assert a.key == b.key != c.key and a.dir != c.dir
    assert a.done() is None
    a.start()
    assert a.done() is None  # started, not finished: a re-run redoes (and resumes) it
    out = a.finish({"best_dir": "x", "metrics": {"val_loss": 1.5}})
    assert not out.cached
    again = stages.Stage(tmp_path, "pretrain", {"data": "abc", "lr": 1e-3}).done()
    assert again is not None and again.cached and again.result == {"best_dir": "x", "metrics": {"val_loss": 1.5}}
    assert json.loads((a.dir / "inputs.json").read_text()) == {"data": "abc", "lr": 1e-3}


def test_a_change_to_the_library_code_changes_every_stage_key(tmp_path, monkeypatch):
    """The key holds a digest of the code (``selfattn`` and ``flows/stages``): an edited source file
    gives new stage directories, so a result computed by the old code is not reused."""
    import shutil

    import selfattn

    lib = tmp_path / "src" / "selfattn"
    shutil.copytree(Path(selfattn.__file__).parent, lib, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(selfattn, "__file__", str(lib / "__init__.py"))
    keys = []
    for edit in ("", "\n# an edit\n"):
        with (lib / "nn" / "attention.py").open("a") as f:
            f.write(edit)
        stages.code_version.cache_clear()
        keys.append((stages.code_version(), stages.Stage(tmp_path, "pretrain", {"lr": 1e-3}).key))
    stages.code_version.cache_clear()  # the real tree's digest for the tests after this one
    (code_before, key_before), (code_after, key_after) = keys
    assert code_before != code_after and key_before != key_after


def test_corrupt_marker_means_not_done(tmp_path):
    s = stages.Stage(tmp_path, "evaluate", {"k": 1})
    s.start()
    (s.dir / stages.MARKER).write_text("{not json")
    assert s.done() is None


def test_concurrent_claims_do_the_work_once(tmp_path):
    import threading

    inputs = {"k": "same"}
    holder_in, release = threading.Event(), threading.Event()
    seen = {}

    def first():
        with stages.Stage(tmp_path, "pretrain", inputs).claim() as (out, d):
            seen["first"] = out
            holder_in.set()
            release.wait(30)
            stages.Stage(tmp_path, "pretrain", inputs).finish({"by": "first"})

    def second():
        holder_in.wait(30)
        with stages.Stage(tmp_path, "pretrain", inputs).claim() as (out, d):
            seen["second"] = out

    t1, t2 = threading.Thread(target=first), threading.Thread(target=second)
    t1.start(), t2.start()
    holder_in.wait(30)
    t2.join(0.5)
    assert t2.is_alive()  # blocked on the lock while the first claim holds it
    release.set()
    t1.join(30), t2.join(30)
    assert seen["first"] is None
    assert seen["second"] is not None and seen["second"].cached and seen["second"].result == {"by": "first"}
