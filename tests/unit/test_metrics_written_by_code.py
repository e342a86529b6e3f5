"""Only code writes metrics/: every file there has a writer, and no key is in a file that its writer cannot
write (a hand-typed note, a block pasted from another machine)."""

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
PACKAGE = PROJECT_ROOT / "src" / "cifar10_pipeline"
# Files written by a command outside the pipeline, and the sources of that command.
COMMAND_WRITERS = {
    "metrics/serving.json": [PROJECT_ROOT / "benchmarks" / "serving.py"],
    "metrics/service_reliability.json": [
        PROJECT_ROOT / "benchmarks" / name for name in ("service_flood.py", "serving.py")
    ]
    + [PACKAGE / "serving" / "schemas.py"],  # /health's limits and load, copied in
    "metrics/ci_quick_baseline.json": [PROJECT_ROOT / "scripts" / "ci_gates.py"],
    # `python -m pytest -m reliability --reliability-report`: the pytest plugin in tests/reliability.py
    "metrics/reliability_suite.json": [PROJECT_ROOT / "tests" / "reliability.py"],
    # scripts/torchrun_record.py from the device job's folder: train.json and eval.json of each run inside
    "metrics/torchrun/runs.json": [PROJECT_ROOT / "scripts" / "torchrun_record.py"]
    + [PACKAGE / "stages" / f"{stage}.py" for stage in ("train", "evaluate")],
    # scripts/cold_start_record.py from the issue 18 device job's folder (its shell's timings, train.json)
    "metrics/cold_start.json": [
        PROJECT_ROOT / "scripts" / "cold_start_record.py",
        PACKAGE / "stages" / "train.py",
    ],
}
# Validated against the writer's own pydantic models (extra="forbid"), which is stricter than a key scan.
SCHEMA_READERS = {"metrics/benchmark.json": read_results}


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


def metrics_files() -> list[str]:
    return sorted(str(p.relative_to(PROJECT_ROOT)) for p in METRICS.rglob("*") if p.is_file())


@pytest.mark.parametrize("relative", metrics_files())
def test_every_metrics_file_has_a_writer(relative: str) -> None:
    assert (
        written_by_dvc(relative, dvc_outputs()) or relative in COMMAND_WRITERS or relative in SCHEMA_READERS
    ), f"{relative}: no stage in dvc.yaml and no command writes it; only code writes metrics/"


@pytest.mark.parametrize("relative", [f for f in metrics_files() if f.endswith(".json")])
def test_no_key_that_its_writer_cannot_write(relative: str) -> None:
    payload = json.loads((PROJECT_ROOT / relative).read_text())
    if relative in SCHEMA_READERS:
        SCHEMA_READERS[relative](PROJECT_ROOT / relative)
        return
    sources = COMMAND_WRITERS.get(relative) or sorted(PACKAGE.rglob("*.py"))
    assert not unwritten_keys(payload, sources), f"{relative}: keys no code writes"


def test_a_hand_typed_key_is_caught() -> None:
    serving = json.loads((METRICS / "serving.json").read_text())
    serving["settings"]["measured_by_hand_on_another_machine"] = True
    serving["cli_gpu"] = {"device": "NVIDIA H200", "typed_note": "copied from a log"}
    missing = unwritten_keys(serving, COMMAND_WRITERS["metrics/serving.json"])
    assert missing == ["cli_gpu", "cli_gpu.typed_note", "settings.measured_by_hand_on_another_machine"]
