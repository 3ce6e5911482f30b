"""The layers of docs/architecture.md, checked on the parsed code: ``uplvp_model`` never imports
``pipeline`` or ``stages``, ``pipeline`` never imports ``stages``, no import circle at module level;
the scripts of ``benchmarks/``, ``experiments/`` and ``tools/``: every project name they import
still exists, the package never imports them, they never import the CLI.

The scripts are run by hand or by the study, not by every test, so a name moved inside the
package (a refactor) would otherwise break one of them silently until somebody runs it. This
reads each script's imports from its syntax tree, top level and inside functions alike, and
resolves them against the package as it is now.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from tests.helpers import REPO

SCRIPT_FOLDERS = ("benchmarks", "experiments", "tools")
PACKAGE_FOLDERS = ("pipeline", "stages", "uplvp_model")
PROJECT_PACKAGES = {*PACKAGE_FOLDERS, *SCRIPT_FOLDERS}
SCRIPTS = sorted(p for folder in SCRIPT_FOLDERS for p in (REPO / folder).rglob("*.py"))


def project_imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module, name or None, line) for each import of a project module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] in PROJECT_PACKAGES:
                found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names
                      if alias.name.split(".")[0] in PROJECT_PACKAGES]
    return sorted(found, key=lambda item: item[2])


def unresolved(module: str, name: str | None) -> str | None:
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        return f"module {module}: {error}"
    if name is None or name == "*" or hasattr(imported, name):
        return None
    try:  # ``from package import submodule``
        importlib.import_module(f"{module}.{name}")
        return None
    except ImportError:
        return f"{module} has no {name}"


def test_the_scan_finds_a_planted_missing_name(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text("def f():\n    from pipeline.overlays import render_overlay, no_such_name\n"
                      "import json\nfrom stages import cli\n")
    imports = project_imports(script)
    assert imports == [("pipeline.overlays", "render_overlay", 2),
                       ("pipeline.overlays", "no_such_name", 2), ("stages", "cli", 4)]
    assert [unresolved(m, n) for m, n, _ in imports] == [
        None, "pipeline.overlays has no no_such_name", None]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_benchmark_script_imports_resolve(script):
    problems = [f"line {line}: {problem}" for module, name, line in project_imports(script)
                if (problem := unresolved(module, name))]
    assert not problems, f"{script.relative_to(REPO)}: " + "; ".join(problems)


def test_the_package_never_imports_a_script_folder():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for folder in PACKAGE_FOLDERS for path in sorted((REPO / folder).rglob("*.py"))
                 for module, _, line in project_imports(path)
                 if module.split(".")[0] in SCRIPT_FOLDERS]
    assert not offenders, offenders


def test_no_script_imports_the_command_line_layer():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for path in SCRIPTS for module, name, line in project_imports(path)
                 if module == "stages.cli" or module.startswith("stages.cli.")
                 or (module == "stages" and name == "cli")]
    assert not offenders, offenders


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path) -> set[str]:
    """Project modules ``path`` imports when it is imported (top-level statements, relative
    imports resolved; imports inside functions and ``if TYPE_CHECKING`` are not run then)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            if base.split(".")[0] in PACKAGE_FOLDERS:
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if _is_module(sub) else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGE_FOLDERS}
    return {m for m in found if _is_module(m)}


def _is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


PACKAGE_FILES = sorted(p for folder in PACKAGE_FOLDERS for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("layer,forbidden", [("uplvp_model", ("pipeline", "stages")),
                                             ("pipeline", ("stages",))])
def test_a_lower_layer_never_imports_a_higher_one(layer, forbidden):
    offenders = [f"{path.relative_to(REPO)}:{line} imports {module}"
                 for path in sorted((REPO / layer).rglob("*.py"))
                 for module, _, line in project_imports(path)
                 if module.split(".")[0] in forbidden]
    assert not offenders, offenders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module -> modules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "d": {"a", "c"}}) is None


def test_relative_imports_are_resolved():
    imports = module_level_imports(REPO / "uplvp_model/model.py")  # from .config import ...
    assert {"uplvp_model.config", "uplvp_model.decoders", "uplvp_model.backbone"} <= imports
    assert "pipeline.engine.hooks" in module_level_imports(REPO / "pipeline/engine/loop.py")


def test_no_import_circle_at_module_level():
    graph = {module_name(p): module_level_imports(p) - {module_name(p)} for p in PACKAGE_FILES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
