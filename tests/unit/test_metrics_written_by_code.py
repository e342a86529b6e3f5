"""Only code writes metrics/ and records/: every file in metrics/ is an output of a dvc.yaml stage, every
file in records/ is written by one command (records/README.md names it), and no key is in a file that its
writer cannot write (a hand-typed note, a block pasted from another machine)."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cifar10_pipeline.reporting.benchmark_records import read_results

from ..conftest import PROJECT_ROOT

METRICS = PROJECT_ROOT / "metrics"
RECORDS = PROJECT_ROOT / "records"
PACKAGE = PROJECT_ROOT / "src" / "cifar10_pipeline"
BENCHMARKS = PROJECT_ROOT / "benchmarks"
PROVENANCE = PACKAGE / "core" / "provenance.py"  # git_commit, git_dirty, commit_source, commit_unknown_reason
# The records (not written by dvc repro) and the sources of the command that writes each one.
COMMAND_WRITERS = {
    "records/serving.json": [BENCHMARKS / "serving.py", PROVENANCE],
    "records/service_reliability.json": [BENCHMARKS / name for name in ("service_flood.py", "serving.py")]
    + [PACKAGE / "serving" / "schemas.py", PROVENANCE],  # /health's limits and load, copied in
    "records/ci_quick_baseline.json": [PROJECT_ROOT / "scripts" / "ci_gates.py", PROVENANCE],
    # `python -m pytest -m reliability --reliability-report`: the pytest plugin in
    # tests/support/reliability.py
    "records/reliability_suite.json": [PROJECT_ROOT / "tests" / "support" / "reliability.py", PROVENANCE],
    # benchmarks/torchrun.py (machine() from cold_start.py): train.json and eval.json of each run inside
    "records/torchrun/runs.json": [BENCHMARKS / "torchrun.py", BENCHMARKS / "cold_start.py", PROVENANCE]
    + [PACKAGE / "stages" / f"{stage}.py" for stage in ("train", "evaluate")],
    "records/stage_start.json": [BENCHMARKS / "stage_start.py", BENCHMARKS / "serving.py", PROVENANCE],
    # benchmarks/quick_start.py: its timings, the quick run's eval.json and train.json
    "records/quick_start.json": [BENCHMARKS / "quick_start.py", BENCHMARKS / "serving.py", PROVENANCE]
    + [PACKAGE / "stages" / f"{stage}.py" for stage in ("train", "evaluate")],
    # benchmarks/team_backup.py: its own timings and sizes, the machine from serving.py
    "records/team_backup.json": [BENCHMARKS / "team_backup.py", BENCHMARKS / "serving.py", PROVENANCE],
    # benchmarks/team_concurrency.py: one entry per writer form, the machine from serving.py
    "records/team_concurrency.json": [
        BENCHMARKS / "team_concurrency.py",
        BENCHMARKS / "serving.py",
        PROVENANCE,
    ],
    # benchmarks/cold_start.py: its own timings, each run's train.json
    "records/cold_start.json": [BENCHMARKS / "cold_start.py", PACKAGE / "stages" / "train.py", PROVENANCE],
    # benchmarks/profile_run.py: a profile through every stage; the stages' own metrics, copied
    **{
        f"records/parent_vit/{name}": [BENCHMARKS / "profile_run.py", PROVENANCE]
        + [PACKAGE / "stages" / f"{stage}.py" for stage in ("train", "evaluate", "emissions")]
        + [PACKAGE / "tracking" / "emissions.py"]
        for name in ("run.json", "train.json", "eval.json", "emissions.json")
    },
    # benchmarks/team_faults.py: the fault tests' timings, the harness's MLflow HTTP settings
    "records/team_faults.json": [
        BENCHMARKS / "team_faults.py",
        BENCHMARKS / "serving.py",
        PROVENANCE,
        PACKAGE / "tracking" / "runs.py",
    ],
}
# Validated against the writer's own pydantic models (extra="forbid"), which is stricter than a key scan.
SCHEMA_READERS = {"records/benchmark.json": read_results}


def dvc_outputs() -> set[str]:
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    outs: set[str] = set()
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                outs.add(item if isinstance(item, str) else next(iter(item)))
    return outs


def written_by_dvc(relative: str, outs: set[str]) -> bool:
    return any(relative == out or relative.startswith(out.rstrip("/") + "/") for out in outs)


def writable_keys(sources: list[Path]) -> tuple[set[str], list[re.Pattern[str]]]:
    """String literals, f-string shapes, keyword and annotated field names in ``sources``."""
    literals: set[str] = set()
    shapes: list[re.Pattern[str]] = []
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                literals.add(node.value)
            elif isinstance(node, ast.JoinedStr):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else ".+" for v in node.values]
                shapes.append(re.compile("".join(parts)))
            elif isinstance(node, ast.keyword) and node.arg:
                literals.add(node.arg)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                literals.add(node.target.id)  # dataclass / model fields, dumped by name
    return literals, shapes


def data_key(key: str) -> bool:
    """Keys that come from the data, not from code: numbers, file names, class names."""
    from cifar10_pipeline import CLASS_NAMES

    return key.lstrip("-").replace(".", "", 1).isdigit() or "." in key or key in CLASS_NAMES


def keys(value: object, path: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}.{key}" if path else key, key
            yield from keys(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for item in value:
            yield from keys(item, f"{path}[]")


def unwritten_keys(payload: object, sources: list[Path]) -> list[str]:
    literals, shapes = writable_keys(sources)
    return sorted(
        path
        for path, key in keys(payload)
        if key not in literals and not data_key(key) and not any(s.fullmatch(key) for s in shapes)
    )


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(PROJECT_ROOT)) for p in folder.rglob("*") if p.is_file())


def record_files() -> list[str]:
    return [f for f in files_in(RECORDS) if f != "records/README.md"]


@pytest.mark.parametrize("relative", files_in(METRICS))
def test_every_metrics_file_is_a_stage_output(relative: str) -> None:
    assert written_by_dvc(relative, dvc_outputs()), (
        f"{relative}: no stage in dvc.yaml writes it; metrics/ is what `dvc repro` writes; records/ the rest"
    )


@pytest.mark.parametrize("relative", record_files())
def test_every_record_has_a_writer_and_no_stage_writes_it(relative: str) -> None:
    assert relative in COMMAND_WRITERS or relative in SCHEMA_READERS, f"{relative}: no command writes it"
    assert not written_by_dvc(relative, dvc_outputs()), (
        f"{relative}: a stage writes it; it belongs in metrics/"
    )


def test_records_readme_names_every_record_and_its_command() -> None:
    readme = (RECORDS / "README.md").read_text()
    for relative in record_files():
        assert f"`{relative.removeprefix('records/')}`" in readme, (
            f"records/README.md does not list {relative}"
        )


@pytest.mark.parametrize("relative", [f for f in files_in(METRICS) + record_files() if f.endswith(".json")])
def test_no_key_that_its_writer_cannot_write(relative: str) -> None:
    payload = json.loads((PROJECT_ROOT / relative).read_text())
    if relative in SCHEMA_READERS:
        SCHEMA_READERS[relative](PROJECT_ROOT / relative)
        return
    sources = COMMAND_WRITERS.get(relative) or sorted(PACKAGE.rglob("*.py"))
    assert not unwritten_keys(payload, sources), f"{relative}: keys no code writes"


def test_a_hand_typed_key_is_caught() -> None:
    serving = json.loads((RECORDS / "serving.json").read_text())
    serving["settings"]["measured_by_hand_on_another_machine"] = True
    serving["cli_gpu"] = {"device": "NVIDIA H200", "typed_note": "copied from a log"}
    missing = unwritten_keys(serving, COMMAND_WRITERS["records/serving.json"])
    assert missing == ["cli_gpu", "cli_gpu.typed_note", "settings.measured_by_hand_on_another_machine"]
