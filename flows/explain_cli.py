"""What ``selfattn explain`` shows: the model's prediction and each word (or token) on a background
coloured by its attribution (green: for the predicted class, red: against; rollout and raw
attention have no sign, so they are green only).

Kept apart from ``flows.cli`` so the command there stays a few lines; this module never imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from selfattn.errors import UserError


def load_explainable(model_uri: str, method: str) -> Any:
    """A ``SelfattnClassifier`` for ``model_uri`` (``models:/``, ``runs:/`` or a local directory).

    A local ``save_pretrained`` directory of another kind (a language model) is refused by the
    library's own check, which names the method and the model kind.
    """
    from flows.predict import load_classifier
    from selfattn.eval.interpret import check_explainable

    local = Path(model_uri).expanduser()
    if "://" not in model_uri and (local / "config.json").is_file():
        from selfattn.io.checkpoint import load_pretrained

        check_explainable(load_pretrained(local).model, method)
    try:
        return load_classifier(model_uri)
    except Exception as exc:
        if type(exc).__name__ in ("MlflowException", "RestException", "OSError", "FileNotFoundError"):
            raise UserError(f"could not load model {model_uri!r}: {exc}") from None
        raise


def render(attrs: Sequence[Any], labels: Sequence[Any], *, unit: str = "word", console: Any = None) -> None:
    """Print one block per attribution: label, probability, note, then the coloured text."""
    from rich.console import Console
    from rich.text import Text

    from selfattn.eval.interpret import score_colour

    console = console or Console()
    for a in attrs:
        head = Text()
        if a.target is None:
            head.append("(no prediction to explain)", style="dim")
        else:
            head.append(f"{labels[a.target]}", style="bold")
            head.append(f"  p={a.probs[a.target]:.3f}  {a.method}")
            if a.delta is not None:
                head.append(f"  (completeness error {a.delta:+.2e})", style="dim")
        if a.note:
            head.append(f"  [{a.note}]", style="yellow")
        console.print(head)
        pieces = a.words() if unit == "word" else list(zip(a.tokens, a.scores))
        scale = max((abs(s) for _, s in pieces), default=0.0)
        body = Text()
        for i, (piece, score) in enumerate(pieces):
            if unit == "word" and i:
                body.append(" ")
            body.append(piece, style=f"black on {score_colour(score, scale)}")
        console.print(body)
        console.print()
