"""Small synthetic data sets for the data_checks tests (importable as ``dc_data``)."""

from __future__ import annotations

import random

ADJECTIVES = ["good", "bad", "dull", "bright", "slow", "sharp", "warm", "cold", "odd", "plain", "rich", "thin"]
NOUNS = ["film", "plot", "cast", "score", "script", "scene", "ending", "story", "pace", "dialogue"]


def make_rows(n: int = 60, *, seed: int = 0, prefix: str = "") -> list[tuple[str, int]]:
    """``n`` distinct SST-2-like (sentence, label) rows with balanced labels and a trailing space."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(ADJECTIVES), rng.choice(NOUNS), "and", rng.choice(ADJECTIVES), rng.choice(NOUNS)]
        rows.append((f"{prefix}the {' '.join(words)} , take {i} . ", i % 2))
    return rows


def tsv_text(rows: list[tuple[object, object]], *, header: str = "sentence\tlabel", newline: str = "\n") -> str:
    lines = [header] + [f"{s}\t{lab}" for s, lab in rows]
    return newline.join(lines) + newline


def corpus_text(n_lines: int = 400, *, seed: int = 0) -> str:
    """A small play-script-like corpus: distinct lines, a few repeated speaker names, blank lines."""
    rng = random.Random(seed)
    out = []
    for i in range(n_lines):
        if i % 10 == 0:
            out.append("")
            out.append(f"{rng.choice(['FIRST CITIZEN', 'MENENIUS', 'MARCIUS'])}:")
        out.append(f"{rng.choice(ADJECTIVES).title()} is the {rng.choice(NOUNS)} of line {i}, {rng.choice(ADJECTIVES)} and {rng.choice(NOUNS)}.")
    return "\n".join(out) + "\n"
