"""Registry: idempotent registration, the champion gate, manual promote and rollback (real MLflow, SQLite)."""

from __future__ import annotations

import os

import pytest

from flows.tracking import registry
from selfattn.errors import UserError

NAME = "unit-model"


@pytest.fixture()
def model_uri(tiny_classifier_dir, experiment_id):
    import mlflow

    from flows.serving import log_model

    with mlflow.start_run(experiment_id=experiment_id):
        return log_model(str(tiny_classifier_dir)).model_uri


def _register(uri, key, score, digest="d1", home=None):
    tags = {registry.TAG_METRIC: "accuracy", registry.TAG_SCORE: f"{score}", registry.TAG_EVAL_DIGEST: digest}
    return str(registry.register(model_uri=uri, model_name=NAME, run_key=key, tags=tags, home=home).version)


def _aliases(name=NAME):
    return registry.describe(name)["aliases"]


def test_registration_is_idempotent_and_sets_challenger(model_uri, mlflow_home):
    v1 = _register(model_uri, "run-a", 0.7, home=mlflow_home)
    again = _register(model_uri, "run-a", 0.7, home=mlflow_home)
    assert again == v1
    v2 = _register(model_uri, "run-b", 0.6, home=mlflow_home)
    assert v2 != v1
    from mlflow import MlflowClient

    versions = MlflowClient().search_model_versions(f"name = '{NAME}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert _aliases()["challenger"] == v2


def test_gate_promote_and_rollback(model_uri, mlflow_home):
    from mlflow import MlflowClient

    client = MlflowClient()
    v1 = _register(model_uri, "k1", 0.70, home=mlflow_home)
    d1 = registry.gate(model_name=NAME, version=v1, metric="accuracy", margin=0.01, home=mlflow_home)
    assert d1.promoted and d1.reason == "no champion yet"
    assert _aliases()["champion"] == v1

    # worse, and better but within the margin: champion stays
    v2 = _register(model_uri, "k2", 0.65, home=mlflow_home)
    d2 = registry.gate(model_name=NAME, version=v2, metric="accuracy", margin=0.01, home=mlflow_home)
    assert not d2.promoted and d2.champion_version == v1 and d2.champion_score == pytest.approx(0.70)
    v3 = _register(model_uri, "k3", 0.705, home=mlflow_home)
    assert not registry.gate(model_name=NAME, version=v3, metric="accuracy", margin=0.01, home=mlflow_home).promoted
    tags = client.get_model_version(NAME, v3).tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.champion_score"] == "0.700000"
    assert tags["promotion.challenger_score"] == "0.705000"

    # evaluated on other data: not comparable, not promoted
    v4 = _register(model_uri, "k4", 0.99, digest="other", home=mlflow_home)
    d4 = registry.gate(model_name=NAME, version=v4, metric="accuracy", margin=0.01, home=mlflow_home)
    assert not d4.promoted and "different data" in d4.reason

    # better by more than the margin: promoted, history kept
    v5 = _register(model_uri, "k5", 0.80, home=mlflow_home)
    assert registry.gate(model_name=NAME, version=v5, metric="accuracy", margin=0.01, home=mlflow_home).promoted
    assert _aliases()["champion"] == v5 and _aliases()["previous_champion"] == v1
    assert client.get_model_version(NAME, v5).tags["previous_champion"] == v1
    assert client.get_registered_model(NAME).tags["champion_history"] == f"v{v1} -> v{v5}"  # readable, oldest first

    # manual promote, then two rollbacks walk the history back
    assert registry.promote(NAME, v2, home=mlflow_home) == v5
    assert _aliases()["champion"] == v2
    assert client.get_registered_model(NAME).tags["champion_history"] == f"v{v1} -> v{v5} -> v{v2}"
    assert registry.rollback(NAME, home=mlflow_home) == v5
    assert registry.rollback(NAME, home=mlflow_home) == v1
    assert _aliases()["champion"] == v1
    with pytest.raises(UserError, match="no previous champion"):
        registry.rollback(NAME, home=mlflow_home)
    with pytest.raises(UserError, match="no version"):
        registry.promote(NAME, "99", home=mlflow_home)
    with pytest.raises(UserError, match="not found"):
        registry.rollback("no-such-model", home=mlflow_home)


SLICED = "slice-model"


def _register_with_slice(uri, key, score, negation, home):
    tags = {registry.TAG_METRIC: "accuracy", registry.TAG_SCORE: f"{score}", registry.TAG_EVAL_DIGEST: "d1"}
    if negation is not None:
        tags["eval.slice.negation.accuracy"] = f"{negation}"
    return str(registry.register(model_uri=uri, model_name=SLICED, run_key=key, tags=tags, home=home).version)


def test_gate_refuses_a_slice_regression_only_when_asked(model_uri, mlflow_home):
    v1 = _register_with_slice(model_uri, "k1", 0.70, 0.80, mlflow_home)
    assert registry.gate(model_name=SLICED, version=v1, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negation": 0.02}).promoted

    # better overall, but 0.10 worse on negation: refused with the slice named
    v2 = _register_with_slice(model_uri, "k2", 0.75, 0.70, mlflow_home)
    d2 = registry.gate(model_name=SLICED, version=v2, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negation": 0.02})
    assert not d2.promoted and "slice 'negation'" in d2.reason and "0.7000" in d2.reason
    assert registry.describe(SLICED)["aliases"]["champion"] == v1
    # within the allowed loss: promoted
    v3 = _register_with_slice(model_uri, "k3", 0.76, 0.79, mlflow_home)
    d3 = registry.gate(model_name=SLICED, version=v3, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negation": 0.02})
    assert d3.promoted and "no guarded slice regressed" in d3.reason
    # a misspelt slice refuses, naming it; off (the default), the same regression is promoted
    v4 = _register_with_slice(model_uri, "k4", 0.80, 0.50, mlflow_home)
    d4 = registry.gate(model_name=SLICED, version=v4, metric="accuracy", margin=0.0, home=mlflow_home, slices={"negatoin": 0.02})
    assert not d4.promoted and "'negatoin'" in d4.reason
    assert registry.gate(model_name=SLICED, version=v4, metric="accuracy", margin=0.0, home=mlflow_home).promoted


def test_history_reads_its_own_text_and_the_older_comma_form():
    assert registry.parse_history(registry.format_history(["1", "3", "12"])) == ["1", "3", "12"]
    assert registry.parse_history("1,3,12") == ["1", "3", "12"] and registry.parse_history("") == []


def test_the_lease_is_taken_when_its_holder_releases_between_the_stores_create_and_lookup(mlflow_home, monkeypatch):
    """MLflow's create_registered_model meets an existing name, then looks the model up to say so:
    when the holder deletes its lock in between, the create answers RESOURCE_DOES_NOT_EXIST. That
    is a free lock, not an error (two hosts gating at once hit it)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    lock = f"{NAME}{registry.LOCK_SUFFIX}"
    client.create_registered_model(lock, tags={registry.TAG_LOCK_OWNER: "other-host:1:x"})  # held by another host
    store = client._get_registry_client().store
    lookup, released = store.get_registered_model, []

    def holder_releases_first(name):
        if name == lock and not released:
            released.append(name)
            store.delete_registered_model(lock)  # the holder's release lands between create and lookup
        return lookup(name)

    monkeypatch.setattr(store, "get_registered_model", holder_releases_first)
    with registry._registry_lease(NAME, timeout_s=30, client=client):
        owner = registry._lease_tags(client, lock).get(registry.TAG_LOCK_OWNER, "")
        assert released and owner.split(":")[1] == str(os.getpid())
    assert registry._lease_tags(client, lock) == {}  # released on exit
