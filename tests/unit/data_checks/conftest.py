"""Fixtures for the data_checks tests: small good data sets written to tmp_path, and the real
SST-2 train report computed once per session (validating 67k rows is the expensive part)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .dc_data import corpus_text, make_rows, tsv_text


@pytest.fixture()
def write(tmp_path):
    """``write(name, text_or_bytes) -> Path`` inside tmp_path."""

    def _write(name: str, content: str | bytes) -> Path:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_bytes(content.encode("utf-8"))
        return path

    return _write


@pytest.fixture()
def good_tsv(write) -> Path:
    return write("good.tsv", tsv_text(make_rows()))


@pytest.fixture()
def good_corpus(write) -> Path:
    return write("good.txt", corpus_text())


@pytest.fixture(scope="session")
def sst2_train_report(data_dir):
    """The real SST-2 train file validated once for the whole session."""
    from data_checks import validate

    return validate(data_dir / "sst2" / "train.tsv")
