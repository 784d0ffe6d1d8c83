"""The import rules of the layout, read from the source with ``ast``: no import loop between the project's
modules, care_dataset's stages import only earlier stages, usam reaches care_dataset only through its reader,
raw-data readers and file helpers, imports between the project's own files sit at module top, and an import
inside a function says why it waits."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("care_dataset", "usam")
# What usam may import from care_dataset: the package's public reader API, the stage folders it reads with,
# the shared file and error-text helpers and the one version number.
USAM_MAY_IMPORT = ("care_dataset.format", "care_dataset.raw", "care_dataset.files", "care_dataset.error_text",
                   "care_dataset.version")
# care_dataset's stages by rank: a module imports its own stage or a lower rank, never a higher one.
STAGE_RANK = {"files": 0, "error_text": 0, "version": 0, "raw": 1, "deid": 2, "format": 3, "convert": 4,
              "publish": 5, "synth": 5, "export": 5, "cli": 6, "": 6}
DEFERRED = "# deferred:"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
                     known: dict[str, Path]) -> list[str]:
    """The project modules one import statement loads (``from pkg import mod`` counts as ``pkg.mod``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    base = node.module or ""
    if node.level:
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([node.module] if node.module else []))
    found = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
    if base in known and len(found) < len(node.names):
        found.append(base)
    return found


def import_edges() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, at module top, line) for every import between the project's modules."""
    known = project_modules()
    edges = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = {id(node) for node in tree.body}
        top_level |= {id(node) for statement in tree.body if isinstance(statement, (ast.If, ast.Try))
                      for node in ast.walk(statement)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in imported_modules(node, module, path.name == "__init__.py", known):
                    if target != module:
                        edges.append((module, target, id(node) in top_level, node.lineno))
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def graph_of(edges, group=lambda name: name) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for importer, imported, _, _ in edges:
        if group(importer) != group(imported):
            graph.setdefault(group(importer), set()).add(group(imported))
    return graph


def stage_of(module: str) -> str:
    """care_dataset.<stage>[.<module>] -> <stage>; the package itself -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_rules_see_real_imports():
    edges = {(a, b) for a, b, _, _ in import_edges()}
    assert ("usam.models.usam", "usam.models.prompted") in edges
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_between_modules():
    assert find_cycle(graph_of(import_edges())) is None


def test_no_care_dataset_stage_imports_a_later_one():
    wrong = [f"{a} imports {b}" for a, b, _, _ in import_edges() if a.startswith("care_dataset")
             and b.startswith("care_dataset") and stage_of(a) != stage_of(b)
             and STAGE_RANK[stage_of(b)] >= STAGE_RANK[stage_of(a)]]
    assert wrong == []


def test_care_dataset_has_a_folder_per_stage():
    for stage in ("raw", "deid", "convert", "format", "publish", "synth"):
        assert (ROOT / "care_dataset" / stage / "__init__.py").is_file(), stage


def test_usam_reaches_care_dataset_only_through_its_reader_raw_readers_and_file_helpers():
    wrong = sorted({f"{a}:{line} imports {b}" for a, b, _, line in import_edges()
                    if a.startswith("usam") and b.startswith("care_dataset")
                    and not any(b == allowed or b.startswith(allowed + ".") for allowed in USAM_MAY_IMPORT)
                    and b != "care_dataset"})
    assert wrong == []


def test_care_dataset_never_imports_usam():
    assert [edge for edge in import_edges() if edge[0].startswith("care_dataset") and edge[1].startswith("usam")] == []


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_between_project_files_sit_at_module_top(package):
    """Unless one waits on purpose for a slow dependency a command may not need, and says so."""
    modules = project_modules()
    inner = sorted(f"{a}:{line} imports {b}" for a, b, top, line in import_edges() if not top and a.startswith(package)
                   and DEFERRED not in modules[a].read_text(encoding="utf-8").splitlines()[line - 1])
    assert inner == []


def deferred_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function of `path`."""
    found = []
    for function in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, alias.name) for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, node.module or "."))
    return found


def test_a_deferred_import_says_why():
    """An import inside a function (a heavy dependency a command may not need) says why on its line."""
    silent = []
    for module, path in project_modules().items():
        lines = path.read_text(encoding="utf-8").splitlines()
        silent += [f"{module}:{line} {name}" for line, name in deferred_imports(path) if DEFERRED not in lines[line - 1]]
    assert sorted(set(silent)) == []


def test_no_function_in_the_training_loop_is_over_80_lines():
    tree = ast.parse((ROOT / "usam" / "train.py").read_text(encoding="utf-8"))
    long = [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert long == []
