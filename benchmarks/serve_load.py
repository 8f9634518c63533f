"""``mlflow models serve`` of the champion under load, and its answers to hostile requests.

    python benchmarks/serve_load.py --home $SELFATTN_HOME [--model models:/NAME@champion]
        [--requests 2000] [--clients 16] [--json out.json]

Starts ``mlflow models serve`` on a free loopback port (``--env-manager local``), sends
``--requests`` requests of ``--batch`` sentences from ``--clients`` threads (one keep-alive
connection each, a bounded number of requests per thread), and records errors, p50/p99 latency
and sentences/s. The peer, measured in the same run: the same model's ``predict_texts`` called
in this process (no HTTP, no JSON), so the ratio is the cost of serving. Then the hostile cases
(non-strings, nested JSON, invalid JSON, a 10 MB string, an empty list, 100k short rows): status,
message, wall time, the server's peak RSS, and whether ``/ping`` still answers after each.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

SENTENCES = [
    "a gripping , beautifully acted film .",
    "a dull , lifeless mess .",
    "the plot is thin but the jokes land .",
    "i walked out after an hour .",
]

HOSTILE = {
    "numbers_and_null": b'{"inputs": [1, 2, null]}',
    "one_bad_row": b'{"inputs": ["fine", "also fine", 3]}',
    "nested_lists": b'{"inputs": [["a", "b"], ["c", "d"]]}',
    "nested_object_row": b'{"inputs": [{"text": {"deep": 1}}]}',
    "invalid_json": b'{"inputs": ["unterminated',
    "empty_list": b'{"inputs": []}',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_uri: str, env: dict[str, str], log_path: Path, timeout_s: float = 300) -> tuple[subprocess.Popen, int]:
    """``mlflow models serve`` on a free loopback port; returns once ``/ping`` answers."""
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        if ping(port):
            return proc, port
        time.sleep(1)
    stop_server(proc)
    raise TimeoutError(f"mlflow models serve did not answer /ping within {timeout_s:.0f}s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def ping(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/ping")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def post(port: int, body: bytes, timeout: float = 120, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def server_rss_mb(proc: subprocess.Popen) -> float:
    """Resident memory of the server and its workers (uvicorn forks), in MiB."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20
    except psutil.Error:
        return float("nan")


def load(port: int, *, requests: int, clients: int, batch: int) -> dict:
    """``requests`` POSTs of ``batch`` sentences from ``clients`` threads; latencies and errors."""
    body = json.dumps({"inputs": [SENTENCES[i % len(SENTENCES)] for i in range(batch)]}).encode()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        for _ in range(n):  # bounded: exactly n requests per client
            t0 = time.perf_counter()
            try:
                status, raw = post(port, body, conn=conn)
                ok = status == 200 and len(json.loads(raw)["predictions"]) == batch
                err = None if ok else f"HTTP {status}: {raw[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                err = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if err:
                    errors.append(err)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies), "clients": clients, "batch": batch, "errors": len(errors),
        "first_errors": errors[:3], "wall_s": round(wall, 2),
        "p50_ms": round(q[49] * 1000, 1), "p99_ms": round(q[98] * 1000, 1),
        "sentences_per_s": round(len(latencies) * batch / wall, 1),
    }  # fmt: skip


def hostile(port: int, proc: subprocess.Popen) -> dict:
    """Each hostile request: status, the message's start, seconds, server RSS, /ping after."""
    cases = dict(HOSTILE)
    cases["string_10mb"] = json.dumps({"inputs": ["a" * 10_000_000]}).encode()
    cases["rows_100k"] = json.dumps({"inputs": ["ok"] * 100_000}).encode()
    out = {}
    for name, body in cases.items():
        t0 = time.perf_counter()
        status, raw = post(port, body, timeout=300)
        dt = time.perf_counter() - t0
        text = raw.decode(errors="replace")
        try:
            parsed = json.loads(text)
            message = parsed.get("message", "") if isinstance(parsed, dict) else ""
            warning = (parsed.get("predictions") or [{}])[0].get("warning", "") if isinstance(parsed, dict) and parsed.get("predictions") else ""
        except ValueError:
            message, warning = text[:300], ""
        out[name] = {
            "status": status, "seconds": round(dt, 2), "message": message[-300:], "warning": warning[:200],
            "server_rss_mb": round(server_rss_mb(proc), 1), "ping_after": ping(port),
        }  # fmt: skip
    return out


def in_process_peer(model_uri: str, *, batch: int, n_batches: int) -> float:
    """Sentences/s of the same model's ``predict`` in this process (the no-serving peer)."""
    import mlflow

    import pandas as pd

    model = mlflow.pyfunc.load_model(model_uri)
    texts = pd.DataFrame({"text": [SENTENCES[i % len(SENTENCES)] for i in range(batch)]})
    model.predict(texts)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_batches):
        model.predict(texts)
    return n_batches * batch / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", required=True, help="SELFATTN_HOME holding the registry (sqlite) of a pipeline run")
    ap.add_argument("--model", default="models:/selfattn-sst2-smoke@champion")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1, help="sentences per request")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    home = Path(args.home)
    env = dict(os.environ, SELFATTN_HOME=str(home))
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    os.environ.update({"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"]})
    proc, port = start_server(args.model, env, home / "serve_load.log")
    try:
        rss_idle = server_rss_mb(proc)
        result = {"model": args.model, "server_rss_idle_mb": round(rss_idle, 1)}
        result["load"] = load(port, requests=args.requests, clients=args.clients, batch=args.batch)
        result["server_rss_after_load_mb"] = round(server_rss_mb(proc), 1)
        result["hostile"] = hostile(port, proc)
        result["server_up_at_end"] = ping(port) and proc.poll() is None
    finally:
        stop_server(proc)
    peer = in_process_peer(args.model, batch=args.batch, n_batches=200)
    result["peer_in_process_sentences_per_s"] = round(peer, 1)
    result["served_over_in_process"] = round(result["load"]["sentences_per_s"] / peer, 3)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0 if result["load"]["errors"] == 0 and result["server_up_at_end"] else 1


if __name__ == "__main__":
    sys.exit(main())
