"""The run summary: headline metrics with counts as integers, the promotion decision and its reason,
a warning at or below the majority-class baseline, and what to run next."""

from __future__ import annotations

from flows.stages.base import StageOutput
from flows.summary import PipelineResult, console_lines, last_model_name, markdown


def _result(accuracy: float, majority: float, promoted: bool, reason: str = "no champion yet") -> PipelineResult:
    stages = {"data": StageOutput(stage="data", key="k0", dir="/h/runs/data-k0", cached=True)}
    metrics = {"accuracy": accuracy, "majority_accuracy": majority, "n": 872.0, "ece": 0.05, "calibration.heldout_n": 50.0, "slice.negation.accuracy": 0.6}
    decision = {"promoted": promoted, "reason": reason}
    return PipelineResult(
        pipeline_run_id="p1", mlflow_run_id="r1", experiment_id="1", stages=stages, metrics=metrics,
        model_name="m", model_version="3", decision=decision,
    )


def test_console_shows_headline_metrics_with_integer_counts_and_ends_with_what_to_run():
    lines = console_lines(_result(0.81, 0.51, promoted=True), ui_hint="selfattn ui")
    text = "\n".join(lines)
    assert any(line.split() == ["n", "872"] for line in lines)  # a count, not 872.0000
    assert any(line.split() == ["accuracy", "0.8100"] for line in lines)
    assert "slice.negation.accuracy" not in text and "(2 more metrics" in text
    assert "model m v3: promoted to champion (no champion yet)" in text
    assert "warning" not in text
    assert lines[-3] == "registered model: models:/m/3 (= models:/m@champion)"
    assert lines[-2].split(maxsplit=1) == ["predict:", 'selfattn predict --model models:/m@champion "a gripping , beautifully acted film ."']
    assert lines[-1].split() == ["UI:", "selfattn", "ui"]


def test_a_model_at_the_majority_baseline_is_flagged_and_a_rejected_one_points_at_its_version():
    lines = console_lines(_result(0.48, 0.509, promoted=True))
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "0.4800" in warning and "majority-class baseline 0.5090" in warning and "the champion" in warning
    rejected = console_lines(_result(0.70, 0.5, promoted=False, reason="accuracy 0.7000 <= champion 0.8000 + margin 0.0"))
    assert "model m v3: not promoted, the champion stays (accuracy 0.7000 <= champion 0.8000 + margin 0.0)" in rejected
    assert "--model models:/m/3 " in rejected[-2]


def test_a_rerun_of_the_champion_is_not_called_a_promotion():
    lines = console_lines(_result(0.81, 0.51, promoted=True, reason="already champion"))
    assert "model m v3: the champion already (the same model as before)" in lines
    assert not [line for line in lines if "promoted" in line]
    assert "--model models:/m@champion " in lines[-2]


def test_markdown_keeps_every_metric_with_integer_counts():
    md = markdown("smoke", _result(0.5, 0.5, promoted=True), "runs:/r1")
    assert "| n | 872 |" in md and "| calibration.heldout_n | 50 |" in md and "| slice.negation.accuracy | 0.6000 |" in md
    assert "majority-class baseline" in md


def test_last_model_name_is_the_newest_run_that_registered_one(tmp_path):
    import os

    assert last_model_name(tmp_path) is None
    for i, name in enumerate(["old", "new", None]):
        d = tmp_path / "runs" / f"pipeline-{i}"
        d.mkdir(parents=True)
        (d / "result.json").write_text('{"model_name": %s}' % (f'"{name}"' if name else "null"))
        os.utime(d / "result.json", (1000 + i, 1000 + i))
    assert last_model_name(tmp_path) == "new"  # the newest run registered nothing: the one before it
