"""dvc.yaml declares, for every stage, each project module the stage's code imports (else DVC would not
re-run a stage whose code changed, and `dvc status` would lie)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import PROJECT_ROOT

STAGES = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
# Imported only for the MLflow run around a stage; changing how runs are logged must not retrain the model.
NOT_A_RESULT_DEP = {"src/cifar10_pipeline/tracking.py", "src/cifar10_pipeline/stages/__init__.py"}


def imported_project_files(module: str) -> set[str]:
    """Project source files loaded by importing ``module`` in a fresh interpreter (and running nothing)."""
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        "print(json.dumps([m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    files = json.loads(out.strip().splitlines()[-1])
    src = PROJECT_ROOT / "src"
    return {str(path.relative_to(PROJECT_ROOT)) for path in map(Path, files) if path.is_relative_to(src)}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_the_code_it_imports(stage: str) -> None:
    cmd = STAGES[stage]["cmd"]
    module = cmd.split("-m", 1)[1].split()[0]
    declared = {dep for dep in STAGES[stage].get("deps", []) if isinstance(dep, str)}
    missing = imported_project_files(module) - declared - NOT_A_RESULT_DEP
    assert not missing, f"stage {stage!r} imports {sorted(missing)} but dvc.yaml does not list them as deps"
