"""Layers follow the pipeline: the shipped package never imports the benchmarks, the tests or (below the
stages) a stage module. Every import form counts, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ..conftest import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "src" / "cifar10_pipeline"
OUTSIDE_THE_PACKAGE = ("benchmarks", "tests", "scripts")  # top-level folders of the repository, not shipped
STAGES = "cifar10_pipeline.stages"


def imported_modules(source: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``source`` names (absolute imports)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def forbidden_imports(path: Path, source: str | None = None) -> list[str]:
    """What ``path`` (a module of the package) imports that its layer may not."""
    in_stages = PACKAGE / "stages" in path.parents
    found = []
    for name in sorted(imported_modules(path.read_text() if source is None else source)):
        top = name.partition(".")[0]
        if top in OUTSIDE_THE_PACKAGE or (
            not in_stages and (name == STAGES or name.startswith(STAGES + "."))
        ):
            found.append(name)
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_the_package_imports_no_benchmark_test_or_stage_module(path: Path) -> None:
    assert not forbidden_imports(path), (
        f"{path.relative_to(PROJECT_ROOT)} imports {forbidden_imports(path)}: the package may not import "
        "benchmarks/, tests/ or scripts/, and only stages/ may import a stage; move the shared code into "
        "the package layer that owns it (core, modeling, training, evaluation, reporting, ...)"
    )


def test_a_forbidden_import_is_caught() -> None:
    library = PACKAGE / "reporting" / "docs.py"
    stage = PACKAGE / "stages" / "train.py"
    inside_a_function = "def f():\n    from benchmarks.training import read_results\n"
    assert forbidden_imports(library, inside_a_function) == [
        "benchmarks.training",
        "benchmarks.training.read_results",
    ]
    assert forbidden_imports(library, "from cifar10_pipeline.stages import train\n") == [
        "cifar10_pipeline.stages",
        "cifar10_pipeline.stages.train",
    ]
    assert forbidden_imports(library, "import tests.localserver\n") == ["tests.localserver"]
    # A stage may import another layer's module, never a benchmark.
    assert forbidden_imports(stage, "from cifar10_pipeline.stages.download import download\n") == []
    assert forbidden_imports(stage, "import benchmarks.training\n") == ["benchmarks.training"]
