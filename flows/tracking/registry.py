"""MLflow Model Registry: idempotent registration, the champion gate, manual promote and rollback.

Aliases: every registered version gets ``challenger``; ``champion`` moves only through
:func:`gate` (better than the current champion on the same evaluation set by a margin, or no
champion), :func:`promote` (manual) or :func:`rollback`. The champion history lives in the
registered model's ``champion_history`` tag (``v1 -> v3 -> v5``, oldest first) and the
``previous_champion`` alias, so a rollback always knows where to go back to.

Race freedom: the read-compare-move of registration, the gate, promote and rollback runs under
one exclusive lock per registered model that holds across hosts (:func:`registry_lock`): a
PostgreSQL advisory lock when the store is a PostgreSQL database, a lease in the registry itself
(creating a lock model is a compare-and-set: the store's unique name) against an MLflow server,
and a file lock for SQLite, whose file lives on one machine anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

from flows.paths import selfattn_home
from flows.reliability import file_lock, pid_alive, server_unreachable
from flows.stages.register import (
    TAG_EVAL_DIGEST,
    TAG_METRIC,
    TAG_RUN_KEY,
    TAG_SCORE,
    Decision,
    decide,
)
from selfattn.errors import UserError

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous_champion"
HISTORY_TAG = "champion_history"


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


log = logging.getLogger(__name__)

LOCK_SUFFIX = ".selfattn-lock"
TAG_LOCK_OWNER = "selfattn.lock.owner"
TAG_LOCK_EXPIRES = "selfattn.lock.expires"
LEASE_S = 600.0  # a gate takes seconds; a lease this old belongs to a process that died


@contextlib.contextmanager
def registry_lock(model_name: str, home: Path | None = None, timeout_s: float = 120.0) -> Iterator[None]:
    """Exclusive lock for one registered model, for every process that uses the same registry.

    PostgreSQL store: ``pg_try_advisory_lock`` in that database (released by the server when
    the holder's connection dies). MLflow server (http): :func:`_registry_lease`. SQLite: a
    file lock next to the home (a SQLite file is only shared on one machine).
    """
    import mlflow

    uri = mlflow.get_registry_uri() or ""
    if uri.startswith(("postgresql", "postgres")):
        with _advisory_lock(uri, f"selfattn.registry:{model_name}", timeout_s):
            yield
    elif uri.startswith(("http://", "https://")):
        with _registry_lease(model_name, timeout_s):
            yield
    else:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)
        with file_lock((home or selfattn_home()) / "locks" / f"registry-{safe}.lock", timeout_s=timeout_s, poll_s=0.05):
            yield


@contextlib.contextmanager
def _advisory_lock(db_uri: str, name: str, timeout_s: float) -> Iterator[None]:
    """A session-level PostgreSQL advisory lock keyed by ``name`` (64-bit hash)."""
    import hashlib

    import sqlalchemy as sa

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    engine = sa.create_engine(db_uri, poolclass=sa.pool.NullPool)
    deadline = time.monotonic() + timeout_s
    try:
        with engine.connect() as conn:
            while not conn.execute(sa.text("select pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                conn.rollback()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"advisory lock {name!r} (key {key}) still held after {timeout_s:.0f}s")
                time.sleep(0.05 + random.random() * 0.05)
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("select pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
    finally:
        engine.dispose()


@contextlib.contextmanager
def _registry_lease(model_name: str, timeout_s: float, client=None) -> Iterator[None]:
    """A lock held as the registered model ``<name>.selfattn-lock``, for clients of one MLflow server.

    Creating a registered model is a compare-and-set on the server's database (model names
    are unique): exactly one of two hosts creating the lock model at once gets it, the other
    waits. The owner token in its tags makes a retried create (its answer lost in an outage)
    recognise its own lock. A lease older than ``LEASE_S`` (its holder died) is taken over by
    renaming it aside first, so only one waiter can take it over.
    """
    from mlflow.exceptions import MlflowException

    client = client or _client()
    lock = f"{model_name}{LOCK_SUFFIX}"
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    deadline = time.monotonic() + timeout_s
    waiting = False
    while True:
        try:
            client.create_registered_model(
                lock, tags={TAG_LOCK_OWNER: token, TAG_LOCK_EXPIRES: f"{time.time() + LEASE_S:.0f}"},
                description=f"lock of {model_name!r} held by {token}; deleted when released",
            )
            break
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                # the server's create met the holder's lock, then looked it up to say so and found
                # it released in between (MLflow's create_registered_model): free again, try again
                if time.monotonic() > deadline:
                    raise TimeoutError(f"registry lock {lock!r} contended for {timeout_s:.0f}s") from exc
                continue
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lease_tags(client, lock)
        if held.get(TAG_LOCK_OWNER) == token:
            break
        if held and (float(held.get(TAG_LOCK_EXPIRES) or 0) < time.time() or _owner_gone(held.get(TAG_LOCK_OWNER, ""))):
            with contextlib.suppress(MlflowException):  # another waiter renamed it first
                aside = f"{lock}.stale-{uuid.uuid4().hex[:8]}"
                client.rename_registered_model(lock, aside)
                client.delete_registered_model(aside)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"registry lock {lock!r} still held by {held.get(TAG_LOCK_OWNER)!r} after {timeout_s:.0f}s")
        if not waiting:
            waiting = True
            log.info("registry lock %r is held by %s: waiting", lock, held.get(TAG_LOCK_OWNER))
        time.sleep(0.1 + random.random() * 0.2)
    try:
        yield
    finally:
        try:
            if _lease_tags(client, lock).get(TAG_LOCK_OWNER) == token:
                client.delete_registered_model(lock)
        except MlflowException:
            # the server went away while we held the lease: whoever asks next (this process
            # on a retry, or the next run on this host) may take it over at once
            _ABANDONED.add(token)
            raise


_ABANDONED: set[str] = set()


def _owner_gone(owner: str) -> bool:
    """A lease whose holder cannot be holding it any more: a lease this process gave up on,
    or one held by a process of this host that has died (``host:pid:uuid``)."""
    if owner in _ABANDONED:
        return True
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return not pid_alive(int(pid))


def _lease_tags(client, lock: str) -> dict[str, str]:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(lock).tags)
    except MlflowException:  # released between our create and this read
        return {}


# --------------------------------------------------------------------------- registration


def _reraise_outage(exc: BaseException) -> None:
    if server_unreachable(exc):
        raise exc


def find_version(model_name: str, run_key: str, client=None):
    """The version registered earlier for ``run_key`` (idempotency), or None."""
    client = client or _client()
    try:
        found = client.search_model_versions(f"name = '{model_name}' and tags.`{TAG_RUN_KEY}` = '{run_key}'")
    except Exception as exc:  # the registered model does not exist yet
        _reraise_outage(exc)  # "not found" from a server that is down would register a second version
        return None
    found = sorted(found, key=lambda mv: int(mv.version))
    return found[0] if found else None


def register(
    *,
    model_uri: str,
    model_name: str,
    run_key: str,
    tags: dict[str, str] | None = None,
    home: Path | None = None,
    client=None,
):
    """Register ``model_uri`` as a new version of ``model_name`` with alias ``challenger``.

    Idempotent: a version already tagged with ``run_key`` is returned instead of a second one,
    so a pipeline killed during registration and run again ends with exactly one version.
    """
    import mlflow

    client = client or _client()
    all_tags = {TAG_RUN_KEY: run_key, **{k: str(v) for k, v in (tags or {}).items()}}
    with registry_lock(model_name, home):
        mv = find_version(model_name, run_key, client)
        if mv is None:
            mv = mlflow.register_model(model_uri, model_name, tags=all_tags)
            # a create re-sent by the client after a lost answer (the server committed it, then
            # went away) is a second version of the same run: keep the first, drop the others
            first = find_version(model_name, run_key, client)
            for extra in client.search_model_versions(f"name = '{model_name}' and tags.`{TAG_RUN_KEY}` = '{run_key}'"):
                if first is not None and int(extra.version) > int(first.version) and not extra.aliases:
                    client.delete_model_version(model_name, str(extra.version))
            mv = first or mv
        else:
            for k, v in all_tags.items():
                if mv.tags.get(k) != v:
                    client.set_model_version_tag(model_name, str(mv.version), k, v)
        client.set_registered_model_alias(model_name, CHALLENGER, str(mv.version))
    return client.get_model_version(model_name, mv.version)


# --------------------------------------------------------------------------- champion


def champion_version(model_name: str, client=None):
    """The version holding alias ``champion``, or None."""
    client = client or _client()
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except Exception as exc:
        _reraise_outage(exc)  # "no champion" from a server that is down would promote anything
        return None


def _history(model_name: str, client) -> list[str]:
    rm = client.get_registered_model(model_name)
    return parse_history(rm.tags.get(HISTORY_TAG, ""))


def format_history(versions: list[str]) -> str:
    """The champion history as the model's tag shows it, oldest first: ``v1 -> v3 -> v5``."""
    return " -> ".join(f"v{v}" for v in versions)


def parse_history(text: str) -> list[str]:
    """Versions from :func:`format_history`'s text (or the older ``1,3,5``), oldest first."""
    return re.findall(r"\d+", text)


def _move_champion(model_name: str, version: str, client) -> str | None:
    """Point ``champion`` at ``version``; remember the old one. Caller holds the lock."""
    old = champion_version(model_name, client)
    if old is not None and str(old.version) == str(version):
        return str(old.version)
    history = _history(model_name, client)
    if old is not None:
        client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, str(old.version))
        client.set_model_version_tag(model_name, version, "previous_champion", str(old.version))
        if not history or history[-1] != str(old.version):
            history.append(str(old.version))
    history.append(str(version))
    client.set_registered_model_alias(model_name, CHAMPION, str(version))
    client.set_registered_model_tag(model_name, HISTORY_TAG, format_history(history))
    return str(old.version) if old is not None else None


def gate(
    *,
    model_name: str,
    version: str,
    metric: str,
    margin: float,
    home: Path | None = None,
    client=None,
    slices: dict[str, float] | None = None,
) -> Decision:
    """Move ``champion`` to ``version`` if :func:`flows.stages.register.decide` says so.

    Under the registry lock: read the challenger's and the champion's version tags, decide,
    move the alias when promoted, and write the decision into the challenger's version tags.
    """
    client = client or _client()
    version = str(version)
    with registry_lock(model_name, home):
        mv = client.get_model_version(model_name, version)
        champ = champion_version(model_name, client)
        decision = decide(
            model_name=model_name, version=version, tags=mv.tags, metric=metric, margin=margin, slices=slices,
            champion_version=str(champ.version) if champ is not None else None, champion_tags=champ.tags if champ is not None else None,
        )
        if decision.promoted:
            _move_champion(model_name, version, client)
        for k, v in decision.tags().items():
            client.set_model_version_tag(model_name, version, k, v)
    return decision


def promote(model_name: str, version: str | int, *, home: Path | None = None, client=None) -> str | None:
    """Manually make ``version`` the champion; returns the previous champion's version."""
    client = client or _client()
    version = str(version)
    _check_version(model_name, version, client)
    with registry_lock(model_name, home):
        old = _move_champion(model_name, version, client)
        client.set_model_version_tag(model_name, version, "promotion.decision", "promoted (manual)")
    return old


def rollback(model_name: str, *, home: Path | None = None, client=None) -> str:
    """Move ``champion`` back to the previous champion; returns the version now champion."""
    client = client or _client()
    _check_model(model_name, client)
    with registry_lock(model_name, home):
        history = _history(model_name, client)
        current = champion_version(model_name, client)
        if current is not None and history and history[-1] == str(current.version):
            history = history[:-1]
        if not history:
            raise UserError(f"model {model_name!r} has no previous champion to roll back to")
        target = history[-1]
        client.set_registered_model_alias(model_name, CHAMPION, target)
        if current is not None:
            client.set_model_version_tag(model_name, str(current.version), "promotion.decision", f"rolled back to v{target}")
        if len(history) > 1:
            client.set_registered_model_alias(model_name, PREVIOUS_CHAMPION, history[-2])
        else:
            with contextlib.suppress(Exception):
                client.delete_registered_model_alias(model_name, PREVIOUS_CHAMPION)
        client.set_registered_model_tag(model_name, HISTORY_TAG, format_history(history))
    return target


def describe(model_name: str, client=None) -> dict:
    """Aliases and history of a registered model (for the CLI and the run summary)."""
    client = client or _client()
    rm = client.get_registered_model(model_name)
    return {
        "name": model_name,
        "aliases": {k: str(v) for k, v in (rm.aliases or {}).items()},
        "history": _history(model_name, client),
    }


def registry_uri() -> str:
    import mlflow

    return mlflow.get_registry_uri()


# --------------------------------------------------------------------------- lookups that name the store


def registered_models(client=None) -> list[str]:
    """The names of the registered models in the configured store (lock models left out), sorted."""
    client = client or _client()
    names = [rm.name for rm in client.search_registered_models(max_results=1000)]
    return sorted(n for n in names if LOCK_SUFFIX not in n)


def model_not_found(model_name: str, client=None) -> UserError:
    """The error for a registered model that is not in the store: names the store and lists what is there."""
    names = registered_models(client)
    there = ", ".join(names) if names else "none yet (`selfattn run` registers one)"
    return UserError(f"registered model {model_name!r} not found in the model store {registry_uri()}; registered models there: {there}")


def _is_missing(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    _reraise_outage(exc)
    return isinstance(exc, MlflowException) and exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def _check_model(model_name: str, client):
    """The registered model ``model_name``, or a :func:`model_not_found` error."""
    try:
        return client.get_registered_model(model_name)
    except Exception as exc:
        if _is_missing(exc):
            raise model_not_found(model_name, client) from None
        raise


def _versions_line(model_name: str, client) -> str:
    rm = client.get_registered_model(model_name)
    versions = sorted(int(mv.version) for mv in client.search_model_versions(f"name = '{model_name}'"))
    aliases = ", ".join(f"{a} -> v{v}" for a, v in sorted((rm.aliases or {}).items())) or "none"
    return f"its versions: {', '.join(map(str, versions)) or 'none'}; its aliases: {aliases}"


def _check_member(model_name: str, kind: str, value: str, lookup, client) -> None:
    """Refuse a version or alias (``kind``) that ``lookup(model_name, value)`` cannot find, naming the
    store and listing the model's versions and aliases."""
    _check_model(model_name, client)
    try:
        lookup(model_name, value)
    except Exception as exc:
        if _is_missing(exc):
            raise UserError(
                f"model {model_name!r} has no {kind} {value!r} in the model store {registry_uri()}; {_versions_line(model_name, client)}"
            ) from None
        raise


def _check_version(model_name: str, version: str, client) -> None:
    _check_member(model_name, "version", version, client.get_model_version, client)


def check_model_uri(model_uri: str, client=None) -> None:
    """Refuse a ``models:/NAME@alias`` or ``models:/NAME/VERSION`` URI that the store cannot resolve,
    naming the store and listing what is there. Other URIs pass unchecked."""
    if not model_uri.startswith("models:/"):
        return
    client = client or _client()
    name, sep_alias, alias = model_uri.removeprefix("models:/").partition("@")
    if not sep_alias:
        name, _, version = name.partition("/")
        if version and version.isdigit():
            _check_version(name, version, client)
        else:
            _check_model(name, client)
        return
    _check_member(name, "alias", alias, client.get_model_version_by_alias, client)


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "TAG_EVAL_DIGEST",
    "TAG_METRIC",
    "TAG_SCORE",
    "Decision",
    "champion_version",
    "check_model_uri",
    "describe",
    "find_version",
    "format_history",
    "gate",
    "model_not_found",
    "parse_history",
    "promote",
    "register",
    "registered_models",
    "registry_lock",
    "registry_uri",
    "rollback",
]
