"""The README's two commands: ``./quickstart.sh demo`` and ``./quickstart.sh test``, which CI runs too."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "quickstart.sh"


def test_the_script_parses_and_names_its_commands_when_called_without_one():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "./quickstart.sh demo" in done.stdout and "./quickstart.sh test" in done.stdout


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_same_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["./quickstart.sh demo", "./quickstart.sh test"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "./quickstart.sh setup" in ci and re.search(r"^\./quickstart\.sh test$", ci, re.M)
    script = SCRIPT.read_text(encoding="utf-8")
    assert 'run --config demo "$@"' in script and '-m pytest -q "$@"' in script
