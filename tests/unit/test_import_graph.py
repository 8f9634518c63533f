"""The import graph of our own packages: no cycles (imports inside functions included) and layers
that point one way. Run it alone with ``python -m pytest -q tests/unit/test_import_graph.py``;
``python tests/unit/test_import_graph.py`` prints the graph."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("selfattn", "data_checks", "flows")
PIPELINE = ("prefect", "mlflow", "optuna", "great_expectations")
# the flows/ modules that talk to MLflow: its runs, the engine/Optuna callbacks, the registry, the
# served model and its models-from-code entry point; everything else goes through them
MLFLOW_MODULES = {"flows.tracking.runs", "flows.tracking.callbacks", "flows.tracking.registry", "flows.serving", "flows.pyfunc_model"}
# the other side of the wire: the app MLflow's server loads through the `mlflow.app` entry points
# (`mlflow server --app-name selfattn`); it extends MLflow's own Flask app, so it imports
# mlflow.server, and it stays apart: it imports none of our modules and none of ours imports it
MLFLOW_SERVER_APP = "flows.mlflow_app"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """Our modules imported anywhere in the file: module level and inside functions, relative
    imports resolved, ``importlib.import_module`` / ``lazy_exports`` targets named by string
    literals (lazy exports) included. Blocks under ``if TYPE_CHECKING:`` never run and are skipped."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    tops: set[str] = set()  # top-level package of every import, ours or not
    lazy = "import_module" in path.read_text() or "lazy_exports(" in path.read_text()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            tops.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_pkg else module.split(".")[:-1]
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            tops.add(target.split(".")[0])
            subs = {f"{target}.{alias.name}" for alias in node.names}
            found.update(subs & modules)
            if subs - modules:  # a name defined in the package/module itself
                found.add(target)
        elif lazy and isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules:
            found.add(node.value)
    return found, tops


def build_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(our module -> our modules it imports, our module -> every top-level package it imports).

    A dotted import runs the parent packages' ``__init__`` first; those implied edges are left out
    (they would put every package in a cycle with its lazily exported submodules), explicit
    imports of a package are kept.
    """
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    ours: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for mod, path in files.items():
        names, external[mod] = _imports(path, mod, set(files))
        ours[mod] = {n for n in names if n in files and n != mod}
    return ours, external


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                path = _closed_path(graph, set(comp))
                comps.append(path + ([f"(component: {', '.join(sorted(comp))})"] if len(set(path)) < len(comp) else []))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def _closed_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle through the component, for the message: start -> ... -> start (breadth-first)."""
    start = min(comp)
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def test_the_graph_sees_function_level_and_relative_imports():
    ours, _ = build_graph()
    assert len(ours) > 30
    assert "selfattn.train.engine" in ours["selfattn.train"]  # a lazy export (importlib)
    assert "selfattn.train.distributed" in ours["selfattn.train.engine"]  # inside a function


def test_no_import_cycles():
    ours, _ = build_graph()
    cycles = find_cycles(ours)
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_layers_point_one_way():
    ours, external = build_graph()
    bad = []
    for mod in ours:
        top = mod.split(".")[0]
        imported = external[mod]
        if top == "selfattn":
            bad += [f"{mod} imports {x}" for x in sorted(imported & {*PIPELINE, "flows", "data_checks"})]
        elif top == "data_checks":
            bad += [f"{mod} imports {x}" for x in sorted(imported & {"flows", "prefect", "mlflow", "optuna"})]
    assert not bad, "\n".join(bad)


def test_stages_compute_and_never_talk_to_tracking_or_orchestration():
    """flows/stages/ returns what to log (``StageOutput.log``); it imports neither MLflow nor Prefect."""
    _, external = build_graph()
    stages = [m for m in external if m == "flows.stages" or m.startswith("flows.stages.")]
    assert len(stages) >= 8, stages
    bad = [f"{m} imports {x}" for m in sorted(stages) for x in sorted(external[m] & {"mlflow", "prefect"})]
    assert not bad, "\n".join(bad)


def test_at_most_five_flows_modules_import_mlflow():
    _, external = build_graph()
    talkers = {m for m, e in external.items() if m.split(".")[0] == "flows" and "mlflow" in e}
    assert len(MLFLOW_MODULES) <= 5
    clients = talkers - {MLFLOW_SERVER_APP}
    assert clients <= MLFLOW_MODULES, f"import MLflow only in {sorted(MLFLOW_MODULES)}; also imported by {sorted(clients - MLFLOW_MODULES)}"


def test_the_mlflow_server_app_stands_apart():
    """flows.mlflow_app runs inside MLflow's server, loaded by its entry point only: it imports
    none of our modules (the server needs no pipeline) and none of ours imports it."""
    ours, _ = build_graph()
    assert MLFLOW_SERVER_APP in ours
    assert not ours[MLFLOW_SERVER_APP], f"{MLFLOW_SERVER_APP} imports {sorted(ours[MLFLOW_SERVER_APP])}"
    importers = sorted(m for m, deps in ours.items() if MLFLOW_SERVER_APP in deps)
    assert not importers, f"{MLFLOW_SERVER_APP} is imported by {importers}"


# import name -> distribution name, where they differ
_DIST = {"sklearn": "scikit-learn", "yaml": "pyyaml", "great_expectations": "great-expectations"}


def test_core_dependencies_are_what_the_library_imports():
    """pyproject's core dependencies cover selfattn/'s third-party imports, and name nothing from the pipeline."""
    import re

    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    _, external = build_graph()
    imported = set().union(*(e for m, e in external.items() if m.split(".")[0] == "selfattn"))
    third_party = {_DIST.get(x, x) for x in imported if x not in sys.stdlib_module_names and x not in PACKAGES and x != "__future__"}
    assert third_party <= core, f"imported by selfattn/ but not a core dependency: {sorted(third_party - core)}"
    assert not core & {_DIST.get(x, x) for x in PIPELINE}, "a pipeline package is a core dependency"
    assert {_DIST.get(x, x) for x in PIPELINE} <= {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in project["optional-dependencies"]["pipeline"]}


def test_cycle_finder_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


if __name__ == "__main__":
    graph, _ = build_graph()
    for mod in sorted(graph):
        print(mod, "->", ", ".join(sorted(graph[mod])) or "-")
    for c in find_cycles(graph):
        print("CYCLE:", " -> ".join(c))
