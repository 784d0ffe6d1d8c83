"""The import graph of care_dataset, read from the source with ast: stages import only earlier stages, no module
imports itself through others, imports inside functions say why, and usam reaches care_dataset only through the
modules meant for it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "care_dataset"
# A module may import its own subpackage and any stage of a lower rank, never a higher one.
STAGE_RANK = {"files": 0, "error_text": 0, "version": 0, "raw": 1, "deid": 2, "format": 3, "convert": 4,
              "publish": 5, "synth": 5, "cli": 6, "": 6}
USAM_MAY_IMPORT = ("care_dataset", "care_dataset.format.", "care_dataset.raw.", "care_dataset.files",
                   "care_dataset.error_text")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The care_dataset modules `path` imports; `from package import name` counts `package.name` when that is
    a module, else `package`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "care_dataset"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "care_dataset":
            for alias in node.names:
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(path, set(found)) - {name} for name, path in found.items()}


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*trail, module, target])
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_no_stage_imports_a_later_one():
    wrong = [f"{module} imports {target}" for module, targets in import_graph().items() for target in targets
             if stage(module) != stage(target) and STAGE_RANK[stage(target)] >= STAGE_RANK[stage(module)]]
    assert wrong == []


def test_imports_inside_functions_say_why_they_wait():
    silent = []
    for name, path in modules().items():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)) and "# deferred:" not in lines[inner.lineno - 1]:
                        silent.append(f"{name}:{inner.lineno}")
    assert silent == []


def test_usam_imports_only_the_public_parts_of_care_dataset():
    wrong = []
    for path in sorted((REPO / "usam").rglob("*.py")):
        for module in imported_modules(path, set(modules())):
            if not (module == "care_dataset" or module.startswith(USAM_MAY_IMPORT[1:])):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert wrong == []
