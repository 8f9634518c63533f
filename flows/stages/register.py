"""Registration's pure part: the run's idempotency key, the version tags, and the champion decision.

The registry itself (logging the model, versions, aliases, the lock) is ``flows.tracking.registry``;
everything here takes plain values, so the promotion rule is tested without a registry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Mapping

from flows.stages.base import Logged, StageOutput, digest

# version tags written at registration (read back by the gate)
TAG_RUN_KEY = "selfattn.run_key"
TAG_PIPELINE_RUN_ID = "selfattn.pipeline_run_id"
TAG_METRIC = "eval.metric"
TAG_SCORE = "eval.score"
TAG_EVAL_DIGEST = "eval.dataset_digest"
# the gate's reason when the challenger is the champion already (a rerun of the same model)
ALREADY_CHAMPION = "already champion"


def run_key(finetuned: StageOutput, evaluated: StageOutput, model_name: str) -> str:
    """The same model, scored the same way, registered under the same name: one version, however often it is run."""
    return digest({"finetune": finetuned.key, "evaluate": evaluated.key, "model": model_name})[:24]


def version_tags(
    evaluated: StageOutput, *, metric: str, pipeline_run_id: str, mlflow_run_id: str, slices: Mapping[str, float] | None = None
) -> dict[str, str]:
    """The tags of a new version, a handful: the runs it came from, the promotion metric and its score,
    the evaluation data, and the accuracy of each slice the gate guards (``slices``). Every other
    metric stays on the MLflow run the version links to (``mlflow_run_id``)."""
    metrics = evaluated.result["metrics"]
    score = metrics.get(metric)
    score = float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None
    guarded = {f"slice.{name}.accuracy" for name in (slices or {})}
    return {
        TAG_PIPELINE_RUN_ID: pipeline_run_id,
        "mlflow_run_id": mlflow_run_id,
        TAG_METRIC: metric,
        TAG_SCORE: "nan" if score is None else f"{score:.6f}",
        TAG_EVAL_DIGEST: evaluated.result["dataset_digest"],
        **{f"eval.{k}": f"{v:.6f}" for k, v in metrics.items() if k in guarded},
    }


@dataclass(frozen=True)
class Decision:
    """Outcome of the champion gate, also written into the challenger's version tags."""

    model_name: str
    version: str
    promoted: bool
    reason: str
    metric: str
    challenger_score: float | None
    champion_version: str | None
    champion_score: float | None
    margin: float

    def to_dict(self) -> dict:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        """The challenger's version tags that record this decision."""
        return {
            "promotion.decision": "promoted" if self.promoted else "rejected",
            "promotion.reason": self.reason,
            "promotion.challenger_score": "" if self.challenger_score is None else f"{self.challenger_score:.6f}",
            "promotion.champion_version": self.champion_version or "",
            "promotion.champion_score": "" if self.champion_score is None else f"{self.champion_score:.6f}",
            "promotion.margin": str(self.margin),
        }

    def log(self) -> Logged:
        """What the register stage's run records about it."""
        verdict = "promoted" if self.promoted else "rejected"
        tags = {"registry.model": self.model_name, "registry.version": self.version, "promotion.decision": verdict, "promotion.reason": self.reason}
        return Logged(tags=tags, dicts={"promotion.json": self.to_dict()})


def score(tags: Mapping[str, str] | None, metric: str) -> float | None:
    """The version's score on ``metric`` from its tags, or None (no tags, another metric, not a number, NaN)."""
    if tags is None or tags.get(TAG_METRIC) != metric:
        return None
    try:
        value = float(tags.get(TAG_SCORE, "nan"))
    except ValueError:
        return None
    return None if math.isnan(value) else value


def slice_regression(challenger: Mapping[str, str], champion: Mapping[str, str], slices: Mapping[str, float] | None, *, versions: tuple[str, str] = ("?", "?")) -> str | None:
    """Why the challenger (its version tags) may not replace the champion on the guarded ``slices``, or None.

    ``slices`` maps a slice name to the most accuracy it may lose (``{"negation": 0.02}``); the
    accuracies are the version tags ``eval.slice.<name>.accuracy`` written at registration. A slice
    the challenger lacks refuses (a misspelt name must not pass silently); a slice the champion
    lacks (registered before slices existed) is not compared. ``versions``: (challenger, champion), for the message.
    """
    for name, allowed in sorted((slices or {}).items()):
        tag = f"eval.slice.{name}.accuracy"
        mine = challenger.get(tag)
        if mine is None:
            return f"slice {name!r} has no accuracy on version {versions[0]} (no tag {tag})"
        theirs = champion.get(tag)
        if theirs is not None and float(mine) < float(theirs) - allowed:
            return f"slice {name!r} accuracy {float(mine):.4f} < champion v{versions[1]} {float(theirs):.4f} - allowed {allowed}"
    return None


def decide(
    *,
    model_name: str,
    version: str,
    tags: Mapping[str, str],
    champion_version: str | None,
    champion_tags: Mapping[str, str] | None,
    metric: str,
    margin: float,
    slices: Mapping[str, float] | None = None,
) -> Decision:
    """Whether ``version`` (its tags) replaces the champion: it must beat the champion's score by
    more than ``margin`` (a challenger exactly at champion + margin is not promoted), on the same
    evaluation data (``eval.dataset_digest``), and lose no guarded slice. Higher is better."""
    mine, theirs = score(tags, metric), score(champion_tags, metric)
    promoted, reason = _compare(version, tags, champion_version, champion_tags, metric, margin, mine, theirs)
    if promoted and slices and champion_tags is not None and champion_version != version:
        why = slice_regression(tags, champion_tags, slices, versions=(version, str(champion_version)))
        promoted, reason = (False, why) if why else (True, f"{reason}; no guarded slice regressed ({', '.join(sorted(slices))})")
    return Decision(
        model_name=model_name, version=version, promoted=promoted, reason=reason, metric=metric,
        challenger_score=mine, champion_version=champion_version, champion_score=theirs, margin=margin,
    )


def _compare(
    version: str,
    tags: Mapping[str, str],
    champion_version: str | None,
    champion_tags: Mapping[str, str] | None,
    metric: str,
    margin: float,
    mine: float | None,
    theirs: float | None,
) -> tuple[bool, str]:
    """(promoted, reason) on the scores alone."""
    if mine is None:
        return False, f"version {version} has no {metric!r} score tag"
    if champion_tags is None:
        return True, "no champion yet"
    if champion_version == version:
        return True, ALREADY_CHAMPION
    if champion_tags.get(TAG_EVAL_DIGEST) != tags.get(TAG_EVAL_DIGEST):
        return False, (
            f"champion v{champion_version} was evaluated on different data "
            f"({champion_tags.get(TAG_EVAL_DIGEST)} vs {tags.get(TAG_EVAL_DIGEST)}); promote manually"
        )
    if theirs is None:
        return True, f"champion v{champion_version} has no {metric!r} score"
    # rounded: the scores are tagged with 6 decimals, and 0.12 + 0.02 < 0.14 in binary floating point
    if round(mine - theirs - margin, 9) > 0:
        return True, f"{metric} {mine:.4f} > champion {theirs:.4f} + margin {margin}"
    return False, f"{metric} {mine:.4f} <= champion {theirs:.4f} + margin {margin}"
