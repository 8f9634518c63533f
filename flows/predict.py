"""What ``selfattn predict`` needs besides the model: argv texts made valid UTF-8, and a classifier
loaded from a registry URI or a directory without unpickling anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.serving import SelfattnClassifier, _to_text
from selfattn.errors import UserError

__all__ = ["clean_texts", "load_classifier", "merge_notes", "resolve_model"]


def clean_texts(texts: list[Any]) -> tuple[list[str], list[str]]:
    """Command-line texts -> valid UTF-8 strings and a note per text ("" when unchanged).

    Bytes that are not UTF-8 reach Python's argv as lone surrogates (``surrogateescape``); MLflow's
    schema check and ``print`` both fail on them, so they become U+FFFD here, with a note.
    """
    pairs = [_clean_str(t) if isinstance(t, str) else _to_text(t) for t in texts]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _clean_str(text: str) -> tuple[str, str]:
    """Undo ``surrogateescape`` to the original bytes, then decode them with U+FFFD for bad ones."""
    try:
        text.encode("utf-8")
        return text, ""
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # argv bytes that were not UTF-8
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # other lone surrogates
    return raw.decode("utf-8", "replace"), "invalid UTF-8 replaced with U+FFFD"


def merge_notes(frame: Any, notes: list[str]) -> Any:
    """Prepend ``notes`` to the ``warning`` column of a prediction frame."""
    if "warning" in frame.columns and any(notes):
        frame["warning"] = ["; ".join(x for x in (n, w) if x) for n, w in zip(notes, frame["warning"])]
    return frame


def resolve_model(model: str | None, home: Path) -> str:
    """``--model`` as given, else the champion of the model this home's last pipeline run registered.

    A ``models:/`` URI that the store cannot resolve is refused here, naming the store and listing
    its registered models (the configured MLflow store must be set up before this is called).
    """
    from flows.summary import last_model_name
    from flows.tracking import registry

    if model is None:
        name = last_model_name(home)
        if name is None:
            models = registry.registered_models()
            there = ", ".join(models) if models else "none yet"
            raise UserError(
                f"no --model given and no pipeline run in {home} registered a model (`selfattn run` does); "
                f"pass --model models:/NAME@champion (registered models in {registry.registry_uri()}: {there})"
            )
        model = f"models:/{name}@{registry.CHAMPION}"
    registry.check_model_uri(model)
    return model


def load_classifier(model_uri: str) -> Any:
    """A ``SelfattnClassifier`` for ``model_uri`` without unpickling anything.

    ``models:/NAME@alias``, ``models:/NAME/VERSION`` and ``runs:/ID/model`` are downloaded from
    the configured MLflow store; a local path may be a ``save_pretrained`` directory or a logged
    pyfunc directory (``MLmodel``). Either way only the weights directory is read, with
    :func:`selfattn.io.checkpoint.load_pretrained` (safetensors + JSON); MLflow's
    ``python_model.pkl`` (cloudpickle) is never loaded, so a planted pickle is never run.
    """
    if "://" in model_uri or model_uri.startswith(("models:/", "runs:/")):
        from flows.tracking.runs import download

        root = download(model_uri)
    else:
        root = Path(model_uri).expanduser()
        if not root.exists():
            raise UserError(f"model {model_uri!r} not found (a models:/ or runs:/ URI, or a model directory)")
    if (root / "config.json").is_file():
        return SelfattnClassifier().load(str(root))
    found = sorted(p.parent for p in (root / "artifacts").rglob("config.json") if (p.parent / "model.safetensors").is_file()) if (root / "MLmodel").is_file() else []
    if len(found) != 1:
        raise UserError(
            f"model {model_uri!r} is neither a save_pretrained directory nor a selfattn pyfunc "
            f"(expected artifacts/<dir> with model.safetensors and config.json; found {len(found)})"
        )
    return SelfattnClassifier().load(str(found[0]))
