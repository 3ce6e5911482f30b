"""Docs that must match the code: CLI reference, README commands vs CI, example manifests."""
import re
import subprocess
import sys

import pytest
import yaml

from pipeline.manifest import ManifestSpec
from tests.helpers import REPO

CLI_DOC_TITLE = (
    "uplvp command line (generated: typer stages.cli utils docs --name uplvp --output docs/cli.md)"
)


def test_cli_reference_is_up_to_date(tmp_path):
    out = tmp_path / "cli.md"
    subprocess.run(
        [sys.executable, "-m", "typer", "stages.cli", "utils", "docs", "--name", "uplvp",
         "--output", str(out), "--title", CLI_DOC_TITLE],
        check=True, capture_output=True, cwd=REPO,
    )
    assert out.read_text() == (REPO / "docs" / "cli.md").read_text(), (
        "docs/cli.md is stale: regenerate it with the command in its title"
    )


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    quick_start = (REPO / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    return [b.strip() for b in blocks if b.strip() in quick_start]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    install_and_demo, install_and_test = commands
    assert "uplvp demo" in install_and_demo and "pytest" in install_and_test
    ci = (REPO / ".ci" / "run").read_text()
    test_part = install_and_test.split("&&")
    assert test_part[0].strip() == "bash .ci/install"
    assert test_part[1].strip() in ci.splitlines(), ".ci/run must run the README's test command"


@pytest.mark.parametrize("path", sorted((REPO / "data_manifests").glob("*.yaml")), ids=lambda p: p.name)
def test_example_manifests_follow_the_schema(path):
    ManifestSpec.model_validate(yaml.safe_load(path.read_text()))
