"""Shared test fixtures: real data location, a temporary SELFATTN_HOME, fixed seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# SELFATTN_REQUIRE_ALL=1 (.ci/run sets it): a test that skips fails instead, so a missing service
# (PostgreSQL), data set (SELFATTN_DATA_DIR), Chromium or weight wheel cannot turn CI green. Only
# GPU tests may still skip: CI machines have none.
REQUIRE_ALL = "SELFATTN_REQUIRE_ALL"


def _skip_is_allowed(reason: str, item: pytest.Item | None = None) -> bool:
    return os.environ.get(REQUIRE_ALL) != "1" or "CUDA" in reason or (item is not None and item.get_closest_marker("cuda") is not None)


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    return report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.skipped and not hasattr(report, "wasxfail") and not _skip_is_allowed(_skip_reason(report), item):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ALL}=1 and the test skipped: {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    report = (yield).get_result()  # a module that skips as a whole (pytest.skip(allow_module_level=True))
    if report.skipped and not _skip_is_allowed(_skip_reason(report)):
        report.outcome = "failed"
        report.longrepr = f"{REQUIRE_ALL}=1 and {collector.nodeid} skipped: {_skip_reason(report)}"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data sets (SELFATTN_DATA_DIR, default ../shared/data); read-only."""
    d = Path(os.environ.get("SELFATTN_DATA_DIR", REPO.parent / "shared" / "data"))
    if not (d / "sst2" / "train.tsv").is_file():
        pytest.skip(f"real data not found under {d}; set SELFATTN_DATA_DIR")
    return d


@pytest.fixture()
def selfattn_home(tmp_path, monkeypatch) -> Path:
    """A private SELFATTN_HOME and no inherited MLflow URI, so tests never touch ./.selfattn."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SELFATTN_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


class SmallDisk:
    """A tmpfs of a few MiB mounted at ``path`` for the disk-full tests: :meth:`fill` leaves
    ``leave`` bytes free, :meth:`free_space` removes the filler."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler.bin"

    def free(self) -> int:
        import shutil

        return shutil.disk_usage(self.path).free

    def fill(self, leave: int = 16 * 1024) -> None:
        with open(self.filler, "ab") as fh:
            while (n := self.free() - leave) > 0:
                fh.write(b"\0" * min(n, 1 << 20))
                fh.flush()

    def free_space(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture()
def small_disk(tmp_path, request):
    """A tmpfs of 16 MiB (or ``request.param``, e.g. ``"256M"``, through indirect parametrisation),
    mounted by the test and always unmounted after; skipped where mounting is not allowed."""
    import subprocess

    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    size = getattr(request, "param", "16M")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield SmallDisk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
