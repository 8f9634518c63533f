"""Hostile input, refused cleanly before any work (issue 7): bad configs, paths escaping the
allowed roots, model directories holding foreign files, pickles planted where a checkpoint is
expected, and junk text for ``selfattn predict``. Everything goes through the real CLI entry
point (``selfattn.cli.main``) or a real subprocess; a user error must give a one-paragraph
message naming the key and the value, a non-zero exit and no traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from selfattn.cli import main

REPO = Path(__file__).resolve().parents[2]


def _cli(capsys, *args: str) -> tuple[int, str]:
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


@pytest.fixture()
def isolated(tmp_path, monkeypatch, data_dir):
    """A private home and cwd; SELFATTN_DATA_DIR = the real (read-only) data."""
    home = tmp_path / "home"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(work)
    return home


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "override, must_name",
    [
        ("finetune.optim.lr=-1", ["finetune.optim.lr", "-1"]),
        ("pretrain.optim.lr=-0.001", ["pretrain.optim.lr", "-0.001"]),
        ("pretrain.model.n_heads=3", ["pretrain.model", "n_heads (3)", "d_model (32)"]),
        ("finetune.train.max_steps=0", ["finetune.train.max_steps", "0"]),
        ("search.n_trials=-2", ["search.n_trials", "-2"]),
        ("pretrain.train.max_steps=abc", ["pretrain.train.max_steps", "'abc'"]),
        ("search.pruner=sometimes", ["search.pruner", "'sometimes'"]),
        ("promotion.margin=[1,2]", ["promotion.margin", "[1, 2]"]),
        ("search.bogus=1", ["search.bogus"]),
        ("pretrain.train.max_stepz=5", ["pretrain.train.max_stepz"]),
        ("finetune.optim.betas=oops", ["finetune.optim.betas", "'oops'"]),
    ],
)
def test_bad_config_values_are_refused_before_any_work(isolated, capsys, override, must_name):
    rc, err = _cli(capsys, "run", "--config", "smoke", "--set", override)
    assert rc != 0
    assert "Traceback" not in err
    for text in must_name:
        assert text in err, f"{text!r} not named in: {err}"
    assert not isolated.exists(), "the home was created: work started before the config was refused"


def test_bad_config_file_names_key_and_value(isolated, capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: nightly\nsurprise: 1\nseed: not-a-number\npromotion: {margin: -0.5}\n")
    rc, err = _cli(capsys, "run", "--config", str(cfg))
    assert rc != 0 and "Traceback" not in err
    assert "surprise: unknown key" in err and "seed" in err and "'not-a-number'" in err
    assert "promotion.margin" in err and "-0.5" in err
    for text in ("[1, 2", "- a\n- b\n", "{{{{", "\xff\xfe"):
        cfg.write_bytes(text.encode("latin-1") if text.startswith("\xff") else text.encode())
        rc, err = _cli(capsys, "run", "--config", str(cfg))
        assert rc != 0 and "Traceback" not in err and str(cfg) in err
    assert not isolated.exists()


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("spec", ["/etc/passwd", "../../../../../../etc/passwd", "~/../../etc/hostname"])
def test_config_paths_escaping_the_allowed_roots_are_refused(isolated, capsys, spec):
    rc, err = _cli(capsys, "run", "--config", "smoke", "--set", f"data.train={spec}")
    assert rc != 0 and "Traceback" not in err
    assert "data.train" in err and spec in err and "outside the allowed roots" in err
    assert not isolated.exists()


def test_symlink_out_of_the_data_dir_is_refused(tmp_path, monkeypatch, capsys):
    data, outside, work = tmp_path / "data", tmp_path / "outside", tmp_path / "work"
    for d in (data / "sst2", data / "tinyshakespeare", outside, work):
        d.mkdir(parents=True)
    (outside / "secret.tsv").write_text("sentence\tlabel\nstolen\t1\n")
    (data / "sst2" / "train.tsv").symlink_to(outside / "secret.tsv")
    (data / "sst2" / "dev.tsv").write_text("sentence\tlabel\nok\t1\n")
    (data / "tinyshakespeare" / "input.txt").write_text("to be or not to be\n")
    monkeypatch.setenv("SELFATTN_DATA_DIR", str(data))
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(work)
    rc, err = _cli(capsys, "run", "--config", "smoke")
    assert rc != 0 and "Traceback" not in err
    assert "data.train" in err and str(outside / "secret.tsv") in err and "outside the allowed roots" in err


def test_optuna_storage_outside_the_roots_is_refused(isolated, capsys):
    rc, err = _cli(capsys, "run", "--config", "smoke", "--set", "search.storage=sqlite:////etc/optuna.db")
    assert rc != 0 and "search.storage" in err and "outside the allowed roots" in err


def test_paths_inside_the_roots_are_accepted(isolated, tmp_path):
    from flows.config import check_config_paths, load_pipeline_config

    cfg = load_pipeline_config("smoke", [f"search.storage=sqlite:///{isolated}/studies/optuna.db"])
    paths = check_config_paths(cfg)
    assert paths["data.train"].name == "train.tsv" and paths["search.storage"] == isolated / "studies" / "optuna.db"


# --------------------------------------------------------------------------- model directories and pickles


@pytest.fixture()
def tiny_clf(tmp_path) -> Path:
    """A real save_pretrained classifier (2 layers, 32 dims, char tokenizer)."""
    import torch

    from selfattn.config import ModelConfig
    from selfattn.data.tokenization import CharTokenizer
    from selfattn.io.checkpoint import save_pretrained
    from selfattn.nn.models import build_classifier

    torch.manual_seed(0)
    tok = CharTokenizer.train(["a gripping , beautifully acted film .", "a dull , lifeless mess ."])
    cfg = ModelConfig(vocab_size=tok.vocab_size, context_length=32, n_layers=2, d_model=32, n_heads=2, n_classes=2, pad_token_id=tok.pad_id)
    return save_pretrained(build_classifier(cfg).eval(), tmp_path / "clf", tokenizer=tok, extra={"labels": [0, 1]})


class _Trap:
    """Unpickling this creates ``path``: proof that someone ran pickle on the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("intruder", ["pytorch_model.bin", "evil.pkl", "tokenizer/merges.pickle", "python_model.pkl"])
def test_model_dir_with_foreign_files_is_refused_by_the_cli(tiny_clf, tmp_path, capsys, monkeypatch, intruder):
    import pickle

    monkeypatch.chdir(tmp_path)
    trap = tmp_path / "trap-sprung"
    (tiny_clf / intruder).write_bytes(pickle.dumps(_Trap(trap)))
    rc, err = _cli(capsys, "evaluate", "--model", str(tiny_clf), "--data", str(tmp_path / "dev.tsv"), "--output", str(tmp_path / "ev"))
    assert rc != 0 and "Traceback" not in err
    assert Path(intruder).name in err
    assert not trap.exists()


def test_planted_pickle_as_training_checkpoint_is_never_unpickled(tmp_path, capsys):
    """``train.resume`` reads last.pt with ``weights_only=True``: a trap object is refused, not run."""
    import torch

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("to be or not to be, that is the question\n" * 20)
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    trap = tmp_path / "trap-sprung"
    torch.save({"format": 1, "payload": _Trap(trap)}, out / "checkpoints" / "last.pt")
    rc, err = _cli(
        capsys, "pretrain", "--output", str(out),
        "--set", f"data.path={corpus}", "--set", "data.tokenizer=char", "--set", "data.block_size=16",
        "--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2",
        "--set", "train.max_steps=2", "--set", "train.device=cpu",
    )
    assert rc != 0 and "Traceback" not in err
    assert "cannot resume" in err and "last.pt" in err
    assert not trap.exists()


def test_predict_never_unpickles_a_model_directory(tiny_clf, tmp_path, monkeypatch, capsys):
    """``selfattn predict --model DIR`` on a pyfunc-shaped directory whose python_model.pkl is a
    trap: the weights are read with the safe loader; the pickle is never run."""
    import pickle
    import shutil

    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    # mlflow.set_tracking_uri / set_registry_uri export these: setenv so that teardown restores them
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    trap = tmp_path / "trap-sprung"
    pyfunc = tmp_path / "pyfunc"
    shutil.copytree(tiny_clf, pyfunc / "artifacts" / "model")
    (pyfunc / "MLmodel").write_text("flavors:\n  python_function:\n    python_model: python_model.pkl\n    loader_module: mlflow.pyfunc.model\n")
    (pyfunc / "python_model.pkl").write_bytes(pickle.dumps(_Trap(trap)))
    for target in (pyfunc, tiny_clf):
        rc = main(["predict", "--model", str(target), "--json", "great fun", ""])
        out, err = capsys.readouterr()
        assert rc == 0 and "Traceback" not in err, err
        assert len([line for line in out.splitlines() if line.startswith("{")]) == 2
    assert not trap.exists()
    (pyfunc / "artifacts" / "model" / "evil.pkl").write_bytes(pickle.dumps(_Trap(trap)))
    rc, err = _cli(capsys, "predict", "--model", str(pyfunc), "great fun")
    assert rc != 0 and "evil.pkl" in err and "Traceback" not in err
    assert not trap.exists()


def test_no_unsafe_deserialisation_in_the_code():
    """Static guard: no pickle/cloudpickle/joblib loads, no torch.load without weights_only=True,
    no yaml.load / unsafe_load, no allow_pickle=True in the shipped packages."""
    patterns = {
        "pickle.load": re.compile(r"\b(c?loud)?pickle\.loads?\("),
        "joblib.load": re.compile(r"\bjoblib\.load\("),
        "yaml.load": re.compile(r"\byaml\.(unsafe_)?load\((?![^)]*SafeLoader)"),
        "allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
        "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
    }
    torch_load = re.compile(r"\btorch\.load\(([^)]*)\)")
    offenders = []
    for pkg in ("selfattn", "flows", "data_checks"):
        for path in sorted((REPO / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for name, rx in patterns.items():
                offenders += [f"{path.relative_to(REPO)}: {name}" for _ in rx.finditer(text)]
            for m in torch_load.finditer(text):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{path.relative_to(REPO)}: torch.load without weights_only=True")
    assert not offenders, offenders


# --------------------------------------------------------------------------- predict on junk text


@pytest.mark.slow  # ~30-60 s: creates an MLflow store, logs a pyfunc, starts a process
def test_predict_cli_on_empty_long_and_invalid_utf8(tiny_clf, tmp_path, monkeypatch):
    """A real ``selfattn predict`` process on a registered pyfunc: never a crash, warnings shown."""
    import mlflow

    from flows.tracking import runs

    home = tmp_path / "home"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # exported by mlflow.set_*_uri: restored at teardown
        monkeypatch.setenv(var, f"sqlite:///{home / 'mlflow.db'}")
    before = mlflow.get_tracking_uri()
    try:
        runs.configure(home)
        exp = runs.ensure_experiment("hostile", home)
        from flows.serving import log_model

        with mlflow.start_run(experiment_id=exp):
            info = log_model(str(tiny_clf), name="model", registered_model_name="hostile-model")
    finally:
        mlflow.set_tracking_uri(before)
    assert info.registered_model_version is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(SELFATTN_HOME=str(home))
    env.pop("PYTHONIOENCODING", None)
    long_text = "great " * 5000
    argv = [sys.executable, "-c", "import sys; from selfattn.cli import main; sys.exit(main())", "predict", "--model", "models:/hostile-model/1", "--json",
            "", long_text, "caf\udce9 latin-1 bytes", "\udcff\udcfe"]
    argv = [os.fsencode(a) for a in argv]  # surrogate escapes -> the raw invalid bytes on the command line
    proc = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, timeout=180)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    import json

    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(rows) == 4
    assert rows[0]["warning"].startswith("empty input")
    assert "truncated" in rows[1]["warning"]
    assert "UTF-8" in rows[2]["warning"] and "UTF-8" in rows[3]["warning"]
    for row in rows:
        assert row["label"] in (0, 1) and abs(row["prob_0"] + row["prob_1"] - 1) < 1e-5
    # a registered model that does not exist: one line, exit 2
    argv[5] = b"models:/no-such-model@champion"
    proc = subprocess.run(argv[:8], env=env, cwd=tmp_path, capture_output=True, timeout=180)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and "Traceback" not in err and "no-such-model" in err, err[-2000:]


def test_predict_missing_model_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFATTN_HOME", str(tmp_path / "home"))
    # mlflow.set_tracking_uri / set_registry_uri export these: setenv so that teardown restores them
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    rc, err = _cli(capsys, "predict", "--model", str(tmp_path / "no-such-model"), "hello")
    assert rc != 0 and "Traceback" not in err and "no-such-model" in err and "not found" in err


# --------------------------------------------------------------------------- secrets


SECRET_PATTERNS = {
    "private key": re.compile(r"-----BEGIN (RSA |EC |OPENSSH )?PRIVATE KEY-----"),
    "AWS key": re.compile(r"AKIA[0-9A-Z]{16}"),
    "password in URL": re.compile(r"[a-z+]+://[^\s:/@'\"]+:(?!\$\{|\{|<|\*)[^\s@'\"/]{3,}@"),
    "hard-coded password": re.compile(r"(?i)\b(password|passwd|secret|api_key|token)\s*[=:]\s*['\"](?!\$\{)[^'\"\s]{6,}['\"]"),
}


def test_no_credentials_in_the_repository():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    offenders = []
    for name in files:
        path = REPO / name
        if path.suffix not in {".py", ".yaml", ".yml", ".toml", ".md", ".sh", ".cfg", ".ini", ".json", ".txt", ""} or not path.is_file():
            continue
        if name.endswith(".env.example") or name.startswith("tests/unit/test_hostile_input.py"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for what, rx in SECRET_PATTERNS.items():
            offenders += [f"{name}: {what}: {m.group(0)[:60]}" for m in rx.finditer(text)]
    assert not offenders, offenders
    assert not (REPO / ".env").exists() or ".env" in (REPO / ".gitignore").read_text(), ".env must be git-ignored"


def test_compose_reads_credentials_from_env_file():
    """Every secret in the compose file is a ${VAR} substitution (read from infra/.env), and
    infra/.env is git-ignored."""
    compose = REPO / "infra" / "docker-compose.yml"
    secret_key = re.compile(r"^\s*-?\s*([A-Z0-9_]*(PASSWORD|SECRET|ACCESS_KEY|TOKEN)[A-Z0-9_]*)\s*[:=]\s*(.*)$")
    bad = []
    for line in compose.read_text(encoding="utf-8").splitlines():
        m = secret_key.match(line)
        if m and m.group(3).strip() and "${" not in m.group(3) and "$$" not in m.group(3):
            bad.append(line.strip())
    assert not bad, f"literal secrets in docker-compose.yml (must be ${{VAR}} from infra/.env): {bad}"
    assert (REPO / "infra" / ".env.example").is_file(), "infra/.env.example documents the variables compose reads"
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/.env"], cwd=REPO)
    assert ignored.returncode == 0, "infra/.env must be git-ignored"
