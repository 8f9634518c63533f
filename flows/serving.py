"""The MLflow pyfunc model: raw text in, label and probabilities out.

Packaging choice: models-from-code. ``mlflow.pyfunc.log_model(python_model="flows/pyfunc_model.py",
artifacts={"model_dir": <save_pretrained dir>})`` stores that three-line file, which builds the
model object from the installed ``flows.serving`` module at load time, so nothing is pickled
(neither torch objects nor the wrapper). The weights travel as the ``model_dir`` artifact
(safetensors + JSON + tokenizer files) and are loaded in ``load_context`` with
``selfattn.io.checkpoint.load_pretrained``, which never unpickles and refuses any other file.
``selfattn predict`` does not even run the stored code: it reads the weights directory only
(``flows.predict.load_classifier``).

Input: a list of strings, one string, a one-column DataFrame (any column name, ``text``
preferred), a 1-D array, or bytes, in Python and in every REST format (``inputs``, ``instances``,
``dataframe_split``, ``dataframe_records``), each with ``params``. The signature holds the outputs
and the params but no input schema (:func:`signature_and_example`), so MLflow hands the rows over
as sent and :func:`validate_rows` refuses non-strings and nested rows with a 400 naming the row. Output: a DataFrame with ``label`` (the class value), ``label_index``,
``score`` (its probability), ``prob_<label>`` per class and ``warning`` ("" when none). The
probabilities are temperature-scaled when the checkpoint holds a fitted temperature
(``extra.calibration``, written by the evaluate stage; see docs/evaluation.md).
With ``params={"explain": METHOD}`` the output also has ``attributions`` (see :func:`add_attributions`).
Empty strings, very long inputs (truncated to the model's context, with a warning) and invalid
UTF-8 (replaced with U+FFFD, with a warning) never raise.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

from selfattn.eval.calibration import temperature_of

try:  # mlflow is a dependency of the flows layer; the import is cheap (no tracking set up)
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc, assignment]

log = logging.getLogger(__name__)

BATCH_SIZE = 64
# Served requests are bounded before any tokenizing: longer strings are cut (the ``warning``
# column says so), larger batches are refused with a 400 that says how to split them.
MAX_ROWS = 10_000
MAX_TEXT_CHARS = 20_000
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


def _bad_request(message: str) -> Exception:
    """An error the scoring server answers with HTTP 400 and ``message``."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _shown(item: Any) -> str:
    shown = repr(item)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def validate_rows(model_input: Any) -> tuple[list[Any], list[str]]:
    """The served input -> (texts, notes), or a 400 naming the problem (the row, for a bad row).

    Accepted: strings (and bytes from Python callers), one text column. Refused: numbers, nulls,
    booleans, lists or objects as rows, several columns, more than ``MAX_ROWS`` rows. Strings
    longer than ``MAX_TEXT_CHARS`` are cut and noted, so a 10 MB string costs no more than a long
    sentence.
    """
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame) and model_input.shape[1] > 1:
        cols = [str(c) for c in model_input.columns[:5]]
        raise _bad_request(f"expected one column of text, got {model_input.shape[1]} columns ({', '.join(cols)}); send {{\"inputs\": [\"a sentence\", ...]}}")
    if isinstance(model_input, np.ndarray) and model_input.ndim > 1:
        shown = _shown(model_input[0].tolist())
        raise _bad_request(
            f"row 0 is a nested list ({shown}; all rows: shape {list(model_input.shape)}), expected a string; "
            'send one string per row: {"inputs": ["a sentence", ...]}'
        )
    items = as_texts(model_input)
    if not items:
        raise _bad_request('no rows to score; send one string per row: {"inputs": ["a sentence", ...]}')
    if len(items) > MAX_ROWS:
        raise _bad_request(f"{len(items)} rows in one request, more than {MAX_ROWS}; split it into requests of at most {MAX_ROWS} rows")
    texts, notes = [], []
    for i, item in enumerate(items):
        if isinstance(item, (bytes, bytearray)):
            texts.append(item)
            notes.append("")
            continue
        if not isinstance(item, str):
            shown = _shown(item)
            kind = "null" if item is None or (isinstance(item, float) and item != item) else type(item).__name__
            raise _bad_request(f"row {i} is {kind} ({shown}), expected a string; every row must be one sentence as a JSON string")
        if len(item) > MAX_TEXT_CHARS:
            texts.append(item[:MAX_TEXT_CHARS])
            notes.append(f"cut from {len(item)} to {MAX_TEXT_CHARS} characters")
        else:
            texts.append(item)
            notes.append("")
    return texts, notes


class SelfattnClassifier(PythonModel):
    """pyfunc wrapper around a ``save_pretrained`` classifier directory (artifact ``model_dir``)."""

    # MLflow wraps ``predict`` for type-hint validation unless told not to (and advises adding
    # hints on every import); the rows are validated by ``validate_rows`` and the signature
    # comes from a real prediction, so neither the wrapping nor the advice applies
    _skip_type_hint_validation = True

    def __init__(self) -> None:
        self._pre = None

    def load_context(self, context: Any) -> None:
        self.load(context.artifacts["model_dir"])

    def load(self, model_dir: str) -> "SelfattnClassifier":
        from selfattn.io.checkpoint import load_pretrained

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
        texts, notes = validate_rows(model_input)
        return add_attributions(self, self.predict_texts(texts, notes=notes), texts, params)

    def predict_texts(self, items: Sequence[Any], notes: Sequence[str] | None = None):
        """Items (str/bytes/None) -> DataFrame (label, label_index, score, prob_*, warning).

        ``notes`` (one per item, from :func:`validate_rows`) go first in the ``warning`` column.
        """
        import pandas as pd
        import torch

        if self._pre is None:
            raise RuntimeError("SelfattnClassifier has no model loaded (load_context was not called)")
        model, tok, cfg = self._pre.model, self._pre.tokenizer, self._pre.config
        temperature = temperature_of(self._pre.extra)  # fitted on held-out rows; 1.0 = uncalibrated
        labels = self.labels
        max_len = cfg.context_length
        fallback = tok.bos_id if getattr(tok, "bos_id", None) is not None else tok.pad_id
        pre_notes = list(notes) if notes is not None else [""] * len(items)
        ids_list, notes = [], []
        for item, pre_note in zip(items, pre_notes):
            text, note = _to_text(item)
            note = "; ".join(n for n in (pre_note, note) if n)
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
                logits = model(input_ids, mask).logits.float() / temperature  # [B, C]
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
    """``selfattn.eval.interpret.Attribution`` per item, on the same cleaned text ``predict_texts`` scores."""
    from selfattn.eval.interpret import explain

    if clf._pre is None:
        raise RuntimeError("SelfattnClassifier has no model loaded (load_context was not called)")
    texts = [_to_text(item)[0].strip() for item in items]
    # the served probabilities are temperature-scaled: explain those, not the raw softmax
    temperature = temperature_of(clf._pre.extra)
    return explain(clf._pre.model, clf._pre.tokenizer, texts, method=method, steps=steps, targets=targets, temperature=temperature)


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
    """Outputs and params inferred from a real prediction; no input schema. The example is a list of strings.

    Why no input schema: with one, MLflow converts or refuses the input before ``predict`` sees it.
    A string column makes the scoring server cast ``[1, 2, null]`` to the sentences "1", "2",
    "None"; an object tensor refuses a plain list of strings (the input users pass first). Without
    one, every shape arrives as sent and :func:`validate_rows` decides, naming the bad row. The
    params stay in the signature, so ``mlflow models serve`` passes ``params`` through.
    """
    from mlflow.models import ModelSignature, infer_signature

    inferred = infer_signature(list(INPUT_EXAMPLE), clf.predict_texts(INPUT_EXAMPLE), params=EXPLAIN_PARAMS)
    return ModelSignature(inputs=None, outputs=inferred.outputs, params=inferred.params), list(INPUT_EXAMPLE)


def log_model(model_dir: str, *, name: str = "model", registered_model_name: str | None = None, run_id: str | None = None):
    """Log ``model_dir`` as a pyfunc on ``run_id`` (default: the active run); returns the ``ModelInfo``.

    ``Model.log(run_id=...)`` (what ``mlflow.pyfunc.log_model`` calls, minus the run argument) logs
    onto a run that is not this thread's active one, without resuming or ending it.
    """
    import mlflow
    from mlflow.models import Model

    clf = SelfattnClassifier().load(model_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        signature, example = signature_and_example(clf)
        return Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            run_id=run_id,
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

    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    return model.predict(pd.DataFrame({"text": list(texts)}))  # a list does not fit the tensor signature
