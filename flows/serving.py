"""The MLflow pyfunc model: raw text in, label and probabilities out.

Packaging choice: models-from-code. ``mlflow.pyfunc.log_model(python_model="flows/pyfunc_model.py",
artifacts={"model_dir": <save_pretrained dir>})`` stores that three-line file, which builds the
model object from the installed ``flows.serving`` module at load time, so nothing is pickled
(neither torch objects nor the wrapper). The weights travel as the ``model_dir`` artifact
(safetensors + JSON + tokenizer files) and are loaded in ``load_context`` with
``selfattn.checkpoint.load_pretrained``, which never unpickles and refuses any other file.
``selfattn predict`` does not even run the stored code: it reads the weights directory only
(``flows.recovery.load_classifier``).

Input: a list of strings, one string, a one-column DataFrame (any column name, ``text``
preferred), or bytes. Output: a DataFrame with ``label`` (the class value), ``label_index``,
``score`` (its probability), ``prob_<label>`` per class and ``warning`` ("" when none); with
``params={"explain": METHOD}`` also ``attributions`` (see :func:`add_attributions`).
Empty strings, very long inputs (truncated to the model's context, with a warning) and invalid
UTF-8 (replaced with U+FFFD, with a warning) never raise.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

try:  # mlflow is a dependency of the flows layer; the import is cheap (no tracking set up)
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc, assignment]

log = logging.getLogger(__name__)

BATCH_SIZE = 64
INPUT_EXAMPLE = ["a gripping , beautifully acted film .", "a dull , lifeless mess ."]


def _to_text(value: Any) -> tuple[str, str]:
    """One input item -> (clean text, warning). Never raises."""
    if value is None:
        return "", "missing input (None); treated as empty text"
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8"), ""
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace"), "invalid UTF-8 replaced with U+FFFD"
    if not isinstance(value, str):
        try:
            import math

            if isinstance(value, float) and math.isnan(value):
                return "", "missing input (NaN); treated as empty text"
        except Exception:  # pragma: no cover
            pass
        value = str(value)
    try:
        value.encode("utf-8")
        return value, ""
    except UnicodeEncodeError:  # lone surrogates (e.g. from surrogateescape decoding)
        return value.encode("utf-8", errors="replace").decode("utf-8"), "invalid UTF-8 replaced with U+FFFD"


def as_texts(model_input: Any) -> list[Any]:
    """Normalise the accepted input shapes to a list of items."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, (str, bytes, bytearray)):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 0:
            return []
        col = "text" if "text" in model_input.columns else model_input.columns[0]
        return list(model_input[col])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, np.ndarray):
        return list(model_input.reshape(-1))
    if isinstance(model_input, dict):
        value = model_input.get("text", next(iter(model_input.values()), []))
        return as_texts(value)
    return list(model_input)


class SelfattnClassifier(PythonModel):
    """pyfunc wrapper around a ``save_pretrained`` classifier directory (artifact ``model_dir``)."""

    def __init__(self) -> None:
        self._pre = None

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts["model_dir"])

    def load(self, model_dir: str) -> "SelfattnClassifier":
        from selfattn.checkpoint import load_pretrained

        pre = load_pretrained(model_dir)
        if pre.task != "classifier":
            raise ValueError(f"model_dir {model_dir} holds a {pre.task!r} model, expected a classifier")
        if pre.tokenizer is None:
            raise ValueError(f"model_dir {model_dir} has no tokenizer")
        self._pre = pre
        return self

    @property
    def labels(self) -> list[Any]:
        extra = self._pre.extra if isinstance(self._pre.extra, dict) else {}
        labels = extra.get("labels") or (extra.get("data") or {}).get("labels")
        n = self._pre.config.n_classes or 2
        return list(labels) if labels and len(labels) == n else list(range(n))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as a schema
        items = as_texts(model_input)
        return add_attributions(self, self.predict_texts(items), items, params)

    def predict_texts(self, items: Sequence[Any]):
        """Items (str/bytes/None) -> DataFrame (label, label_index, score, prob_*, warning)."""
        import pandas as pd
        import torch

        if self._pre is None:
            raise RuntimeError("SelfattnClassifier has no model loaded (load_context was not called)")
        model, tok, cfg = self._pre.model, self._pre.tokenizer, self._pre.config
        labels = self.labels
        max_len = cfg.context_length
        fallback = tok.bos_id if getattr(tok, "bos_id", None) is not None else tok.pad_id
        ids_list, notes = [], []
        for item in items:
            text, note = _to_text(item)
            text = text.strip()
            try:
                ids = tok.encode(text)
            except Exception as exc:  # a tokenizer must never take the server down
                ids, note = [], f"could not tokenize ({type(exc).__name__}); predicted from an empty input"
            if not ids:
                ids = [fallback]
                note = note or "empty input; the prediction is the model's prior"
            if len(ids) > max_len:
                warnings.warn(f"input of {len(ids)} tokens truncated to the model's context ({max_len})", stacklevel=2)
                note = "; ".join(n for n in (note, f"truncated from {len(ids)} to {max_len} tokens") if n)
                ids = ids[:max_len]
            ids_list.append(ids)
            notes.append(note)
        probs_rows: list[list[float]] = []
        model.eval()
        with torch.inference_mode():
            for i in range(0, len(ids_list), BATCH_SIZE):
                chunk = ids_list[i : i + BATCH_SIZE]
                T = max(len(x) for x in chunk)
                input_ids = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)  # [B, T]
                mask = torch.zeros((len(chunk), T), dtype=torch.bool)  # [B, T]
                for j, x in enumerate(chunk):
                    input_ids[j, : len(x)] = torch.tensor(x, dtype=torch.long)
                    mask[j, : len(x)] = True
                logits = model(input_ids, mask).logits.float()  # [B, C]
                probs_rows.extend(torch.softmax(logits, dim=-1).tolist())
        rows = []
        for probs, note in zip(probs_rows, notes):
            k = max(range(len(probs)), key=probs.__getitem__)
            row = {"label": labels[k], "label_index": k, "score": probs[k]}
            row.update({f"prob_{lab}": p for lab, p in zip(labels, probs)})
            row["warning"] = note
            rows.append(row)
        columns = ["label", "label_index", "score", *[f"prob_{lab}" for lab in labels], "warning"]
        return pd.DataFrame(rows, columns=columns)


# request params (in the signature, so `mlflow models serve` passes them through); "none" = no explanation
EXPLAIN_PARAMS = {"explain": "none", "explain_steps": 32, "explain_unit": "token"}


def explain_items(clf: SelfattnClassifier, items: Sequence[Any], *, method: str, steps: int = 32, targets: Sequence[int] | None = None):
    """``selfattn.interpret.Attribution`` per item, on the same cleaned text ``predict_texts`` scores."""
    from selfattn.interpret import explain

    if clf._pre is None:
        raise RuntimeError("SelfattnClassifier has no model loaded (load_context was not called)")
    texts = [_to_text(item)[0].strip() for item in items]
    return explain(clf._pre.model, clf._pre.tokenizer, texts, method=method, steps=steps, targets=targets)


def add_attributions(clf: SelfattnClassifier, frame, items: Sequence[Any], params: dict[str, Any] | None):
    """``frame`` plus an ``attributions`` column (one ``[[token, score], ...]`` per row) when
    ``params["explain"]`` names a method; a bad method or unit is a 400 for the server, not a 500."""
    params = {**EXPLAIN_PARAMS, **(params or {})}
    method = str(params["explain"] or "none")
    if method == "none":
        return frame
    from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

    from selfattn.errors import UserError

    try:
        attrs = explain_items(clf, items, method=method, steps=int(params["explain_steps"]), targets=list(frame["label_index"]))
        frame["attributions"] = [a.pairs(str(params["explain_unit"])) for a in attrs]
    except UserError as exc:
        raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
    return frame


def signature_and_example(clf: SelfattnClassifier):
    """Signature inferred from a real prediction on the input example."""
    import pandas as pd
    from mlflow.models import infer_signature

    # an unnamed string column: a list of str and a one-column DataFrame (any name) both fit
    sig = infer_signature(list(INPUT_EXAMPLE), clf.predict_texts(INPUT_EXAMPLE), params=EXPLAIN_PARAMS)
    return sig, pd.DataFrame({"text": INPUT_EXAMPLE})


def log_model(model_dir: str, *, name: str = "model", registered_model_name: str | None = None):
    """Log ``model_dir`` as a pyfunc on the active run; returns the ``ModelInfo``."""
    import mlflow

    clf = SelfattnClassifier().load(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signature, example = signature_and_example(clf)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # models-from-code: no pickle
            artifacts={"model_dir": str(model_dir)},
            signature=signature,
            input_example=example,
            registered_model_name=registered_model_name,
            pip_requirements=_requirements(),
        )


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("selfattn", "torch", "tokenizers", "safetensors", "mlflow", "pandas"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def predict(model_uri: str, texts: Sequence[str]):
    """Load a pyfunc (``models:/NAME@champion``, ``runs:/...``) and predict ``texts``."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    return model.predict(list(texts))
