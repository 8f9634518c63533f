"""selfattn.utils: the JSON-object reader every layer uses, and the lazy exports of the packages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfattn.errors import UserError
from selfattn.utils import lazy_exports, read_json_object


def test_read_json_object_names_the_file_and_what_is_wrong(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"task": "lm", "n": 1}')
    assert read_json_object(good) == {"task": "lm", "n": 1}
    cases = {
        "missing.json": (None, "file not found: .*missing.json"),
        "broken.json": ("{not json", "broken.json is not valid JSON"),
        "latin1.json": (b'{"a": "\xe9"}', "latin1.json is not valid JSON"),
        "list.json": ("[1, 2]", "list.json must hold a JSON object"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(UserError, match=message):
            read_json_object(path)
    with pytest.raises(UserError, match="^not a checkpoint: config.json is missing$"):
        read_json_object(tmp_path / "config.json", missing="not a checkpoint: config.json is missing")


def test_lazy_exports_resolve_on_first_access_and_import_nothing_before():
    getattr_, dir_ = lazy_exports("selfattn", {"UserError": "selfattn.errors"}, extra=["__version__"])
    assert getattr_("UserError") is UserError and dir_() == ["UserError", "__version__"]
    with pytest.raises(AttributeError, match="module 'selfattn' has no attribute 'nope'"):
        getattr_("nope")
    # a fresh interpreter: importing the packages pulls in no torch until a name is used
    code = (
        "import sys, selfattn, selfattn.train; assert 'torch' not in sys.modules; "
        "assert 'MultiHeadAttention' in dir(selfattn) and 'pretrain' in dir(selfattn.train); "
        "selfattn.MultiHeadAttention; assert 'torch' in sys.modules and 'MultiHeadAttention' in vars(selfattn)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
