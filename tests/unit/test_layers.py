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


# Each contract's name ends in one word (a name may wrap): core (the layers), script (no benchmark, test or
# script), light (no torch or transformers in the light stages).
CONTRACT_WORDS = ("core", "script", "light")


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # a layer breach through the bottom floor also drags torch under the light stages
        ("core/paths.py", "from cifar10_pipeline.stages import train", {"core", "light"}),
        ("modeling/pooling.py", "def f():\n    import cifar10_pipeline.training.loop", {"core"}),
        ("evaluation/metrics.py", "import cifar10_pipeline.training.checkpoint", {"core"}),  # siblings
        ("reporting/docs.py", "def f():\n    from benchmarks.training import read_results", {"script"}),
        ("stages/model_card.py", "def f():\n    import torch", {"light"}),
        ("stages/download.py", "from cifar10_pipeline.modeling.inference import predict_logits", {"light"}),
    ],
)
def test_an_import_against_a_contract_breaks_it(
    tmp_path: Path, module: str, line: str, broken: set[str]
) -> None:
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    target = tmp_path / "src" / "cifar10_pipeline" / module
    target.write_text(target.read_text() + "\n" + line + "\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout[-3000:]
    kept = len(CONTRACT_WORDS) - len(broken)
    assert f"Contracts: {kept} kept, {len(broken)} broken." in result.stdout, result.stdout[-3000:]
    for word in CONTRACT_WORDS:
        state = "BROKEN" if word in broken else "KEPT"
        assert f"{word} {state}" in result.stdout, result.stdout[-3000:]
