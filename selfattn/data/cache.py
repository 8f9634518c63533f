"""The token cache: tokenized data stored as ``.npz`` under ``$SELFATTN_HOME/cache/tokens``, keyed by a
digest of the source, the settings and the tokenizer."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from selfattn.data.paths import cache_dir
from selfattn.utils import atomic_path

if TYPE_CHECKING:  # pragma: no cover

    pass


def cache_key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def cache_load(key: str) -> dict[str, Any] | None:
    import numpy as np

    f = cache_dir() / "tokens" / f"{key}.npz"
    if not f.is_file():
        return None
    try:
        with np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None


def cache_save(key: str, **arrays: Any) -> None:
    import numpy as np

    with atomic_path(cache_dir() / "tokens" / f"{key}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
