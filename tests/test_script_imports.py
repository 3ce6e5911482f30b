"""Every project name a script under ``benchmarks/`` imports still exists.

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

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"pipeline", "stages", "uplvp_model"}
SCRIPTS = sorted((ROOT / "benchmarks").rglob("*.py"))


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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_benchmark_script_imports_resolve(script):
    problems = [f"line {line}: {problem}" for module, name, line in project_imports(script)
                if (problem := unresolved(module, name))]
    assert not problems, f"{script.relative_to(ROOT)}: " + "; ".join(problems)
