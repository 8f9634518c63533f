"""Evaluation: LM loss/perplexity, classification accuracy, macro-F1, confusion matrix, ECE.

The metric functions live in :mod:`selfattn.eval.metrics` (re-exported here); the model-driven helpers (``lm_loss``, ``classifier_predictions``) are shared with the training
engine; :func:`evaluate_checkpoint` evaluates a ``save_pretrained`` directory on data and writes
``metrics.json`` plus plots under an output directory; :func:`evaluate_ensemble` does the same for
several classifiers whose class probabilities are averaged.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from selfattn.errors import UserError
from selfattn.eval.metrics import (  # noqa: F401 - re-exported
    classification_metrics,
    expected_calibration_error,
    perplexity,
    reliability_bins,
)
from selfattn.utils import atomic_write_text, autocast_context, read_json_object

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from selfattn.data.config import ClassificationDataConfig, LMDataConfig


# --------------------------------------------------------------------------- model-driven


def lm_loss(model: "torch.nn.Module", batches: Iterable[tuple["torch.Tensor", "torch.Tensor"]], *, device: "torch.device", amp_dtype: "torch.dtype | None" = None) -> float:
    """Mean next-token loss over ``batches`` of ``(x [B,T], y [B,T])`` (token-weighted)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast_context(device, amp_dtype):
                out = model(x, targets=y)
            total += out.loss.double() * y.numel()
            count += y.numel()
    model.train(was_training)
    if count == 0:
        raise UserError("no validation tokens to evaluate")
    return float(total) / count


def masked_lm_loss(model: "torch.nn.Module", batches: Iterable[dict[str, "torch.Tensor"]], *, device: "torch.device", amp_dtype: "torch.dtype | None" = None) -> float:
    """Mean masked-token loss over ``batches`` of ``{"input_ids", "labels"}`` (weighted by masked tokens)."""
    import torch

    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    with torch.no_grad():
        for b in batches:
            x, y = b["input_ids"].to(device), b["labels"].to(device)
            n = int((y != -100).sum())
            if n == 0:
                continue
            with autocast_context(device, amp_dtype):
                out = model(x, labels=y)
            total += out.loss.double() * n
            count += n
    model.train(was_training)
    if count == 0:
        raise UserError("no masked validation tokens to evaluate")
    return float(total) / count


def classifier_predictions(model: "torch.nn.Module", batches: Iterable[tuple["torch.Tensor", dict[str, "torch.Tensor"]]], n: int, *, device: "torch.device", amp_dtype: "torch.dtype | None" = None) -> tuple["np.ndarray", "np.ndarray", float]:
    """``(probs [N, C], labels [N], mean loss)`` with rows put back in data order."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    probs: np.ndarray | None = None
    labels = np.zeros(n, dtype=np.int64)
    total = 0.0
    with torch.no_grad():
        for idx, b in batches:
            with autocast_context(device, amp_dtype):
                out = model(b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device))
            logits = out.logits.float()
            y = b["labels"].to(device)
            total += float(F.cross_entropy(logits, y, reduction="sum"))
            p = torch.softmax(logits, dim=-1).cpu().numpy()
            if probs is None:
                probs = np.zeros((n, p.shape[1]), dtype=np.float64)
            probs[idx.numpy()] = p
            labels[idx.numpy()] = b["labels"].numpy()
    model.train(was_training)
    if probs is None:
        raise UserError("no validation examples to evaluate")
    return probs, labels, total / n


# --------------------------------------------------------------------------- checkpoints


def evaluate_checkpoint(model_dir: str | Path, data: "ClassificationDataConfig | LMDataConfig | str | Path", out_dir: str | Path, *, batch_size: int = 64, device: str = "auto", n_attention_examples: int = 3, learning_curves: bool = True) -> dict[str, Any]:
    """Evaluate a ``save_pretrained`` directory; writes ``out_dir/metrics.json`` and ``out_dir/plots/``.

    ``data`` is a data config (classifier: its ``val_path``, or the held-out ``val_fraction`` of
    ``train_path``; LM: the held-out last ``val_fraction`` of the corpus, every block once) or a
    file path (classifier: every row, read with the columns/labels the model was trained with;
    LM: the whole file). Plots: confusion matrix, reliability diagram and attention maps of the
    first ``n_attention_examples`` texts (classifier), and learning curves when a ``history.json``
    sits next to ``model_dir``. Returns the metrics dict (also written as JSON).
    """
    from selfattn.data.config import ClassificationDataConfig, LMDataConfig
    from selfattn.devices import resolve_device
    from selfattn.io.checkpoint import load_pretrained

    dev = resolve_device(device)
    pre = load_pretrained(model_dir, map_location=dev)
    if pre.tokenizer is None:
        raise UserError(f"checkpoint {model_dir} has no tokenizer/; cannot evaluate on text")
    out = Path(out_dir)
    plots = out / "plots"
    saved_data = (pre.extra or {}).get("data") or {}
    if pre.task == "classifier":
        if isinstance(data, (str, Path)):
            data = _file_data_config(pre, data)
        if not isinstance(data, ClassificationDataConfig):
            raise UserError(f"checkpoint {model_dir} is a classifier; evaluate it on labelled data (a ClassificationDataConfig or a file)")
        metrics = _evaluate_classifier(pre, data, plots, batch_size=batch_size, device=dev, n_attention_examples=n_attention_examples)
    elif pre.task == "encoder":
        raise UserError(f"checkpoint {model_dir} is an encoder without a head: fine-tune it (init_from) or pretrain it (objective=mlm) first")
    else:
        whole = isinstance(data, (str, Path))
        if whole:
            base = {k: v for k, v in saved_data.items() if k in LMDataConfig.model_fields}
            base.update(path=str(data))
            data = LMDataConfig.model_validate(base)
        if not isinstance(data, LMDataConfig):
            raise UserError(f"checkpoint {model_dir} is a language model; evaluate it on a corpus (an LMDataConfig or a file)")
        metrics = _evaluate_lm(pre, data, whole=whole, batch_size=batch_size, device=dev)
    metrics["model_dir"] = str(model_dir)
    history_file = Path(model_dir).parent / "history.json"
    if learning_curves and history_file.is_file():
        from selfattn.eval.plots import plot_learning_curves

        history = json.loads(history_file.read_text())
        if history:
            plot_learning_curves(history, plots / "learning_curves.png")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def data_config_for(model_dir: str | Path, data: str, overrides: Sequence[str] = ()) -> "ClassificationDataConfig | LMDataConfig | str":
    """The data config to evaluate ``model_dir`` on: ``data`` is a data file / hub id (columns and
    labels as in training, whole file) or a YAML file holding the data section; ``overrides`` are
    dotted ``key=value`` settings of that section. Without overrides a plain path is returned as is.
    """
    from selfattn.config import load_config
    from selfattn.data.config import ClassificationDataConfig, LMDataConfig

    meta = read_json_object(Path(model_dir) / "config.json", missing=f"{model_dir} is not a checkpoint: config.json is missing")
    schema = ClassificationDataConfig if meta.get("task") == "classifier" else LMDataConfig
    if data.endswith((".yaml", ".yml")):
        return load_config(schema, data, overrides)
    if not overrides:
        return data
    saved = ((meta.get("extra") or {}).get("data") or {})
    base = {k: v for k, v in saved.items() if k in schema.model_fields}
    base.update({"train_path": data, "val_path": data} if schema is ClassificationDataConfig else {"path": data})
    return load_config(schema, None, overrides, base=base)


def _evaluate_lm(pre: Any, data: "LMDataConfig", *, whole: bool, batch_size: int, device: "torch.device") -> dict[str, Any]:
    import torch

    from selfattn.data.lm import (
        encode_corpus,
        lm_eval_batches,
        load_corpus,
        prepare_lm_data,
    )

    block = min(data.block_size, pre.config.context_length)
    if whole:
        ids = torch.tensor(encode_corpus(load_corpus(data), pre.tokenizer), dtype=torch.int64)
        if len(ids) < block + 2:
            raise UserError(f"corpus {data.path!r} has {len(ids)} tokens, too few for one block of {block}")
    else:
        ids = prepare_lm_data(data.model_copy(update={"block_size": block}), pre.tokenizer).val_ids
    if pre.task == "mlm":  # masked tokens (a fixed seed), as the training's validation
        from selfattn.data.mlm import MLMMasking, mlm_eval_batches

        train_cfg = (pre.extra or {}).get("train_config") or {}
        masking = MLMMasking.for_tokenizer(pre.tokenizer, train_cfg.get("mlm_probability", 0.15))
        loss = masked_lm_loss(pre.model, mlm_eval_batches(ids, masking, block_size=block, batch_size=batch_size, n_batches=None), device=device)
    else:
        loss = lm_loss(pre.model, lm_eval_batches(ids, block_size=block, batch_size=batch_size, n_batches=None), device=device)
    return {"task": pre.task, "loss": loss, "perplexity": perplexity(loss), "tokens": int(len(ids)), "block_size": block}


def _file_data_config(pre: Any, path: str | Path) -> "ClassificationDataConfig":
    """Every row of ``path``, read with the columns and labels ``pre`` was trained with."""
    from selfattn.data.config import ClassificationDataConfig

    saved = (pre.extra or {}).get("data") or {}
    base = {k: v for k, v in saved.items() if k in ClassificationDataConfig.model_fields}
    base.update(train_path=str(path), val_path=str(path))
    return ClassificationDataConfig.model_validate(base)


def _classifier_probs(pre: Any, data: "ClassificationDataConfig", *, batch_size: int, device: "torch.device") -> tuple[Any, "np.ndarray", "np.ndarray", float]:
    """``(rows, probs [N, C], labels [N], mean loss)`` of ``pre`` on ``data``'s evaluation rows."""
    from selfattn.data.classification import classification_eval_batches

    val = _classifier_rows(pre, data)
    batches = classification_eval_batches(val, batch_size=batch_size, pad_id=pre.tokenizer.pad_id)
    return (val, *classifier_predictions(pre.model, batches, len(val), device=device))


def _classifier_rows(pre: Any, data: "ClassificationDataConfig") -> Any:
    """The rows to score, encoded with ``pre``'s tokenizer (``data.val_path``, or the held-out part of train)."""
    from selfattn.data.classification import (
        encode_labelled,
        prepare_classification_data,
        read_labelled,
    )

    n_classes = pre.config.n_classes
    if len(data.labels) != n_classes:
        raise UserError(f"data.labels {data.labels} has {len(data.labels)} classes but the model predicts {n_classes}")
    max_len = min(data.max_length, pre.config.context_length)
    if data.val_path:
        texts, labels = read_labelled(data.val_path, split=data.val_split, text_column=data.text_column, label_column=data.label_column, labels=data.labels)
        return encode_labelled(texts, labels, pre.tokenizer, max_len, source=f"data {data.val_path}")
    return prepare_classification_data(data, pre.tokenizer, max_length=max_len)[1]


def _evaluate_classifier(pre: Any, data: "ClassificationDataConfig", plots: Path, *, batch_size: int, device: "torch.device", n_attention_examples: int) -> dict[str, Any]:
    val, probs, y, loss = _classifier_probs(pre, data, batch_size=batch_size, device=device)
    probs, loss, raw = _calibrated(pre, probs, y, loss)
    metrics = _classifier_report(probs, y, loss, data.labels, plots, texts=val.texts, raw_probs=raw)
    if val.texts and n_attention_examples:
        _attention_plots(pre, val.texts[:n_attention_examples], plots, min(data.max_length, pre.config.context_length))
    return {**metrics, "n_truncated": val.n_truncated}


def _classifier_report(probs: "np.ndarray", y: "np.ndarray", loss: float, labels: Sequence[int | str], plots: Path, *, texts: Sequence[str] | None, raw_probs: "np.ndarray | None" = None) -> dict[str, Any]:
    """Metrics of class probabilities ``probs [N, C]`` against ``y [N]``; writes the confusion and
    reliability plots and ``predictions.tsv`` beside ``plots/`` (one row per example, for error analysis).
    ``raw_probs``: the uncalibrated probabilities when ``probs`` are temperature-scaled (their ECE is
    reported as ``ece_uncalibrated`` and drawn in the reliability diagram too)."""
    from selfattn.eval.plots import plot_confusion_matrix, plot_reliability_diagram

    m = classification_metrics(y, probs)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    plot_confusion_matrix(m["confusion_matrix"], list(labels), plots / "confusion_matrix.png")
    before = None if raw_probs is None else raw_probs.max(axis=1)
    plot_reliability_diagram(conf, pred == y, plots / "reliability.png", uncalibrated=before)
    write_predictions(plots.parent / PREDICTIONS_FILE, probs, y, labels, texts)
    if before is not None:
        m["ece_uncalibrated"] = expected_calibration_error(before, raw_probs.argmax(axis=1) == y)
    return {"task": "classifier", "loss": loss, **m, "labels": list(labels)}


# --------------------------------------------------------------------------- calibration


def _calibrated(pre: Any, probs: "np.ndarray", y: "np.ndarray", loss: float) -> tuple["np.ndarray", float, "np.ndarray | None"]:
    """``(served probs, their NLL, raw probs or None)``: the checkpoint's stored temperature applied."""
    import numpy as np

    from selfattn.eval.calibration import scale_probs, temperature_of

    temperature = temperature_of(pre.extra)
    if temperature == 1.0:
        return probs, loss, None
    scaled = scale_probs(probs, temperature)
    return scaled, float(-np.log(np.clip(scaled[np.arange(len(y)), y], 1e-12, None)).mean()), probs


def calibrate_checkpoint(model_dir: str | Path, data: "ClassificationDataConfig | None" = None, *, batch_size: int = 64, device: str = "auto", write: bool = True) -> dict[str, Any]:
    """Fit a temperature on held-out rows and (``write``) store it in ``model_dir/config.json``.

    ``data`` defaults to the data config the model was fine-tuned with, so the rows are its own
    validation split (``val_path``, or the held-out ``val_fraction`` of train), never the set the
    model is finally scored on. Returns the temperature, the row count, and NLL and ECE (the
    function of ``metrics.json``) before and after on those rows.
    """
    from selfattn.data.config import ClassificationDataConfig
    from selfattn.devices import resolve_device
    from selfattn.eval.calibration import (
        fit_temperature,
        logits_from_probs,
        nll,
        save_temperature,
        scale_probs,
    )
    from selfattn.io.checkpoint import load_pretrained

    dev = resolve_device(device)
    pre = load_pretrained(model_dir, map_location=dev)
    if pre.task != "classifier" or pre.tokenizer is None:
        raise UserError(f"calibration needs a classifier with a tokenizer; {model_dir} holds a {pre.task!r} model")
    if data is None:
        saved = (pre.extra or {}).get("data")
        if not saved:
            raise UserError(f"{model_dir} records no training data config (extra.data); pass the held-out data to calibrate on")
        data = ClassificationDataConfig.model_validate(saved)
    _, probs, y, _ = _classifier_probs(pre, data, batch_size=batch_size, device=dev)
    logits = logits_from_probs(probs)  # [N, C]
    temperature = fit_temperature(logits, y)
    after = scale_probs(probs, temperature)
    report = {
        "temperature": temperature,
        "n": int(len(y)),
        "nll_before": nll(logits, y),
        "nll_after": nll(logits, y, temperature),
        "ece_before": expected_calibration_error(probs.max(axis=1), probs.argmax(axis=1) == y),
        "ece_after": expected_calibration_error(after.max(axis=1), after.argmax(axis=1) == y),
        "fitted_on": data.val_path or f"held-out {data.val_fraction} of {data.train_path} ({data.val_holdout})",
    }
    if write:
        save_temperature(model_dir, temperature, report)
    return report


PREDICTIONS_FILE = "predictions.tsv"


def write_predictions(path: Path, probs: "np.ndarray", y: "np.ndarray", labels: Sequence[int | str], texts: Sequence[str] | None) -> Path:
    """``path``: a TSV with row, label, prediction, confidence, correct (and text when known)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["row", "label", "prediction", "confidence", "correct"] + (["text"] if texts is not None else []))
        for i, (p, t) in enumerate(zip(probs, y)):
            k = int(p.argmax())
            w.writerow([i, labels[int(t)], labels[k], f"{p[k]:.6f}", int(k == int(t))] + ([texts[i]] if texts is not None else []))
    return path


def read_correct(path: str | Path) -> "np.ndarray":
    """The ``correct`` column (0/1 per row) of a ``predictions.tsv`` written by the evaluation."""
    import csv

    import numpy as np

    with Path(path).open(encoding="utf-8", newline="") as f:
        return np.asarray([int(row["correct"]) for row in csv.DictReader(f, delimiter="\t")], dtype=np.int64)


def paired_bootstrap(correct_a: Sequence[int], correct_b: Sequence[int], *, n_resamples: int = 10_000, seed: int = 0) -> dict[str, float]:
    """Accuracy difference b - a on the same rows with a 95% paired-bootstrap interval, and the share
    of resamples in which b is not better (a one-sided p-value)."""
    import numpy as np

    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"correct_a {a.shape} and correct_b {b.shape} must be equal-length, non-empty 1-D arrays")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(n_resamples, len(a)))
    diffs = (b[idx] - a[idx]).mean(axis=1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    return {"diff": float((b - a).mean()), "ci_low": float(lo), "ci_high": float(hi), "p_not_better": float((diffs <= 0).mean())}


def evaluate_ensemble(model_dirs: Sequence[str | Path], data: "ClassificationDataConfig | str | Path", out_dir: str | Path, *, batch_size: int = 64, device: str = "auto") -> dict[str, Any]:
    """Evaluate classifiers together: the mean of their class probabilities is the prediction.

    Each member's probabilities are its served ones: scaled by the temperature stored in its
    checkpoint (1 when none), as ``selfattn predict`` and the pyfunc serve it; when any member has
    one, the mean of the raw probabilities gives ``ece_uncalibrated``.

    Each member reads ``data`` with its own tokenizer (members may differ in tokenizer, size and
    architecture), and all must score the same rows with the same labels. ``data`` is as for
    :func:`evaluate_checkpoint` (a file: every row, columns and labels as the first member was
    trained with). Writes ``out_dir/metrics.json`` (with each member's accuracy under ``members``)
    and the confusion-matrix and reliability plots; returns the metrics.
    """
    import numpy as np

    from selfattn.devices import resolve_device
    from selfattn.io.checkpoint import load_pretrained

    if not model_dirs:
        raise UserError("evaluate_ensemble needs at least one model directory, got none")
    dev = resolve_device(device)
    out = Path(out_dir)
    total: np.ndarray | None = None  # the sum of the members' served (temperature-scaled) probabilities
    total_raw: np.ndarray | None = None  # ... and of their raw ones
    y_ref, members, any_scaled = None, [], False
    for model_dir in model_dirs:
        pre = load_pretrained(model_dir, map_location=dev)
        if pre.task != "classifier" or pre.tokenizer is None:
            raise UserError(f"ensemble member {model_dir} is not a classifier with a tokenizer (task {pre.task!r})")
        if isinstance(data, (str, Path)):
            data = _file_data_config(pre, data)
        val, probs, y, loss = _classifier_probs(pre, data, batch_size=batch_size, device=dev)
        if y_ref is not None and (len(y) != len(y_ref) or (y != y_ref).any()):
            raise UserError(f"ensemble member {model_dir} scored {len(y)} rows that differ from the first member's {len(y_ref)}")
        served, served_loss, raw = _calibrated(pre, probs, y, loss)  # each member as it is served
        any_scaled |= raw is not None
        y_ref, total = y, served if total is None else total + served
        total_raw = probs if total_raw is None else total_raw + probs
        members.append({"model_dir": str(model_dir), "accuracy": float((served.argmax(axis=1) == y).mean()), "loss": served_loss})
    mean = total / len(model_dirs)
    nll = float(-np.log(np.clip(mean[np.arange(len(y_ref)), y_ref], 1e-12, None)).mean())
    raw_mean = total_raw / len(model_dirs) if any_scaled else None
    metrics = _classifier_report(mean, y_ref, nll, data.labels, out / "plots", texts=val.texts, raw_probs=raw_mean)
    metrics.update(n_members=len(model_dirs), members=members, mean_member_accuracy=float(np.mean([m["accuracy"] for m in members])))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _attention_plots(pre: Any, texts: Sequence[str], plots: Path, max_len: int) -> None:
    from selfattn.eval.interpret import attention_maps, plot_attention

    if pre.config.attention == "low_rank":
        return  # attends to projected keys, not tokens: no token-by-token map
    device = next(pre.model.parameters()).device
    for i, text in enumerate(texts):
        tokens, weights = attention_maps(pre.model, pre.tokenizer, text, device=device)  # weights [L, H, T, T]
        plot_attention(tokens[:max_len], weights[:, :, :max_len, :max_len], plots / f"attention_{i}.png")
