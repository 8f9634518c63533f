"""The quiet console: real MLflow warnings are filtered one by one; verbose keeps them."""

from __future__ import annotations

import re
import warnings

import pandas as pd
import pytest

from flows import console


def _mlflow_dataset_warnings(tmp_path, *, quiet: bool) -> list[warnings.WarningMessage]:
    """What the validate stage does with a TSV (a dataset record, its entity for log_input),
    without a tracking store: MLflow raises both of its hints on the way."""
    import mlflow

    path = tmp_path / "train.tsv"
    df = pd.DataFrame({"sentence": ["a fine film", "a dull mess"], "label": [1, 0]})
    df.to_csv(path, sep="\t", index=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if quiet:
            console.filter_warnings()
        ds = mlflow.data.from_pandas(df, source=str(path), name="train", targets="label")
        ds._to_mlflow_entity()
    return list(caught)


def _quiet_hits(caught) -> list[str]:
    out = []
    for w in caught:
        for q in console.QUIET_WARNINGS:
            if issubclass(w.category, q.category) and re.match(q.message, str(w.message)):
                out.append(str(w.message)[:80])
    return out


def test_unactionable_mlflow_warnings_are_filtered_and_verbose_shows_them(tmp_path):
    loud = _quiet_hits(_mlflow_dataset_warnings(tmp_path, quiet=False))
    # the libraries really raise them (else this test would prove nothing)
    assert any("interpreted in multiple ways" in m for m in loud), loud
    assert any("integer column" in m for m in loud), loud
    assert _quiet_hits(_mlflow_dataset_warnings(tmp_path, quiet=True)) == []


def test_filters_are_narrow_not_wholesale():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.filter_warnings()
        # same category, same text, but from our code: still shown
        warnings.warn("The specified dataset source can be interpreted in multiple ways", UserWarning)
        warnings.warn("some other mlflow-looking advice", UserWarning)
        ours = [f for f in warnings.filters if f[0] == "ignore" and f[3] is not None and "mlflow" in f[3].pattern]
    assert len(caught) == 2
    assert len(ours) >= len(console.QUIET_WARNINGS)
    assert all(msg is not None and category is not Warning for _, msg, category, _, _ in ours)


def test_pyfunc_class_raises_no_type_hint_advice():
    import importlib

    import flows.serving

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.reload(flows.serving)
    assert not [w for w in caught if "type hints" in str(w.message)], [str(w.message)[:80] for w in caught]


@pytest.mark.parametrize("verbose", [False, True])
def test_install_quiets_library_info_only_when_not_verbose(verbose, monkeypatch):
    import logging

    logger = logging.getLogger("mlflow.store.db.utils")
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    monkeypatch.setattr(logging.getLogger("selfattn.data"), "filters", [])
    with warnings.catch_warnings():
        console.install(verbose=verbose)
    assert logger.isEnabledFor(logging.INFO) is verbose
    assert logger.isEnabledFor(logging.WARNING)


def test_a_user_error_is_left_to_the_closing_paragraph_and_a_bug_keeps_its_traceback():
    import logging
    import sys

    from flows.console import _NoKnownTraceback
    from selfattn.errors import UserError

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            info = sys.exc_info()
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception during execution: %r", (exc,), info)

    assert not _NoKnownTraceback().filter(record(UserError("data checks failed")))
    other = record(RuntimeError("a bug"))
    assert _NoKnownTraceback().filter(other) and other.exc_info is not None  # a bug keeps its traceback
