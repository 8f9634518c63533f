"""A self-contained HTML page of explained examples: each word on a background coloured by its
attribution (green: for the predicted class, red: against), with the label, prediction and confidence.

``write_examples_page`` picks the most confident right and the most confident wrong predictions
from an evaluation's ``predictions.tsv`` and explains them with :func:`selfattn.eval.interpret.explain`.
"""

from __future__ import annotations

import csv
import html
from pathlib import Path
from typing import Any, Sequence

from selfattn.eval.interpret import Attribution, explain, score_colour
from selfattn.utils import atomic_write_text

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }
.ex { margin: 0.8em 0 1.4em; }
.meta { font-size: 0.85em; color: #555; margin-bottom: 0.3em; }
.w { padding: 0.1em 0.15em; margin: 0 0.05em; border-radius: 3px; line-height: 2; }
.note { color: #a60; }
"""


def attributions_html(sections: Sequence[tuple[str, Sequence[tuple[Attribution, str]]]], *, title: str) -> str:
    """The page: one ``<h2>`` per ``(heading, [(attribution, caption), ...])`` section."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>Background: green = pushes towards the predicted class, red = against; "
             "the strongest word of each sentence has the full colour.</p>"]  # fmt: skip
    for heading, examples in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if not examples:
            parts.append("<p class='meta'>none</p>")
        for attr, caption in examples:
            words = attr.words()
            scale = max((abs(s) for _, s in words), default=0.0)
            spans = "".join(
                f"<span class='w' style='background:{score_colour(s, scale)}' title='{s:+.4f}'>{html.escape(w)}</span> "
                for w, s in words
            )
            note = f" <span class='note'>[{html.escape(attr.note)}]</span>" if attr.note else ""
            parts.append(f"<div class='ex'><div class='meta'>{html.escape(caption)}{note}</div>{spans}</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _pick(rows: list[dict[str, str]], correct: bool, n: int) -> list[dict[str, str]]:
    chosen = [r for r in rows if (r["correct"] == "1") == correct and r.get("text", "").strip()]
    return sorted(chosen, key=lambda r: -float(r["confidence"]))[:n]


def write_examples_page(
    model_dir: str | Path,
    predictions_tsv: str | Path,
    out_path: str | Path,
    *,
    n_each: int = 4,
    method: str = "integrated_gradients",
    steps: int = 32,
    pretrained: Any = None,
) -> Path | None:
    """Explain the ``n_each`` most confident right and wrong rows of ``predictions_tsv``; write the page.

    Returns ``out_path``, or ``None`` when there are no predictions or they carry no text column. ``pretrained``
    (a loaded :class:`selfattn.io.checkpoint.Pretrained`) saves loading ``model_dir`` again.
    """
    from selfattn.eval.calibration import temperature_of
    from selfattn.io.checkpoint import load_pretrained

    if not Path(predictions_tsv).is_file():
        return None
    with Path(predictions_tsv).open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows or "text" not in rows[0]:
        return None
    pre = pretrained or load_pretrained(model_dir)
    extra = pre.extra if isinstance(pre.extra, dict) else {}
    labels = [str(v) for v in (extra.get("labels") or (extra.get("data") or {}).get("labels") or range(pre.config.n_classes))]
    sections = []
    for heading, correct in (("Most confident right", True), ("Most confident wrong", False)):
        picked = _pick(rows, correct, n_each)
        targets = [labels.index(r["prediction"]) if r["prediction"] in labels else None for r in picked]
        attrs = explain(pre.model, pre.tokenizer, [r["text"].strip() for r in picked], method=method, steps=steps, targets=targets,
                        temperature=temperature_of(pre.extra))  # fmt: skip
        captions = [f"row {r['row']}: label {r['label']}, predicted {r['prediction']} ({float(r['confidence']):.3f})" for r in picked]
        sections.append((heading, list(zip(attrs, captions))))
    page = attributions_html(sections, title=f"Explained predictions ({method}): {model_dir}")
    return atomic_write_text(Path(out_path), page)
