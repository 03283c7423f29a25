"""The layering contracts hold, and they bite: a module that breaks one fails `lint-imports`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "gen" / "python")])}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def tree(tmp_path) -> Path:
    """A copy of the project's Python packages and its contracts."""
    for package in ("shared", "services", "gateway", "clients"):
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("node_modules", "__pycache__", "go", "cpp", "data"))  # fmt: skip
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_contracts_hold_on_the_project(tree):
    done = lint_imports(tree)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 kept, 0 broken" in done.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("shared/_probe.py", "import services.dense.runtime\n", "shared is the bottom layer"),
        ("services/nlp/_probe.py", "from services.dense import architectures\n", "no model service imports another"),
        ("gateway/_probe.py", "import services.gnn.runtime\n", "the gateway imports no model service"),
    ],
)
def test_a_module_that_breaks_a_contract_fails(tree, module, line, contract):
    (tree / module).write_text(line)
    done = lint_imports(tree)
    assert done.returncode != 0
    broken = [line for line in done.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), done.stdout
