"""Two pipelines at once on the same home (issue 7): SQLite stores, then PostgreSQL stores.

The two runs differ only in ``seed`` (another training sample), as two people starting their
nightly jobs at the same time would: they share the pretraining stage (same corpus and config:
one runs it, the other waits on the stage lock and reuses it), have their own data / search /
fine-tune / evaluate directories, write into the same MLflow store, Optuna study and registered
model, and race for the champion alias.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from .conftest import SMOKE_SETS, Pipeline, pipeline_env, query, stage_dirs, trials

MODEL = "selfattn-sst2-smoke"
PG_URL = os.environ.get("SELFATTN_PG_URL", "postgresql://postgres@127.0.0.1:5432")


def _run_pair(home: Path, work: Path, env: dict[str, str], extra: list[str] = ()) -> list[Pipeline]:
    work.mkdir(parents=True, exist_ok=True)
    pair = [
        Pipeline(env=env, cwd=work, log_dir=home.parent / "logs", name=f"seed{seed}", sets=[*SMOKE_SETS, f"seed={seed}", *extra])
        for seed in (0, 1)
    ]
    rcs = [p.wait(timeout=1200) for p in pair]
    for p, rc in zip(pair, rcs):
        assert rc == 0, p.stderr[-4000:]
    return pair


def _stage_report(pair: list[Pipeline]) -> dict[str, list[str]]:
    """stage -> ['ran'|'cached', ...] over both runs' summaries."""
    report: dict[str, list[str]] = {}
    for p in pair:
        for line in p.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[1] in ("ran", "cached"):
                report.setdefault(parts[0], []).append(parts[1])
    return report


def _check_stage_dirs(home: Path, pair: list[Pipeline]) -> None:
    report = _stage_report(pair)
    assert sorted(report["pretrain"]) == ["cached", "ran"], report  # shared: run once, reused once
    assert len(stage_dirs(home, "pretrain")) == 1
    for stage in ("data", "validate", "search", "finetune", "evaluate"):
        dirs = stage_dirs(home, stage)
        assert len(dirs) == 2 and all((d / "_SUCCESS").is_file() for d in dirs), (stage, dirs)
    for stage in ("data", "search", "finetune", "evaluate"):
        assert report[stage] == ["ran", "ran"], report


def _check_trials(states: list[str]) -> None:
    """One shared study: at least n_trials (2) finished (complete or pruned), none left hanging."""
    finished = [s for s in states if s in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 2 and "COMPLETE" in states and not {"RUNNING", "WAITING"} & set(states), states


def _check_registry(versions: list[tuple], tags: dict[int, dict[str, str]], aliases: dict[str, int]) -> None:
    """Two versions; the champion is the better one, the loser's tags say why it lost."""
    assert sorted(v for _, v in versions) == [1, 2], versions
    scores = {v: float(tags[v]["eval.score"]) for v in (1, 2)}
    decisions = {v: tags[v]["promotion.decision"] for v in (1, 2)}
    champion = aliases["champion"]
    assert scores[champion] == max(scores.values()), (scores, aliases)
    first = 1 if decisions[1] == "promoted" and tags[1]["promotion.champion_version"] == "" else 2
    second = 3 - first
    assert decisions[first] == "promoted" and tags[first]["promotion.reason"] == "no champion yet", tags
    # the second gate compared against the first under the lock: promoted iff strictly better
    assert tags[second]["promotion.champion_version"] == str(first), tags
    assert decisions[second] == ("promoted" if scores[second] > scores[first] else "rejected"), (scores, decisions)
    assert tags[second]["promotion.reason"], "the loser's reason is recorded"


def test_two_pipelines_at_once_on_sqlite(tmp_path, data_dir):
    home = tmp_path / "home"
    pair = _run_pair(home, tmp_path / "work", pipeline_env(home, data_dir))
    _check_stage_dirs(home, pair)
    db = home / "mlflow.db"
    assert query(db, "pragma integrity_check") == [("ok",)]
    journal = (home / "optuna.journal").read_bytes().splitlines()
    assert journal and all(json.loads(line)["op_code"] is not None for line in journal), "every journal line is whole"
    parents = query(db, "select r.run_uuid, r.status from runs r where not exists (select 1 from tags t where t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId')")
    assert len(parents) == 2 and {s for _, s in parents} == {"FINISHED"}, parents
    assert not query(db, "select name from runs where status = 'RUNNING'")
    pipeline_ids = query(db, "select distinct value from tags where key = 'selfattn.pipeline_run_id'")
    assert len(pipeline_ids) == 2
    states = [s for _, s in trials(home)]
    _check_trials(states)
    versions = query(db, "select name, version from model_versions where name = ?", (MODEL,))
    tags = {v: dict(query(db, "select key, value from model_version_tags where name = ? and version = ?", (MODEL, v))) for _, v in versions}
    aliases = dict(query(db, "select alias, version from registered_model_aliases where name = ?", (MODEL,)))
    _check_registry(versions, tags, aliases)


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture()
def pg_dbs():
    """Two throwaway PostgreSQL databases, MLflow's and Optuna's (dropped afterwards).

    They cannot share one: both keep their schema revision in an ``alembic_version`` table, and
    Optuna refuses a database whose revision is MLflow's ("no longer compatible").
    """
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(f"{PG_URL}/postgres", connect_timeout=5)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"PostgreSQL not reachable at {PG_URL}: {exc}")
    admin.autocommit = True
    names = [f"selfattn_rel_{uuid.uuid4().hex[:10]}_{what}" for what in ("mlflow", "optuna")]
    with admin.cursor() as cur:
        for name in names:
            cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield [f"{PG_URL}/{name}" for name in names]
    finally:
        with admin.cursor() as cur:
            for name in names:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def _pg(url: str, sql: str, args: tuple = ()) -> list[tuple]:
    import psycopg2

    with closing(psycopg2.connect(url)) as con, con.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def test_two_pipelines_at_once_on_postgresql(tmp_path, data_dir, pg_dbs):
    home = tmp_path / "home"
    mlflow_db, optuna_db = pg_dbs
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the project ships psycopg2
    as_sa = lambda url: url.replace("postgresql://", "postgresql+psycopg2://", 1)  # noqa: E731
    env = pipeline_env(home, data_dir, MLFLOW_TRACKING_URI=as_sa(mlflow_db))
    pair = _run_pair(home, tmp_path / "work", env, [f"search.storage={as_sa(optuna_db)}"])
    _check_stage_dirs(home, pair)
    assert not (home / "mlflow.db").exists() and not (home / "optuna.db").exists() and not (home / "optuna.journal").exists(), "the PostgreSQL stores were not used"
    parents = _pg(mlflow_db, "select r.run_uuid, r.status from runs r where not exists (select 1 from tags t where t.run_uuid = r.run_uuid and t.key = 'mlflow.parentRunId')")
    assert len(parents) == 2 and {s for _, s in parents} == {"FINISHED"}, parents
    assert not _pg(mlflow_db, "select name from runs where status = 'RUNNING'")
    states = [s for (s,) in _pg(optuna_db, "select state from trials")]
    _check_trials(states)
    versions = _pg(mlflow_db, "select name, version from model_versions where name = %s", (MODEL,))
    tags = {v: dict(_pg(mlflow_db, "select key, value from model_version_tags where name = %s and version = %s", (MODEL, v))) for _, v in versions}
    aliases = dict(_pg(mlflow_db, "select alias, version from registered_model_aliases where name = %s", (MODEL,)))
    _check_registry(versions, tags, aliases)
