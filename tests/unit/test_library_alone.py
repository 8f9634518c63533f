"""The library works with the pipeline packages absent: a subprocess whose sitecustomize makes
prefect, mlflow, optuna and great_expectations unimportable imports selfattn, trains a tiny model
through the engine, and runs the CLI; a pipeline command then fails with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("prefect", "mlflow", "optuna", "great_expectations")

SITECUSTOMIZE = f"""
import sys

BLOCKED = {BLOCKED!r}


class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
"""

TRAIN = """
import random, sys
import torch

import selfattn
from selfattn.train import PretrainConfig, pretrain

out = sys.argv[1]
rng = random.Random(0)
words = "the film was good bad fine dull plot and a very".split()
open(out + "/corpus.txt", "w").write("\\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)))
cfg = PretrainConfig.model_validate({
    "data": {"path": out + "/corpus.txt", "block_size": 16},
    "model": {"n_layers": 2, "d_model": 32, "n_heads": 2},
    "optim": {"lr": 3e-3, "warmup_steps": 1},
    "train": {"max_steps": 4, "batch_size": 4, "eval_every": 4, "eval_batches": 1, "log_every": 1, "progress": False, "device": "cpu"},
})
torch.set_num_threads(1)
result = pretrain(cfg, out + "/run")
losses = [h["train_loss"] for h in result.history if "train_loss" in h]
assert len(losses) == 4 and all(l == l for l in losses), losses
assert (result.best_dir / "model.safetensors").is_file()
loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED or m.split(".")[0] in ("flows", "data_checks")]
assert not loaded, loaded
print("trained", losses[0], losses[-1])
"""


def _env(tmp_path: Path) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFATTN_")}
    env.update(PYTHONPATH=os.pathsep.join([str(hook), str(REPO)]), SELFATTN_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_the_blocker_really_blocks(tmp_path):
    p = _run(["-c", "import mlflow"], _env(tmp_path), tmp_path)
    assert p.returncode != 0 and "blocked by the test" in p.stderr


def test_library_trains_and_cli_runs_without_the_pipeline_packages(tmp_path):
    env = _env(tmp_path)
    script = tmp_path / "train.py"
    script.write_text(f"BLOCKED = {BLOCKED!r}\n" + textwrap.dedent(TRAIN))
    p = _run([str(script), str(tmp_path)], env, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("trained")

    cli = ["-m", "selfattn.cli"]
    for args in (["--help"], ["pretrain", "--help"]):
        p = _run(cli + args, env, tmp_path)
        assert p.returncode == 0, (args, p.stderr)
        assert "Usage" in p.stdout and "Traceback" not in p.stderr and "warning" not in p.stderr
    assert "validate" in _run(cli + ["--help"], env, tmp_path).stdout  # the plugins still register

    # a pipeline command says what is missing, in one line, without a traceback
    (tmp_path / "t.tsv").write_text("sentence\tlabel\na fine film\t1\n")
    p = _run(cli + ["validate", str(tmp_path / "t.tsv")], env, tmp_path)
    assert p.returncode == 4, p.stderr
    assert "Traceback" not in p.stderr
    assert "needs great_expectations" in p.stderr and 'pip install "selfattn[pipeline]"' in p.stderr
