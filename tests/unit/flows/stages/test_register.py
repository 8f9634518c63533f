"""Registration's pure part: the champion decision on plain tags (no registry), version tags, run key."""

from __future__ import annotations

import pytest

from flows.stages import register
from flows.stages.base import StageOutput


def _tags(score: float | str | None, digest: str = "d1", **slices: float) -> dict[str, str]:
    tags = {register.TAG_METRIC: "accuracy", register.TAG_EVAL_DIGEST: digest}
    if score is not None:
        tags[register.TAG_SCORE] = str(score)
    return {**tags, **{f"eval.slice.{k}.accuracy": str(v) for k, v in slices.items()}}


def _decide(mine: dict[str, str], theirs: dict[str, str] | None, margin: float = 0.25, **kw) -> register.Decision:
    return register.decide(
        model_name="m", version="2", tags=mine, champion_version=None if theirs is None else "1", champion_tags=theirs,
        metric="accuracy", margin=margin, **kw,
    )


def test_the_margin_is_strict_a_challenger_exactly_at_champion_plus_margin_stays_challenger():
    # 0.5 + 0.25 == 0.75 exactly in binary floating point: the boundary itself, not a rounding artefact
    at = _decide(_tags(0.75), _tags(0.5))
    assert not at.promoted and at.reason == "accuracy 0.7500 <= champion 0.5000 + margin 0.25"
    above = _decide(_tags(0.7500001), _tags(0.5))
    assert above.promoted and above.reason == "accuracy 0.7500 > champion 0.5000 + margin 0.25"
    assert not _decide(_tags(0.6), _tags(0.5)).promoted
    assert _decide(_tags(0.51), _tags(0.5), margin=0.0).promoted and not _decide(_tags(0.5), _tags(0.5), margin=0.0).promoted
    assert (at.challenger_score, at.champion_score, at.champion_version, at.margin) == (0.75, 0.5, "1", 0.25)


@pytest.mark.parametrize("champion, margin", [(0.12, 0.02), (0.7, 0.1), (0.1, 0.2), (0.6, 0.005), (0.5, 0.0)])
def test_the_margin_boundary_holds_where_the_sum_is_not_exact_in_floating_point(champion, margin):
    # 0.12 + 0.02 == 0.13999999999999999 < 0.14 and 0.7 + 0.1 < 0.8: a plain `>` promotes these ties
    at = round(champion + margin, 6)  # as the score tags hold it (6 decimals)
    assert not _decide(_tags(at), _tags(champion), margin=margin).promoted, (at, champion, margin)
    assert _decide(_tags(round(at + 1e-6, 6)), _tags(champion), margin=margin).promoted, "one tag digit above the bar"
    assert not _decide(_tags(round(at - 1e-6, 6)), _tags(champion), margin=margin).promoted


@pytest.mark.parametrize(
    "mine, theirs, promoted, reason",
    [
        (_tags(None), _tags(0.5), False, "version 2 has no 'accuracy' score tag"),
        (_tags("nan"), _tags(0.5), False, "version 2 has no 'accuracy' score tag"),
        ({**_tags(0.9), register.TAG_METRIC: "f1"}, _tags(0.5), False, "version 2 has no 'accuracy' score tag"),
        (_tags(0.1), None, True, "no champion yet"),
        (_tags(0.99), _tags(0.5, digest="d2"), False, "champion v1 was evaluated on different data (d2 vs d1); promote manually"),
        (_tags(0.1), _tags(None), True, "champion v1 has no 'accuracy' score"),
    ],
)
def test_the_decision_without_a_registry(mine, theirs, promoted, reason):
    d = _decide(mine, theirs)
    assert (d.promoted, d.reason) == (promoted, reason)
    assert d.tags()["promotion.decision"] == ("promoted" if promoted else "rejected") and d.tags()["promotion.reason"] == reason


def test_already_champion_and_guarded_slices():
    same = register.decide(model_name="m", version="1", tags=_tags(0.5), champion_version="1", champion_tags=_tags(0.5), metric="accuracy", margin=0.0)
    assert same.promoted and same.reason == "already champion"
    guard = {"negation": 0.02}
    lost = _decide(_tags(0.9, negation=0.7), _tags(0.5, negation=0.8), slices=guard)
    assert not lost.promoted and lost.reason == "slice 'negation' accuracy 0.7000 < champion v1 0.8000 - allowed 0.02"
    kept = _decide(_tags(0.9, negation=0.79), _tags(0.5, negation=0.8), slices=guard)
    assert kept.promoted and kept.reason.endswith("; no guarded slice regressed (negation)")
    missing = _decide(_tags(0.9), _tags(0.5, negation=0.8), slices=guard)
    assert not missing.promoted and "no accuracy on version 2" in missing.reason
    assert _decide(_tags(0.9, negation=0.1), _tags(0.5), slices=guard).promoted  # the champion predates slices
    assert _decide(_tags(0.9, negation=0.1), _tags(0.5, negation=0.8)).promoted  # no guard asked for


def test_version_tags_and_run_key():
    metrics = {"accuracy": 0.8125, "n": 16.0, "slice.negation.accuracy": 0.5, "slice.len_le12.accuracy": 0.75}
    ev = StageOutput(stage="evaluate", key="e1", dir="/e", result={"metrics": metrics, "dataset_digest": "dd"})
    ft = StageOutput(stage="finetune", key="f1", dir="/f")
    tags = register.version_tags(ev, metric="accuracy", pipeline_run_id="p", mlflow_run_id="r", slices={"negation": 0.02})
    # a handful: the runs, the metric and its score, the data, the guarded slice; the rest stays on the run
    assert tags == {
        register.TAG_PIPELINE_RUN_ID: "p", register.TAG_METRIC: "accuracy", register.TAG_SCORE: "0.812500",
        register.TAG_EVAL_DIGEST: "dd", "mlflow_run_id": "r", "eval.slice.negation.accuracy": "0.500000",
    }
    assert register.slice_regression(tags, {**tags, "eval.slice.negation.accuracy": "0.9"}, {"negation": 0.02}) is not None
    assert register.score(tags, "accuracy") == 0.8125
    assert register.version_tags(ev, metric="f1", pipeline_run_id="p", mlflow_run_id="r")[register.TAG_SCORE] == "nan"
    key = register.run_key(ft, ev, "m")
    assert len(key) == 24 and key == register.run_key(ft, ev, "m") != register.run_key(ft, ev, "other")
