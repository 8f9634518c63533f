"""The HTML page of explained examples: the most confident right and wrong rows, escaped, coloured."""

from __future__ import annotations

import numpy as np
import torch

from selfattn.io.checkpoint import save_pretrained
from selfattn.config import ModelConfig
from selfattn.eval.evaluate import write_predictions
from selfattn.eval.interpret import explain, score_colour
from selfattn.nn.models import SequenceClassifier
from selfattn.eval.report_html import write_examples_page
from selfattn.data.tokenization import CharTokenizer

TEXTS = ["great fun <b>bold</b>", "a dull , lifeless mess .", "not good", "fun & games", "boring"]


def test_page_shows_the_most_confident_right_and_wrong(tmp_path):
    tok = CharTokenizer.train(TEXTS)
    torch.manual_seed(0)
    model = SequenceClassifier(ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=2, n_classes=2)).eval()
    with torch.no_grad():
        model.head.weight.mul_(40.0)
    save_pretrained(model, tmp_path / "model", tokenizer=tok, extra={"labels": [0, 1]})
    probs = np.array([a.probs for a in explain(model, tok, TEXTS, method="attention_last")])  # [N, 2]
    pred = probs.argmax(1)
    y = pred.copy()
    y[[1, 4]] = 1 - y[[1, 4]]  # two wrong rows
    tsv = write_predictions(tmp_path / "eval" / "predictions.tsv", probs, y, [0, 1], TEXTS)

    page = write_examples_page(tmp_path / "model", tsv, tmp_path / "eval" / "plots" / "examples.html", n_each=2)
    html = page.read_text(encoding="utf-8")
    right, wrong = html.split("Most confident wrong")
    conf = probs.max(1)
    best_right = max((i for i in range(5) if i not in (1, 4)), key=lambda i: conf[i])
    assert f"row {best_right}:" in right and "row 1:" in wrong and "row 4:" in wrong
    assert right.count("class='ex'") == 2 and wrong.count("class='ex'") == 2
    assert "<b>bold" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html  # text is escaped
    # each sentence's strongest word has the full colour of its sign
    [a] = explain(model, tok, ["a dull , lifeless mess ."], targets=[int(pred[1])])
    w, s = max(a.words(), key=lambda ws: abs(ws[1]))
    assert f"background:{score_colour(s, abs(s))}' title='{s:+.4f}'>{w}<" in wrong


def test_no_text_column_gives_no_page(tmp_path):
    tsv = write_predictions(tmp_path / "p.tsv", np.array([[0.2, 0.8]]), np.array([1]), [0, 1], None)
    assert write_examples_page(tmp_path / "missing", tsv, tmp_path / "x.html") is None
