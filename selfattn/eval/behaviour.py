"""Behavioural tests of a sentiment classifier, CheckList-style (Ribeiro et al., 2020), and slices.

Accuracy on one set hides what a model gets wrong. These tests need no labelled data: each one
builds pairs of sentences from templates or by perturbing given sentences (the SST-2 dev
sentences in the pipeline), and checks how the prediction moves.

- ``negation`` (directional): "the film is good ." -> "the film is not good ." must flip the
  prediction.
- ``intensifier`` (invariance): "good" -> "very good" keeps it (templates, and dev sentences with
  an intensifier put before a sentiment word).
- ``contrast`` (template expectation): "the film is dull , but the cast is wonderful ." follows
  the clause after "but" (the expected label is the polarity of its sentiment word).
- ``names`` (invariance): swapping a person's name (templates, and dev sentences holding a common
  first name) leaves the prediction unchanged.
- ``typos`` (invariance): one swap of two adjacent letters in one word of a dev sentence leaves it.

Every case is drawn with a seeded ``random.Random``, so a suite is the same list of sentences on
every run. A test's failure rate is the share of its cases whose prediction does not behave.
:func:`slice_metrics` adds accuracy on slices of labelled data: by sentence length (word bins)
and by whether a negation word is present. Sentences are written in SST-2's style (lower case,
punctuation split off, "n't" as its own token).

A predictor is any ``Callable[[list[str]], array [N, 2]]`` of class probabilities (index
``negative`` and ``positive`` given to :func:`run_suite`); :func:`checkpoint_predictor` makes one
from a ``save_pretrained`` classifier, with its stored temperature applied.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

Predictor = Callable[[list[str]], "np.ndarray"]

POSITIVE = ("good", "great", "wonderful", "excellent", "enjoyable", "brilliant", "delightful", "funny", "charming",
            "beautiful", "entertaining", "moving", "clever", "fascinating", "superb")
NEGATIVE = ("bad", "terrible", "awful", "boring", "dull", "horrible", "tedious", "mediocre", "disappointing",
            "lifeless", "stupid", "pointless", "bland", "predictable", "annoying")
NOUNS = ("film", "movie", "story", "script", "acting", "cast", "plot", "performance", "ending", "dialogue")
INTENSIFIERS = ("very", "really", "extremely", "truly", "incredibly", "so")
NAMES = ("john", "mary", "david", "sarah", "michael", "emma", "james", "anna", "robert", "maria", "peter", "julia",
         "thomas", "laura", "daniel", "linda", "paul", "susan", "mark", "jane", "steven", "kate", "sam", "harry")
NEGATION_WORDS = frozenset({"not", "no", "never", "nothing", "nobody", "none", "neither", "nor", "nowhere", "without",
                            "cannot", "n't"})

# (plain, negated, intensified) sentence frames; {n} noun, {a} adjective, {i} intensifier
FRAMES = (
    ("the {n} is {a} .", "the {n} is not {a} .", "the {n} is {i} {a} ."),
    ("this {n} was {a} .", "this {n} was not {a} .", "this {n} was {i} {a} ."),
    ("it is a {a} {n} .", "it is not a {a} {n} .", "it is a {i} {a} {n} ."),
    ("i found the {n} {a} .", "i did n't find the {n} {a} .", "i found the {n} {i} {a} ."),
)
NAME_FRAMES = ("{p} 's new {n} is {a} .", "{p} made a {a} {n} .", "i watched the {n} with {p} and it was {a} .")
TESTS = ("negation", "intensifier", "contrast", "names", "typos")


def words_of(text: str) -> list[str]:
    return text.lower().split()


def has_negation(text: str) -> bool:
    """True when ``text`` holds a negation word ("not", "never", "n't", "without", ...)."""
    return any(w in NEGATION_WORDS or w.endswith("n't") for w in words_of(text))


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One behavioural check: ``perturbed`` against ``original`` (or against ``expected``)."""

    test: str
    kind: str  # "DIR" (must flip), "INV" (must not change) or "MFT" (must equal ``expected``)
    source: str  # "template" or "dev"
    original: str
    perturbed: str
    expected: str = ""  # "positive" / "negative" for MFT cases


def _fix_articles(text: str) -> str:
    """"a" before a vowel becomes "an" (templates fill adjectives into "a {a} {n}")."""
    w = text.split()
    return " ".join("an" if x == "a" and k + 1 < len(w) and w[k + 1][0] in "aeiou" else x for k, x in enumerate(w))


def _sample(rng: random.Random, items: list[Any], n: int) -> list[Any]:
    return items if len(items) <= n else rng.sample(items, n)


def negation_cases(rng: random.Random, n: int) -> list[Case]:
    grid = [(f, a, noun) for f in FRAMES for a in POSITIVE + NEGATIVE for noun in NOUNS]
    return [Case("negation", "DIR", "template", _fix_articles(f[0].format(n=noun, a=a)), _fix_articles(f[1].format(n=noun, a=a))) for f, a, noun in _sample(rng, grid, n)]


def intensifier_cases(rng: random.Random, n: int, sentences: Sequence[str] = ()) -> list[Case]:
    grid = [(f, a, noun) for f in FRAMES for a in POSITIVE + NEGATIVE for noun in NOUNS]
    cases = [
        Case("intensifier", "INV", "template", _fix_articles(f[0].format(n=noun, a=a)), _fix_articles(f[2].format(n=noun, a=a, i=rng.choice(INTENSIFIERS))))
        for f, a, noun in _sample(rng, grid, n)
    ]
    lexicon = set(POSITIVE + NEGATIVE)
    dev = []
    for s in sentences:
        w = s.split()
        spots = [k for k, x in enumerate(w) if x in lexicon and (k == 0 or (w[k - 1] not in INTENSIFIERS and w[k - 1] not in NEGATION_WORDS))]
        if spots:
            k = rng.choice(spots)
            dev.append(Case("intensifier", "INV", "dev", s, " ".join(w[:k] + [rng.choice(INTENSIFIERS)] + w[k:])))
    return cases + _sample(rng, dev, n)


def contrast_cases(rng: random.Random, n: int) -> list[Case]:
    grid = [(a, b, n1, n2) for a in POSITIVE + NEGATIVE for b in POSITIVE + NEGATIVE if (a in POSITIVE) != (b in POSITIVE)
            for n1 in NOUNS for n2 in NOUNS if n1 != n2]
    out = []
    for a, b, n1, n2 in _sample(rng, grid, n):
        first = f"the {n1} is {a}"
        out.append(Case("contrast", "MFT", "template", first + " .", f"{first} , but the {n2} is {b} .", "positive" if b in POSITIVE else "negative"))
    return out


def name_cases(rng: random.Random, n: int, sentences: Sequence[str] = ()) -> list[Case]:
    grid = [(f, a, noun, p) for f in NAME_FRAMES for a in POSITIVE + NEGATIVE for noun in NOUNS for p in NAMES]
    cases = []
    for f, a, noun, p in _sample(rng, grid, n):
        q = rng.choice([x for x in NAMES if x != p])
        cases.append(Case("names", "INV", "template", _fix_articles(f.format(p=p, n=noun, a=a)), _fix_articles(f.format(p=q, n=noun, a=a))))
    dev = []
    names = set(NAMES)
    for s in sentences:
        w = s.split()
        found = [x for x in w if x in names]
        if found:
            p = rng.choice(found)
            q = rng.choice([x for x in NAMES if x != p])
            dev.append(Case("names", "INV", "dev", s, " ".join(q if x == p else x for x in w)))
    return cases + _sample(rng, dev, n)


def add_typo(sentence: str, rng: random.Random) -> str | None:
    """``sentence`` with two adjacent letters of one word (of 4+ letters) swapped; None if none fits."""
    w = sentence.split()
    spots = [k for k, x in enumerate(w) if len(x) >= 4 and x.isalpha() and len(set(x)) > 1]
    if not spots:
        return None
    k = rng.choice(spots)
    word = w[k]
    js = [j for j in range(len(word) - 1) if word[j] != word[j + 1]]
    j = rng.choice(js)
    w[k] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(w)


def typo_cases(rng: random.Random, n: int, sentences: Sequence[str] = ()) -> list[Case]:
    out = []
    for s in _sample(rng, list(sentences), n):
        t = add_typo(s, rng)
        if t is not None:
            out.append(Case("typos", "INV", "dev", s, t))
    return out


def build_cases(sentences: Sequence[str] = (), *, seed: int = 0, n_per_test: int = 200) -> list[Case]:
    """Every test's cases: ``n_per_test`` from templates and (where a test perturbs real text) up
    to ``n_per_test`` from ``sentences``. The same arguments give the same list."""
    if n_per_test < 1:
        raise ValueError(f"n_per_test must be >= 1, got {n_per_test}")
    sentences = [" ".join(s.split()) for s in sentences if s and s.strip()]
    makers = {
        "negation": lambda r: negation_cases(r, n_per_test),
        "intensifier": lambda r: intensifier_cases(r, n_per_test, sentences),
        "contrast": lambda r: contrast_cases(r, n_per_test),
        "names": lambda r: name_cases(r, n_per_test, sentences),
        "typos": lambda r: typo_cases(r, n_per_test, sentences),
    }
    # one generator per test, so adding cases to one test never reshuffles another
    return [c for i, name in enumerate(TESTS) for c in makers[name](random.Random(f"{seed}-{i}-{name}"))]


# --------------------------------------------------------------------------- running


@dataclass
class CheckResult:
    test: str
    n: int
    failures: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.n if self.n else 0.0


@dataclass
class SuiteReport:
    """The per-case table (one dict per case) and one result per test."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, CheckResult] = field(default_factory=dict)

    def metrics(self, prefix: str = "behaviour") -> dict[str, float]:
        """``behaviour.<test>.failure_rate`` and ``behaviour.<test>.n`` for each test with cases."""
        out: dict[str, float] = {}
        for name, r in self.results.items():
            out[f"{prefix}.{name}.failure_rate"] = r.failure_rate
            out[f"{prefix}.{name}.n"] = float(r.n)
        return out


def run_suite(predict: Predictor, sentences: Sequence[str] = (), *, seed: int = 0, n_per_test: int = 200, negative: int = 0, positive: int = 1) -> SuiteReport:
    """Build the cases (see :func:`build_cases`), predict every distinct sentence once, score them."""
    import numpy as np

    cases = build_cases(sentences, seed=seed, n_per_test=n_per_test)
    texts = sorted({t for c in cases for t in (c.original, c.perturbed)})
    probs = np.asarray(predict(texts), dtype=np.float64) if texts else np.zeros((0, 2))
    if probs.ndim != 2 or len(probs) != len(texts) or probs.shape[1] < 2:
        raise ValueError(f"predictor must return probabilities [N, C>=2] for N = {len(texts)} texts, got shape {probs.shape}")
    row_of = {t: i for i, t in enumerate(texts)}
    names = {negative: "negative", positive: "positive"}
    report = SuiteReport(results={t: CheckResult(t, 0, 0) for t in TESTS})
    for c in cases:
        p0, p1 = probs[row_of[c.original]], probs[row_of[c.perturbed]]
        k0, k1 = int(p0.argmax()), int(p1.argmax())
        if c.kind == "DIR":
            failed = k1 == k0
        elif c.kind == "INV":
            failed = k1 != k0
        else:
            failed = names.get(k1, str(k1)) != c.expected
        r = report.results[c.test]
        r.n += 1
        r.failures += int(failed)
        report.rows.append({
            **asdict(c),
            "pred_original": names.get(k0, str(k0)),
            "pred_perturbed": names.get(k1, str(k1)),
            "p_positive_original": float(p0[positive]),
            "p_positive_perturbed": float(p1[positive]),
            "failed": bool(failed),
        })
    report.results = {k: v for k, v in report.results.items() if v.n}
    return report


# --------------------------------------------------------------------------- slices


def slice_names(length_bins: Sequence[int]) -> list[str]:
    """Slice names for word-count edges ``length_bins`` (e.g. [12, 24] -> len_le12, len_13_24, len_gt24)."""
    edges = list(length_bins)
    if any(b < 1 for b in edges) or edges != sorted(set(edges)):
        raise ValueError(f"length_bins must be increasing positive word counts, got {list(length_bins)}")
    names = [f"len_le{edges[0]}"] if edges else []
    names += [f"len_{a + 1}_{b}" for a, b in zip(edges, edges[1:])]
    names += [f"len_gt{edges[-1]}"] if edges else []
    return ["negation", "no_negation", *names]


def _length_slice(n_words: int, edges: Sequence[int]) -> str:
    if n_words <= edges[0]:
        return f"len_le{edges[0]}"
    for a, b in zip(edges, edges[1:]):
        if n_words <= b:
            return f"len_{a + 1}_{b}"
    return f"len_gt{edges[-1]}"


def slice_metrics(texts: Sequence[str], correct: Sequence[bool], *, length_bins: Sequence[int] = (12, 24), prefix: str = "slice") -> dict[str, float]:
    """Accuracy and size of each slice: ``slice.<name>.accuracy`` and ``slice.<name>.n``.

    Slices: ``negation`` / ``no_negation`` (a negation word present or not) and the length bins
    of :func:`slice_names` (words split on whitespace). Empty slices are left out.
    """
    names = slice_names(length_bins)
    if len(texts) != len(correct):
        raise ValueError(f"texts ({len(texts)}) and correct ({len(correct)}) must have the same length")
    hits = {k: [0, 0] for k in names}
    for text, ok in zip(texts, correct):
        keys = ["negation" if has_negation(text) else "no_negation"]
        if length_bins:
            keys.append(_length_slice(len(text.split()), list(length_bins)))
        for k in keys:
            hits[k][0] += int(bool(ok))
            hits[k][1] += 1
    out: dict[str, float] = {}
    for k, (right, n) in hits.items():
        if n:
            out[f"{prefix}.{k}.accuracy"] = right / n
            out[f"{prefix}.{k}.n"] = float(n)
    return out


# --------------------------------------------------------------------------- a checkpoint as predictor


def checkpoint_predictor(pre: Any, *, batch_size: int = 256) -> Predictor:
    """Texts -> class probabilities [N, C] of a loaded classifier (``load_pretrained``), with the
    temperature stored in its checkpoint applied; texts longer than its context are truncated."""
    import torch

    from selfattn.data.classification import (
        classification_eval_batches,
        encode_labelled,
    )
    from selfattn.eval.calibration import scale_probs, temperature_of
    from selfattn.eval.evaluate import classifier_predictions

    if pre.task != "classifier" or pre.tokenizer is None:
        raise ValueError(f"checkpoint_predictor needs a classifier with a tokenizer, got task {pre.task!r}")
    temperature = temperature_of(pre.extra)
    device = next(pre.model.parameters()).device

    def predict(texts: list[str]) -> "np.ndarray":
        import numpy as np

        # an empty text has no tokens: it is scored as the tokenizer's unknown/pad token alone
        safe = [t if t.strip() else "." for t in texts]
        data = encode_labelled(safe, [0] * len(safe), pre.tokenizer, pre.config.context_length, source="behaviour cases")
        if len(data) != len(safe):
            raise ValueError(f"{len(safe) - len(data)} of the texts encode to no tokens")
        batches = classification_eval_batches(data, batch_size=batch_size, pad_id=pre.tokenizer.pad_id)
        with torch.inference_mode():
            probs, _, _ = classifier_predictions(pre.model, batches, len(data), device=device)
        return scale_probs(probs, temperature) if temperature != 1.0 else np.asarray(probs)

    return predict
