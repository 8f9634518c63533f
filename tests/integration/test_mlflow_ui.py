"""The MLflow 3.17 UI as a user sees it, in headless Chromium, after two real pipeline runs.

Two ``selfattn run --config smoke`` runs (the second with a longer fine-tune) on an embedded
home, then the ``mlflow server`` that ``selfattn ui`` starts (``--app-name selfattn``,
flows/mlflow_app.py) on that home's SQLite store. Each check takes a screenshot (left in
the test output folder) and reads the rendered page's text: the experiment opens as a training
experiment, the parent run lists its datasets and registered version, the compare view shows the
param that differs, and the chart view draws both runs' learning curves on one chart. The same
runs check the quiet console (and ``--verbose``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from flows.cli import mlflow_ui_command
from flows.tracking.runs import EXPERIMENT_KIND, ui_url

from .conftest import (
    REPO,
    _clean_env,
    chromium,
    mlflow_get,
    mlflow_post,
    real_data_dir,
    selfattn_cmd,
    wait_for,
)

pytestmark = pytest.mark.integration

QUIET = ("interpreted in multiple ways", "Inferred schema contains integer column", "Add type hints to the `predict` method")


def _page(url: str, png: Path, window: str = "1600,1400") -> str:
    """Screenshot ``url`` to ``png`` and return the text of its rendered DOM."""
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={window}", "--virtual-time-budget=40000"]  # fmt: skip
    shot = subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=240)
    assert png.is_file() and png.stat().st_size > 10_000, shot.stderr[-2000:]
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, timeout=240).stdout.decode(errors="replace")
    dom = re.sub(r"<style[^>]*>.*?</style>|<script[^>]*>.*?</script>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def ui(tmp_path_factory, output_dir):
    if chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    home = tmp_path_factory.mktemp("ui_home")
    env = _clean_env()
    env.update(SELFATTN_HOME=str(home), PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), PYTHONUNBUFFERED="1")
    env["SELFATTN_DATA_DIR"] = real_data_dir()
    logs = {}
    for name, extra in (("first", []), ("longer", ["--set", "finetune.train.max_steps=24"]), ("verbose", ["--verbose", "--new-run"])):
        proc = subprocess.run([*selfattn_cmd(), "run", "--config", "smoke", *extra], env=env, capture_output=True, text=True, timeout=1800)
        (output_dir / f"ui_run_{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
        assert proc.returncode == 0, proc.stderr[-4000:]
        logs[name] = proc.stdout + proc.stderr
    port = _free_port()
    # the server `selfattn ui` starts: MLflow's app with our index page (--app-name selfattn)
    cmd = mlflow_ui_command(f"sqlite:///{home / 'mlflow.db'}", home / "mlartifacts", "127.0.0.1", port)
    assert cmd[cmd.index("--app-name") + 1] == "selfattn"
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # as `selfattn ui` does
    with open(output_dir / "ui_mlflow_server.log", "wb") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    info = {"mlflow_url": f"http://127.0.0.1:{port}", "logs": logs, "output": output_dir}

    def healthy():
        try:
            with urllib.request.urlopen(f"{info['mlflow_url']}/health", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    try:
        wait_for(lambda: server.poll() is not None or healthy(), timeout=300, what="mlflow server")
        assert server.poll() is None, (output_dir / "ui_mlflow_server.log").read_text(errors="replace")[-3000:]
        exp = mlflow_get(info, "experiments/get-by-name", experiment_name="selfattn-smoke")["experiment"]
        runs = mlflow_post(info, "runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 500})["runs"]
        parents = [r for r in runs if not any(t["key"] in ("mlflow.parentRunId", "selfattn.stage") for t in r["data"].get("tags", []))]
        parents.sort(key=lambda r: r["info"]["start_time"])
        info.update(experiment=exp, parents=parents)
        yield info
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_experiment_opens_as_a_training_experiment(ui):
    exp = ui["experiment"]
    assert {t["key"]: t["value"] for t in exp.get("tags", [])}.get("mlflow.experimentKind") == EXPERIMENT_KIND
    text = _page(ui_url(ui["mlflow_url"], f"experiments/{exp['experiment_id']}/runs"), ui["output"] / "mlflow_ui_training_experiment.png")
    for r in ui["parents"]:
        assert r["info"]["run_name"] in text
    assert "Model training" in text and "Model registry" in text
    assert "Detect Issues" not in text and "Evaluation runs" not in text  # the GenAI overview is not what opens


def test_parent_run_shows_datasets_model_and_registered_version(ui):
    first = ui["parents"][0]
    assert {d["dataset"]["name"] for d in first["inputs"]["dataset_inputs"]} == {"corpus", "sst2-train", "sst2-dev"}
    assert first["outputs"]["model_outputs"], "no logged model on the parent run"
    route = f"experiments/{ui['experiment']['experiment_id']}/runs/{first['info']['run_id']}"
    text = _page(ui_url(ui["mlflow_url"], route), ui["output"] / "mlflow_ui_parent_run.png")
    assert "Datasets" in text and "corpus" in text and "+2" in text  # three datasets, the first shown
    assert "Registered models" in text and "selfattn-sst2-smoke" in text and "v1" in text
    assert "validate" in text and "finetune" in text and "register" in text  # child runs listed


def test_compare_view_shows_the_params_that_differ(ui):
    first, longer = ui["parents"][0], ui["parents"][1]
    ids = [first["info"]["run_id"], longer["info"]["run_id"]]
    url = ui_url(ui["mlflow_url"], "compare-runs", runs=json.dumps(ids), experiments=json.dumps([ui["experiment"]["experiment_id"]]))
    text = _page(url, ui["output"] / "mlflow_ui_compare.png", window="1600,6000")
    assert "Comparing 2 Runs" in text
    assert re.search(r"finetune\.train\.max_steps 16 24", text), "the differing param is not side by side"
    # the metrics table (virtualised: its first rows are rendered) holds the fine-tune's keys
    # mirrored on the parents, whose values differ between the two runs
    for key in ("accuracy", "grad_norm", "lr"):
        assert key in text


def test_learning_curves_of_both_runs_on_one_chart(ui):
    for r in ui["parents"][:2]:
        hist = mlflow_get(ui, "metrics/get-history", run_id=r["info"]["run_id"], metric_key="train_loss")["metrics"]
        assert len(hist) >= 4  # the fine-tune curve, on the parent run
    url = ui_url(ui["mlflow_url"], f"experiments/{ui['experiment']['experiment_id']}/runs", compareRunsMode="CHART")
    text = _page(url, ui["output"] / "mlflow_ui_learning_curves.png", window="1600,6000")
    assert "train_loss" in text and "Step" in text
    for r in ui["parents"][:2]:  # each line chart's legend names both runs: "<run> (train_loss)"
        assert f"{r['info']['run_name']} (train_loss)" in text, r["info"]["run_name"]


def test_console_is_quiet_and_verbose_shows_everything(ui):
    quiet, verbose = ui["logs"]["first"], ui["logs"]["verbose"]
    for stage in ("validate", "pretrain", "search", "finetune", "evaluate", "register"):
        assert f"> {stage}" in quiet and f"{stage} done in" in quiet
    assert "pipeline run" in quiet and "promoted to champion" in quiet
    assert not [w for w in QUIET if w in quiet]
    assert "Beginning subflow run" not in quiet  # Prefect's INFO stays in the Prefect UI
    assert "interpreted in multiple ways" in verbose and "Beginning subflow run" in verbose


class _Browser:
    """Headless Chromium driven over the DevTools protocol: navigate, click a link, read the page."""

    def __init__(self, profile: Path):
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--remote-debugging-port={self.port}",
             f"--user-data-dir={profile}", "--window-size=1600,1400", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self._tabs, timeout=60, what="chromium's DevTools endpoint")
        self.ws_url = next(t["webSocketDebuggerUrl"] for t in self._tabs() if t["type"] == "page")

    def _tabs(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as resp:
                return json.load(resp)
        except OSError:
            return None

    def run(self, steps):
        """``steps``: ("go", url) | ("click", link or button text) | ("read", text expected on an experiment's page)
        | ("eval", JavaScript expression) | ("shot", PNG path); returns [(url, text)] per read and
        [(expression, value)] per eval, in order."""
        import asyncio
        import time

        import websockets

        async def session():
            async with websockets.connect(self.ws_url, max_size=50_000_000) as ws:
                counter = iter(range(1, 10**6))

                async def raw(method, **params):
                    my = next(counter)
                    await ws.send(json.dumps({"id": my, "method": method, "params": params}))
                    while True:
                        msg = json.loads(await ws.recv())
                        if msg.get("id") == my:
                            return msg.get("result", {})

                async def call(method, **params):
                    return (await raw(method, **params)).get("result", {}).get("value")

                async def text_when(needle, timeout=180, url_part=""):
                    end = time.monotonic() + timeout
                    while True:
                        text = " ".join((await call("Runtime.evaluate", expression="document.body.innerText", returnByValue=True) or "").split())
                        url = await call("Runtime.evaluate", expression="location.href", returnByValue=True) or ""
                        if (needle in text and url_part in url) or time.monotonic() > end:
                            return text
                        await asyncio.sleep(1)

                reads = []
                for kind, arg in steps:
                    if kind == "go":
                        await call("Page.navigate", url=arg)
                        await asyncio.sleep(3)  # the new document replaces the old one
                    elif kind == "click":
                        click = (
                            "(() => { const named = s => [...document.querySelectorAll(s)]"
                            f".find(e => e.innerText && e.innerText.trim() === {json.dumps(arg)});"
                            " const e = named('a') || named('button, [role=radio], [role=button], span'); if (!e) return false; e.click(); return true; })()"
                        )  # fmt: skip
                        end = time.monotonic() + 180
                        while not await call("Runtime.evaluate", returnByValue=True, expression=click):
                            assert time.monotonic() < end, f"nothing to click named {arg!r}"
                            await asyncio.sleep(1)
                    elif kind == "eval":
                        reads.append((arg, await call("Runtime.evaluate", expression=arg, returnByValue=True)))
                    elif kind == "shot":
                        import base64

                        shot = await raw("Page.captureScreenshot", format="png")
                        Path(arg).write_bytes(base64.b64decode(shot["data"]))
                    else:  # read: the text on a page of an experiment
                        await text_when(arg, url_part="/experiments/")
                        await asyncio.sleep(3)  # the page settles (tabs redirect once)
                        text = await text_when(arg, url_part="/experiments/")
                        reads.append((await call("Runtime.evaluate", expression="location.href", returnByValue=True), text))
                return reads

        return asyncio.run(session())

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_from_the_home_page_a_fresh_browser_opens_an_experiment_on_its_training_runs(ui, tmp_path):
    """MLflow 3.17 picks GenAI or Model training from the sidebar switch kept in the browser
    (``localStorage`` ``mlflow.workflowType_v1``, MLflow's default GenAI), not from the experiment's
    ``mlflow.experimentKind`` tag. The ``selfattn`` app's index page sets it to Model training in a
    browser with no value yet: a fresh browser that opens the home page and clicks the experiment
    lands on its training runs. A user who then flips the switch to GenAI keeps that choice (the
    home page's link opens the GenAI overview), and the links selfattn prints still open the runs."""
    from flows.tracking.runs import training_links

    name, home = ui["experiment"]["name"], ui["mlflow_url"] + "/"
    first = ui["parents"][0]["info"]["run_name"]
    stored = "localStorage.getItem('mlflow.workflowType_v1')"
    browser = _Browser(tmp_path / "profile")
    try:
        shot = ui["output"] / "mlflow_ui_home_page_fresh_browser.png"
        reads = browser.run([("go", home), ("eval", stored), ("click", name), ("read", first), ("shot", shot), ("eval", stored)])
        [(_, on_home), (url, fresh), (_, after)] = reads
        assert on_home == after == json.dumps("machine_learning")  # set by the index page, before MLflow's code
        assert "/runs" in url, url  # (MLflow then writes the switch's value into the URL's query)
        for r in ui["parents"]:
            assert r["info"]["run_name"] in fresh
        assert "Detect Issues" not in fresh
        assert shot.is_file() and shot.stat().st_size > 10_000

        # the user flips the switch to GenAI: kept, and the home page's link now opens the GenAI overview
        reads = browser.run([("click", "GenAI"), ("read", "Detect Issues"), ("eval", stored), ("go", home), ("eval", stored), ("click", name),
                             ("read", "Detect Issues"), ("shot", ui["output"] / "mlflow_ui_home_page_genai_chosen.png")])  # fmt: skip
        [(_, _), (_, chosen), (_, still), (url, genai)] = reads
        assert chosen == still == json.dumps("genai"), (chosen, still)  # the index page left the choice alone
        assert "/overview" in url and "Detect Issues" in genai, url

        # the links selfattn prints open the runs even in this browser, and leave its choice alone
        import mlflow

        mlflow.set_tracking_uri(ui["mlflow_url"])
        links = dict(training_links(ui["mlflow_url"]))
        assert links[name] == ui_url(ui["mlflow_url"], f"experiments/{ui['experiment']['experiment_id']}/runs")
        [(url, text), (_, kept)] = browser.run([("go", links[name]), ("read", first), ("eval", stored)])
        assert "/runs" in url and first in text and "Detect Issues" not in text, url
        assert kept == json.dumps("genai")
    finally:
        browser.close()
