"""The data stages: the run's files materialised (subsampled, cached), the gate's declarations."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.config import PipelineConfig
from flows.stages import data
from flows.stages.base import MARKER, Artifact, StageOutput
from selfattn.data.paths import file_digest
from selfattn.errors import UserError


def test_prepare_data_subsamples_and_caches(selfattn_home, data_dir, monkeypatch):
    from flows.config import load_pipeline_config

    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    cfg = load_pipeline_config("smoke", ["data.train_rows=50", "data.dev_rows=20", "data.corpus_chars=1000"])
    out = data.prepare_data(cfg, selfattn_home)
    files = out.result["files"]
    assert len(open(files["train.tsv"]).read().splitlines()) == 51
    assert len(open(files["dev.tsv"]).read().splitlines()) == 21
    assert len(open(files["corpus.txt"]).read()) == 1000
    assert file_digest(Path(files["dev.tsv"])) == out.result["digests"]["dev.tsv"]
    again = data.prepare_data(cfg, selfattn_home)
    assert again.cached and again.dir == out.dir
    changed = data.prepare_data(load_pipeline_config("smoke", ["data.train_rows=60", "data.dev_rows=20", "data.corpus_chars=1000"]), selfattn_home)
    assert not changed.cached and changed.dir != out.dir
    # a cached stage declares what the fresh one did: the datasets, the digest on both runs
    assert again.log == out.log and [d.name for d in out.log.datasets] == ["corpus", "sst2-train", "sst2-dev"]
    assert out.log.tags[data.TAG_DATA_DIGEST] == out.result["digest"] == out.log.pipeline.tags[data.TAG_DATA_DIGEST]


def _files(tmp_path: Path, train_header: str = "sentence\tlabel", leak: bool = False) -> StageOutput:
    tmp_path.mkdir()
    words = "the a fine dull film plot actor scene long short good bad".split()
    rows = [f"{words[i % 12]} {words[i * 7 % 12]} film number {i} .\t{i % 2}" for i in range(60)]
    (tmp_path / "corpus.txt").write_text("".join(f"line {i}: {' '.join(words[i % 5 :])}\n" for i in range(200)))
    (tmp_path / "train.tsv").write_text("\n".join([train_header, *rows[:40]]) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(["sentence\tlabel", *(rows[:20] if leak else rows[40:])]) + "\n")
    files = {n: str(tmp_path / n) for n in ("corpus.txt", "train.tsv", "dev.tsv")}
    digests = {n: file_digest(Path(p)) for n, p in files.items()}  # the gate's stage key
    return StageOutput(stage="data", key="d", dir=str(tmp_path), result={"files": files, "digests": digests})


def test_the_gate_declares_its_report_and_refuses_failed_or_unusable_files(tmp_path, selfattn_home):
    cfg = PipelineConfig()
    passed = data.validate_data(cfg, _files(tmp_path / "good"), selfattn_home)
    assert passed.result["passed"], passed.result["failures"]
    assert passed.log.tags == {data.TAG_VALIDATION: "passed"} and passed.log.pipeline is None
    assert Artifact(path=passed.result["report"], to="validation") in passed.log.artifacts
    data.require_passed(passed)

    leaked = data.validate_data(cfg, _files(tmp_path / "leak", leak=True), selfattn_home)
    assert not leaked.result["passed"] and leaked.log.tags == {data.TAG_VALIDATION: "failed"}
    assert leaked.log.pipeline.artifacts == [Artifact(path=leaked.result["report"], to="validation")]  # on the pipeline's run too
    with pytest.raises(UserError, match="(?s)data checks failed.*data.dev .*leakage"):
        data.require_passed(leaked)

    # a train file with the wrong header: named once, by its config key and the file given, with the fix
    bad = data.validate_data(cfg, _files(tmp_path / "bad", train_header="text\tstars"), selfattn_home)
    assert not bad.result["passed"] and not bad.cached and list(bad.result["failures"]) == ["train"]
    with pytest.raises(UserError) as err:
        data.require_passed(bad)
    message = str(err.value)
    assert "data.train (" in message and "no text column 'sentence'" in message and "--set data.text_column=NAME" in message
    assert message.count("no text column") == 1 and "--against" not in message and "data.dev" not in message
    assert not (Path(bad.dir) / MARKER).exists() and not (Path(leaked.dir) / MARKER).exists()  # checked again next time
