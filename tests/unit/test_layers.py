"""The package's layer contracts ([tool.importlinter] in pyproject.toml) hold, and break when a module imports
upwards or reaches outside the package: each is checked on the real tree, then on a copy with one bad import
added (an import inside a function counts too)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root / "src"), "PATH": str(LINT_IMPORTS.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_committed_tree_keeps_every_contract() -> None:
    result = lint_imports(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        ("core/paths.py", "from cifar10_pipeline.stages import train", "core"),
        ("modeling/pooling.py", "def f():\n    import cifar10_pipeline.training.loop", "core"),
        ("evaluation/metrics.py", "import cifar10_pipeline.training.checkpoint", "core"),  # siblings
        ("reporting/docs.py", "def f():\n    from benchmarks.training import read_results", "script"),
    ],
)
def test_an_import_against_a_contract_breaks_it(
    tmp_path: Path, module: str, line: str, contract: str
) -> None:
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    target = tmp_path / "src" / "cifar10_pipeline" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    # a contract's name may wrap: its last word (core: the layers, script: the forbidden imports) ends the row
    assert "Contracts: 1 kept, 1 broken." in result.stdout, result.stdout[-3000:]
    assert f"{contract} BROKEN" in result.stdout, result.stdout[-3000:]
