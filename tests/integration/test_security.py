"""Security (docs/reliability.md): checkpoints and caches are read with
``torch.load(weights_only=True)``, no data file goes through pickle / eval / unsafe YAML, a
checkpoint carrying a pickled object is refused in one line without running it, and manifest
paths cannot leave their root unless ``allow_outside_root`` says so.

The source checks parse the code (``ast``), so comments and docstrings do not count and a call
spread over several lines is still seen.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from stages.cli import app
from tests.helpers import REPO

SOURCE_DIRS = ("pipeline", "stages", "uplvp_model", "benchmarks", "experiments", "tools")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def source_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20  # the walk found the code
    return files


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def dotted(func: ast.expr) -> str:
    """``torch.load`` for ``torch.load(...)``, ``eval`` for ``eval(...)``, '' otherwise."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
        return ".".join(reversed(parts))
    return ""


def keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value
               for k in call.keywords)


def test_every_torch_load_uses_weights_only_true():
    found, unsafe = [], []
    for path in source_files():
        for call in calls(ast.parse(path.read_text(encoding="utf-8"))):
            if dotted(call.func) == "torch.load":
                found.append(f"{path.relative_to(REPO)}:{call.lineno}")
                if not keyword_is(call, "weights_only", True):
                    unsafe.append(found[-1])
    assert found, "no torch.load call found: the check would pass vacuously"
    assert unsafe == []


def test_no_pickle_eval_or_unsafe_yaml_in_the_code():
    problems = []
    for path in source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = str(path.relative_to(REPO))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names
                             if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where}: from {node.module} import")
        for call in calls(tree):
            name = dotted(call.func)
            if name in ("eval", "exec", "yaml.load", "yaml.unsafe_load", "yaml.full_load",
                        "yaml.load_all", "pd.read_pickle", "pandas.read_pickle"):
                problems.append(f"{where}:{call.lineno}: {name}()")
            if name in ("np.load", "numpy.load") and keyword_is(call, "allow_pickle", True):
                problems.append(f"{where}:{call.lineno}: np.load(allow_pickle=True)")
    assert problems == []


def test_yaml_is_read_with_safe_load_only():
    readers = sorted({dotted(c.func) for p in source_files()
                      for c in calls(ast.parse(p.read_text(encoding="utf-8")))
                      if dotted(c.func).startswith("yaml.") and "load" in dotted(c.func)})
    assert readers == ["yaml.safe_load"]


class _RunsCode:
    """Unpickling this would run ``touch <marker>``: the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format_version": 1, "model": {"w": torch.zeros(2)}, "evil": _RunsCode(marker)},
               path)
    return path


def _one_error_line(args: list) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return " ".join(result.stderr[result.stderr.index("error:"):].split())


@pytest.mark.parametrize("consumer", ["finetune --init", "finetune --resume", "evaluate"])
def test_checkpoint_with_a_pickled_object_is_refused_without_running_it(tiny_coco, tmp_path,
                                                                       consumer):
    marker = tmp_path / "code-ran"
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--device", "cpu", "--no-progress"]
    if consumer == "finetune --init":
        ckpt = _malicious_checkpoint(tmp_path / "evil.pt", marker)
        args = ["stage", "finetune", "--train", tiny_coco["manifest"], "--init", ckpt,
                "--out", run, *common]
    elif consumer == "finetune --resume":
        ckpt = _malicious_checkpoint(run / "checkpoints" / "step-0000002.pt", marker)
        (run / "checkpoints" / "latest").write_text("step-0000002.pt\n")
        args = ["stage", "finetune", "--train", tiny_coco["manifest"], "--out", run, "--resume",
                "--max-steps", "4", "--batch-size", "2", *common]
    else:
        ckpt = _malicious_checkpoint(tmp_path / "evil.pt", marker)
        args = ["stage", "evaluate", "--checkpoint", ckpt, "--data", tiny_coco["manifest"],
                "--out", run, "--device", "cpu", "--no-progress"]
    line = _one_error_line(args)
    assert line == (f"error: {ckpt}: not a readable checkpoint (it holds objects other than "
                    "tensors and plain values)")
    assert not marker.exists()


def _manifest_with_outside_image(tiny_coco: dict, allow: bool, via: str) -> Path:
    outside = tiny_coco["dir"] / "outside.png"
    outside.write_bytes((tiny_coco["root"] / "img_01.png").read_bytes())
    flag = "allow_outside_root: true\n" if allow else ""
    manifest = tiny_coco["dir"] / f"escape_{via}.yaml"
    if via == "annotations":
        coco = json.loads(tiny_coco["annotations"].read_text())
        coco["images"][0]["file_name"] = "../outside.png"
        (tiny_coco["dir"] / "escape.json").write_text(json.dumps(coco))
        manifest.write_text(f"name: t\n{flag}images: {{root: images}}\nannotations: escape.json\n")
    elif via == "list":
        manifest.write_text(f"name: t\n{flag}images: {{root: images, list: ['img_02.png', "
                            "'../outside.png']}\n")
    else:
        manifest.write_text(f"name: t\n{flag}images: {{root: images, glob: '../*.png'}}\n")
    return manifest


@pytest.mark.parametrize("via,field", [("annotations", "escape.json file_name"),
                                       ("list", "images.list"), ("glob", "images.glob")])
def test_manifest_paths_cannot_escape_the_root_unless_allowed(tiny_coco, via, field):
    manifest = _manifest_with_outside_image(tiny_coco, allow=False, via=via)
    line = _one_error_line(["data", "check", manifest])
    assert line.startswith(f"error: {manifest}: {field}: '../")
    assert line.endswith("escapes images.root (set allow_outside_root: true to allow)")

    allowed = _manifest_with_outside_image(tiny_coco, allow=True, via=via)
    result = CliRunner().invoke(app, ["data", "check", str(allowed)])
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output


def test_absolute_glob_is_one_line_not_a_traceback(tiny_coco):
    manifest = tiny_coco["dir"] / "abs.yaml"
    manifest.write_text(f"name: t\nimages: {{root: images, glob: '{tiny_coco['root']}/*.png'}}\n")
    line = _one_error_line(["data", "check", manifest])
    assert line == (f"error: {manifest}: images.glob: '{tiny_coco['root']}/*.png' must be a "
                    "pattern relative to images.root")
