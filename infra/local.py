"""The team stack, natively on loopback: ``python infra/local.py up|down|status|env``.

The same services as ``infra/docker-compose.yml``, without a container engine:

* PostgreSQL is expected to run already (``--pg-url``, default ``postgresql://postgres@127.0.0.1:5432``);
  ``up`` creates the databases ``<prefix>_mlflow``, ``<prefix>_prefect`` and ``<prefix>_optuna``.
* ``mlflow server`` with the PostgreSQL backend store and proxied artifacts in ``<state>/mlartifacts``,
  as the ``selfattn`` app (MLflow's own, its UI opening an experiment on its training runs in a
  fresh browser: flows/mlflow_app.py); with ``--mlflow-auth`` the ``selfattn-auth`` app (the same
  behind MLflow's basic-auth app, admin password from ``MLFLOW_AUTH_ADMIN_PASSWORD``).
* ``prefect server start`` on PostgreSQL (``PREFECT_HOME`` under the state directory).
* a process work pool and ``prefect worker start --pool <pool>``, which runs deployments with the
  stack's URLs in its environment.

``up`` waits until every service answers its health check, then writes ``<state>/stack.json``
(pids, ports, URLs) and ``<state>/stack.env`` (``MLFLOW_TRACKING_URI``, ``PREFECT_API_URL``,
``SELFATTN_OPTUNA_STORAGE``, ...). ``down`` stops each service's whole process tree (SIGTERM,
then SIGKILL after a grace period) and, with ``--drop-databases``, drops the databases.
Every option also reads an environment variable (shown in ``--help``), so tests can start a
private stack on free ports with throwaway databases.

Process trees, signals and liveness go through psutil; what is ours is the databases, the
commands that start each service, their health checks and the env file.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import psutil

REPO_DIR = Path(__file__).resolve().parents[1]
DEFAULT_STATE_DIR = REPO_DIR / ".selfattn" / "stack"
DEFAULT_POOL = "selfattn-process"
SERVICES = ("mlflow", "prefect", "worker")  # start order; stopped in reverse


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message names the service and its log."""


# --------------------------------------------------------------------------- settings


@dataclass
class StackSettings:
    """Where and how the stack runs. Ports 0 mean "pick a free port"."""

    state_dir: Path = DEFAULT_STATE_DIR
    pg_url: str = "postgresql://postgres@127.0.0.1:5432"
    db_prefix: str = "selfattn"
    host: str = "127.0.0.1"
    mlflow_port: int = 5000
    prefect_port: int = 4200
    pool: str = DEFAULT_POOL
    worker: bool = True
    prefect_ui: bool = True
    mlflow_auth: bool = False
    mlflow_workers: int = 1
    mlflow_jobs: bool = False  # MLflow's GenAI job runner (8 extra processes); off unless asked for
    timeout_s: float = 180.0

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        if not self.db_prefix.replace("_", "").isalnum() or not self.db_prefix[0].isalpha():
            raise ValueError(f"db_prefix ({self.db_prefix!r}) must be letters, digits and '_', starting with a letter")
        for name in ("mlflow_port", "prefect_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(f"{name} ({port}) must be in 0..65535 (0 = any free port)")
        if urllib.parse.urlsplit(self.pg_url).scheme not in ("postgresql", "postgres"):
            raise ValueError(f"pg_url ({self.pg_url!r}) must start with postgresql://")

    def db_name(self, service: str) -> str:
        return f"{self.db_prefix}_{service}"

    def db_url(self, service: str, driver: str = "") -> str:
        """``postgresql[+driver]://user@host:port/<prefix>_<service>`` (query string kept)."""
        parts = urllib.parse.urlsplit(self.pg_url)
        scheme = "postgresql" + (f"+{driver}" if driver else "")
        return urllib.parse.urlunsplit((scheme, parts.netloc, "/" + self.db_name(service), parts.query, ""))


@dataclass
class Stack:
    """What ``up`` started: written to ``<state>/stack.json`` and read back by ``down``/``status``."""

    settings: dict
    mlflow_url: str
    prefect_api_url: str
    optuna_storage: str
    pool: str
    pids: dict[str, int] = field(default_factory=dict)
    # psutil's create_time per service, so a recycled pid is never mistaken for ours
    started: dict[str, float] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)

    def client_env(self) -> dict[str, str]:
        """Variables a client (``selfattn run``, ``prefect deployment run``, ...) needs to use the stack."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PREFECT_API_URL": self.prefect_api_url,
            "SELFATTN_OPTUNA_STORAGE": self.optuna_storage,
            "SELFATTN_WORK_POOL": self.pool,
        }

    def process(self, name: str) -> psutil.Process | None:
        """The live process of service ``name`` (None if gone, a zombie or a recycled pid)."""
        try:
            proc = psutil.Process(self.pids[name])
            same = abs(proc.create_time() - self.started.get(name, proc.create_time())) < 1e-3
            return proc if same and _running(proc) else None
        except (KeyError, psutil.Error):
            return None


# --------------------------------------------------------------------------- processes (psutil)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def process_tree(root_pid: int) -> set[int]:
    """The live (non-zombie) processes of ``root_pid``'s tree."""
    try:
        root = psutil.Process(root_pid)
        return {p.pid for p in [root, *root.children(recursive=True)] if _running(p)}
    except psutil.NoSuchProcess:
        return set()


def stop_process_tree(root: psutil.Process, grace_s: float = 20.0) -> set[int]:
    """SIGTERM ``root``'s whole tree, SIGKILL what is left after ``grace_s``; returns the pids seen."""
    procs = [root, *root.children(recursive=True)]
    for sig in ("terminate", "kill"):
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                getattr(p, sig)()
        _, alive = psutil.wait_procs(procs, timeout=grace_s if sig == "terminate" else 10)
        if not alive:
            return {p.pid for p in procs}
    raise StackError(f"processes {sorted(p.pid for p in alive)} of pid {root.pid} survived SIGKILL")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _http(url: str, body: dict | None = None, auth: tuple[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET (or POST a JSON ``body``); returns (status, payload) for 2xx and HTTP errors alike."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if auth:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _healthy(check: Callable[[], bool]) -> bool:
    try:
        return bool(check())
    except (OSError, urllib.error.URLError, ValueError):
        return False


def wait_ready(what: str, proc: psutil.Process, check: Callable[[], bool], log_path: Path, timeout_s: float) -> None:
    """Poll ``check`` until it passes; fail early (with the log's tail) if ``proc`` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _running(proc):
            raise StackError(f"{what} exited during start-up; see {log_path}:\n{_tail(log_path)}")
        if _healthy(check):
            return
        time.sleep(0.5)
    raise StackError(f"{what} not healthy after {timeout_s:.0f}s; see {log_path}:\n{_tail(log_path)}")


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- databases


def _pg_connect(pg_url: str):
    import psycopg2

    parts = urllib.parse.urlsplit(pg_url)
    conn = psycopg2.connect(urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, "")))
    conn.autocommit = True
    return conn


def _databases(settings: StackSettings) -> list[str]:
    return [settings.db_name(s) for s in ("mlflow", "prefect", "optuna")]


def create_databases(settings: StackSettings) -> list[str]:
    """Create ``<prefix>_{mlflow,prefect,optuna}`` if missing; returns the names."""
    from psycopg2 import sql

    names = _databases(settings)
    conn = _pg_connect(settings.pg_url)
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    return names


def drop_databases(settings: StackSettings) -> list[str]:
    """Drop the stack's databases (closing any connection still open); returns the names."""
    from psycopg2 import sql

    names = _databases(settings)
    conn = _pg_connect(settings.pg_url)
    try:
        with conn.cursor() as cur:
            for name in names:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    finally:
        conn.close()
    return names


# --------------------------------------------------------------------------- services


def _bin(name: str) -> str:
    """The console script next to this interpreter (so a venv's mlflow/prefect win), else PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise StackError(f"{name!r} not found next to {sys.executable} or on PATH; pip install -e '.[dev]'")
    return found


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> psutil.Process:
    """Start ``cmd`` in its own session (so ``down`` can stop its whole group), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    return psutil.Process(popen.pid)


def _base_env(settings: StackSettings) -> dict[str, str]:
    env = dict(os.environ)
    # a client configuration inherited from the shell must not leak into the servers
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_API_KEY"):
        env.pop(key, None)
    env["PREFECT_HOME"] = str(settings.state_dir / "prefect_home")
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Service:
    """How to start one service and how to tell it is ready."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    cwd: Path
    ready: Callable[[], bool]


def mlflow_service(settings: StackSettings, port: int) -> Service:
    """``mlflow server`` on PostgreSQL with proxied artifacts, as the ``selfattn`` app (MLflow's,
    its UI opening an experiment on its training runs: flows/mlflow_app.py); with auth, the
    ``selfattn-auth`` app (the same behind MLflow's basic-auth app)."""
    state = settings.state_dir
    (state / "mlartifacts").mkdir(parents=True, exist_ok=True)
    env = _base_env(settings)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if settings.mlflow_jobs else "false"
    app = "selfattn-auth" if settings.mlflow_auth else "selfattn"  # flows/mlflow_app.py (pyproject's mlflow.app entry points)
    if settings.mlflow_auth and settings.mlflow_jobs:
        # MLflow gives its job runner the token for the auth-protected gateway routes only when the
        # app is named basic-auth: jobs win over the UI's default view
        app = "basic-auth"
    cmd = [
        _bin("mlflow"), "server",
        "--backend-store-uri", settings.db_url("mlflow", driver="psycopg2"),
        "--artifacts-destination", str(state / "mlartifacts"),
        "--serve-artifacts",
        "--host", settings.host, "--port", str(port),
        "--workers", str(settings.mlflow_workers),
        "--app-name", app,
    ]  # fmt: skip
    auth = None
    if settings.mlflow_auth:
        password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        if not password:
            raise StackError("--mlflow-auth needs MLFLOW_AUTH_ADMIN_PASSWORD in the environment (never on the command line)")
        ini = state / "mlflow_auth.ini"
        ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{state / 'mlflow_auth.db'}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", os.urandom(16).hex())
        auth = (os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"), password)
    url = f"http://{settings.host}:{port}/health"
    return Service("mlflow", cmd, env, state, lambda: _http(url, auth=auth)[0] == 200)


def prefect_service(settings: StackSettings, port: int) -> Service:
    env = _base_env(settings)
    env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = settings.db_url("prefect", driver="asyncpg")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_UI_ENABLED"] = "true" if settings.prefect_ui else "false"
    # the browser calls this URL; without it the UI says "Can't connect to Server API"
    env["PREFECT_UI_API_URL"] = f"http://{settings.host}:{port}/api"
    cmd = [_bin("prefect"), "server", "start", "--host", settings.host, "--port", str(port)]
    url = f"http://{settings.host}:{port}/api/health"
    return Service("prefect", cmd, env, settings.state_dir, lambda: _http(url)[0] == 200)


def worker_service(settings: StackSettings, stack: Stack) -> Service:
    env = _base_env(settings)
    env.update(stack.client_env())
    env.setdefault("SELFATTN_DATA_DIR", str(REPO_DIR.parent / "shared" / "data"))
    # the pipeline's caches and run folders: the worker's own home unless one is configured
    env["SELFATTN_HOME"] = os.environ.get("SELFATTN_HOME") or str(settings.state_dir / "selfattn_home")
    cmd = [_bin("prefect"), "worker", "start", "--pool", settings.pool, "--type", "process"]
    api = stack.prefect_api_url
    # flow runs start in the worker's directory; deployments from infra/prefect.yaml set their own
    return Service("worker", cmd, env, REPO_DIR, lambda: worker_online(api, settings.pool))


def worker_online(prefect_api_url: str, pool: str) -> bool:
    """True once a worker of ``pool`` has sent a heartbeat to the Prefect server."""
    status, raw = _http(f"{prefect_api_url}/work_pools/{pool}/workers/filter", body={})
    return status == 200 and any(w.get("status") == "ONLINE" for w in json.loads(raw))


def _create_pool(settings: StackSettings, stack: Stack) -> None:
    if _http(f"{stack.prefect_api_url}/work_pools/{settings.pool}")[0] == 200:
        return
    env = {**_base_env(settings), "PREFECT_API_URL": stack.prefect_api_url}
    proc = subprocess.run(
        [_bin("prefect"), "work-pool", "create", settings.pool, "--type", "process"],
        env=env, capture_output=True, text=True, timeout=settings.timeout_s,
    )  # fmt: skip
    if proc.returncode != 0:
        raise StackError(f"could not create work pool {settings.pool!r}:\n{proc.stdout}\n{proc.stderr}")


# --------------------------------------------------------------------------- commands


def _state_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def load_stack(state_dir: Path) -> Stack | None:
    path = _state_file(Path(state_dir))
    if not path.is_file():
        return None
    return Stack(**json.loads(path.read_text()))


def _write_stack(stack: Stack, state_dir: Path) -> None:
    _state_file(state_dir).write_text(json.dumps(asdict(stack), indent=2) + "\n")
    (state_dir / "stack.env").write_text("".join(f"{k}={v}\n" for k, v in stack.client_env().items()))


def up(settings: StackSettings) -> Stack:
    """Start the stack (databases, MLflow, Prefect, worker) and wait for health; idempotent."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    running = load_stack(settings.state_dir)
    if running is not None:
        if all(running.process(name) for name in running.pids):
            return running
        down(settings.state_dir)  # a half-dead stack: clean it up and start again

    create_databases(settings)
    mlflow_port = settings.mlflow_port or free_port(settings.host)
    prefect_port = settings.prefect_port or free_port(settings.host)
    for name, port in (("mlflow", mlflow_port), ("prefect", prefect_port)):
        if _port_open(settings.host, port):
            raise StackError(f"{name} port {port} on {settings.host} is already in use; pick another (0 = any free port)")
    stack = Stack(
        settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        mlflow_url=f"http://{settings.host}:{mlflow_port}",
        prefect_api_url=f"http://{settings.host}:{prefect_port}/api",
        optuna_storage=settings.db_url("optuna", driver="psycopg2"),
        pool=settings.pool,
        logs={s: str(settings.state_dir / "logs" / f"{s}.log") for s in SERVICES},
    )
    _write_stack(stack, settings.state_dir)
    try:
        # MLflow and Prefect boot side by side; each pid is recorded as soon as it exists, so a
        # failed start is still cleaned up by down()
        _start(stack, settings, [mlflow_service(settings, mlflow_port), prefect_service(settings, prefect_port)])
        if settings.worker:
            _create_pool(settings, stack)
            _start(stack, settings, [worker_service(settings, stack)])
    except BaseException:
        down(settings.state_dir)
        raise
    return stack


def _start(stack: Stack, settings: StackSettings, services: list[Service]) -> None:
    procs = {}
    for svc in services:
        procs[svc.name] = _spawn(svc.cmd, svc.env, Path(stack.logs[svc.name]), svc.cwd)
        stack.pids[svc.name], stack.started[svc.name] = procs[svc.name].pid, procs[svc.name].create_time()
        _write_stack(stack, settings.state_dir)
    for svc in services:
        wait_ready(svc.name, procs[svc.name], svc.ready, Path(stack.logs[svc.name]), settings.timeout_s)


def down(state_dir: Path, drop: bool = False, settings: StackSettings | None = None) -> dict[str, list[int]]:
    """Stop every service of the stack in ``state_dir`` (reverse start order); returns the pids stopped.

    With ``drop``, the stack's databases are dropped too: those recorded in ``stack.json``, or, when
    no stack is recorded (e.g. ``up`` failed and cleaned up), those named by ``settings``.
    """
    state_dir = Path(state_dir).resolve()
    stack = load_stack(state_dir)
    stopped: dict[str, list[int]] = {}
    if stack is not None:
        for name in reversed([n for n in SERVICES if n in stack.pids]):
            proc = stack.process(name)
            if proc is not None:
                stopped[name] = sorted(stop_process_tree(proc))
        _state_file(state_dir).unlink(missing_ok=True)
        (state_dir / "stack.env").unlink(missing_ok=True)
        if drop:
            recorded = stack.settings
            drop_databases(StackSettings(state_dir=state_dir, pg_url=recorded["pg_url"], db_prefix=recorded["db_prefix"]))
    elif drop and settings is not None:
        drop_databases(settings)
    return stopped


def status(state_dir: Path) -> dict[str, object]:
    """Each service: pid, alive, healthy."""
    stack = load_stack(state_dir)
    if stack is None:
        return {"running": False}
    out: dict[str, object] = {"running": True, **stack.client_env()}
    checks = {
        "mlflow": lambda: _http(f"{stack.mlflow_url}/health")[0] == 200,
        "prefect": lambda: _http(f"{stack.prefect_api_url}/health")[0] == 200,
        "worker": lambda: worker_online(stack.prefect_api_url, stack.pool),
    }
    for name, pid in stack.pids.items():
        alive = stack.process(name) is not None
        healthy = alive and _healthy(checks[name])
        out[name] = {"pid": pid, "alive": alive, "healthy": healthy, "log": stack.logs.get(name)}
    return out


# --------------------------------------------------------------------------- CLI


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    if raw == "auto":
        return 0
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"error: {name}={raw!r} is not an integer (0 or 'auto' = any free port)") from None


def _parser() -> argparse.ArgumentParser:
    e = os.environ.get
    p = argparse.ArgumentParser(prog="infra/local.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--state-dir", default=e("SELFATTN_STACK_DIR", str(DEFAULT_STATE_DIR)), help="pids, logs, artifacts [SELFATTN_STACK_DIR]")
    p.add_argument("--pg-url", default=e("SELFATTN_PG_URL", StackSettings.pg_url), help="PostgreSQL server (admin) [SELFATTN_PG_URL]")
    p.add_argument("--db-prefix", default=e("SELFATTN_DB_PREFIX", "selfattn"), help="databases <prefix>_{mlflow,prefect,optuna} [SELFATTN_DB_PREFIX]")
    p.add_argument("--host", default=e("SELFATTN_STACK_HOST", "127.0.0.1"), help="bind address [SELFATTN_STACK_HOST]")
    p.add_argument("--mlflow-port", type=int, default=_env_int("SELFATTN_MLFLOW_PORT", 5000), help="0 = any free port [SELFATTN_MLFLOW_PORT]")
    p.add_argument("--prefect-port", type=int, default=_env_int("SELFATTN_PREFECT_PORT", 4200), help="0 = any free port [SELFATTN_PREFECT_PORT]")
    p.add_argument("--pool", default=e("SELFATTN_WORK_POOL", DEFAULT_POOL), help="process work pool [SELFATTN_WORK_POOL]")
    p.add_argument("--no-worker", action="store_true", help="do not start a Prefect worker")
    p.add_argument("--no-prefect-ui", action="store_true", help="serve the Prefect API only")
    p.add_argument("--mlflow-jobs", action="store_true", help="enable the MLflow server's job runner (GenAI jobs; extra processes)")
    p.add_argument("--mlflow-auth", action="store_true", help="MLflow's basic-auth app (selfattn-auth); admin password from MLFLOW_AUTH_ADMIN_PASSWORD")
    p.add_argument("--timeout", type=float, default=float(e("SELFATTN_STACK_TIMEOUT", "180")), help="seconds to wait for each service")
    p.add_argument("--drop-databases", action="store_true", help="down: also drop the stack's databases")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    state_dir = Path(args.state_dir).resolve()
    try:
        if args.command == "up":
            settings = StackSettings(
                state_dir=state_dir, pg_url=args.pg_url, db_prefix=args.db_prefix, host=args.host,
                mlflow_port=args.mlflow_port, prefect_port=args.prefect_port, pool=args.pool,
                worker=not args.no_worker, prefect_ui=not args.no_prefect_ui, mlflow_auth=args.mlflow_auth,
                mlflow_jobs=args.mlflow_jobs, timeout_s=args.timeout,
            )  # fmt: skip
            stack = up(settings)
            print(f"stack up (state: {state_dir}); use it with:  set -a; . {state_dir / 'stack.env'}; set +a")
            for k, v in stack.client_env().items():
                print(f"  {k}={v}")
        elif args.command == "down":
            named = StackSettings(state_dir=state_dir, pg_url=args.pg_url, db_prefix=args.db_prefix)
            stopped = down(state_dir, drop=args.drop_databases, settings=named)
            print("stopped: " + (", ".join(f"{k} ({len(v)} processes)" for k, v in stopped.items()) or "nothing was running"))
        elif args.command == "status":
            info = status(state_dir)
            print(json.dumps(info, indent=2))
            healthy = info.get("running") and all(v.get("healthy") for v in info.values() if isinstance(v, dict))
            return 0 if healthy else 1
        else:  # env: lines for `eval "$(infra/local.sh env)"`
            stack = load_stack(state_dir)
            if stack is None:
                print(f"error: no stack running under {state_dir}", file=sys.stderr)
                return 1
            for k, v in stack.client_env().items():
                print(f"export {k}={v}")
    except (StackError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
