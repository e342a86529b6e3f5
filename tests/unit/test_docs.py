"""Figures in README.md, docs/gpu.md and reports/benchmark.md are rendered from metrics/ and records/, never
typed."""

from __future__ import annotations

import json
import re
import shutil
import tomllib
from pathlib import Path

import jinja2
import pytest

from cifar10_pipeline.core.provenance import pinned_requirement
from cifar10_pipeline.reporting import docs

from ..conftest import PROJECT_ROOT


def copy_project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for relative in (*docs.DOCUMENTS, docs.BENCHMARK_REPORT, Path("params.yaml")):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / relative, root / relative)
    shutil.copytree(PROJECT_ROOT / "metrics", root / "metrics")
    shutil.copytree(PROJECT_ROOT / "records", root / "records")
    return root


def test_committed_blocks_are_what_the_metrics_render() -> None:
    stale = docs.render_all(PROJECT_ROOT, write=False)
    assert not stale, (
        f"stale generated blocks {stale}: run `python -m cifar10_pipeline.reporting.docs` and commit"
    )


def test_a_hand_edited_figure_is_caught_and_rendering_restores_it(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    readme = root / "README.md"
    original = readme.read_text()
    start = original.index("<!-- generated:readme_results")
    figure = original.index("%", start)  # the first percentage inside the block
    edited = "1" if original[figure - 1] == "7" else "7"  # a different digit, whatever the figure is
    readme.write_text(original[: figure - 1] + edited + original[figure:])
    assert [(s.document, s.block) for s in docs.render_all(root, write=False)] == [
        (Path("README.md"), "readme_results")
    ]
    docs.render_all(root, write=True)
    assert readme.read_text() == original


def test_the_benchmark_report_is_checked_too(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    report = root / docs.BENCHMARK_REPORT
    report.write_text(report.read_text() + "| a row typed by hand |\n")
    assert [s.block for s in docs.render_all(root, write=False)] == ["(whole file)"]


def test_a_missing_metric_is_an_error_not_an_empty_cell(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    del metrics["f1_macro"]
    (root / "metrics" / "eval.json").write_text(json.dumps(metrics))
    with pytest.raises(jinja2.UndefinedError, match="f1_macro"):
        docs.render_all(root, write=False)


def test_a_document_without_blocks_is_refused(tmp_path: Path) -> None:
    root = copy_project(tmp_path)
    (root / "docs" / "gpu.md").write_text("# GPU\n\ngpu_fast reaches 99% in 0.1 s.\n")
    with pytest.raises(SystemExit, match="no generated block"):
        docs.render_all(root, write=False)


def test_torch_versions_other_than_the_pin_are_flagged() -> None:
    assert docs.torch_label("2.13.0+cpu") == "2.13.0+cpu"
    assert docs.torch_label("2.11.0+cu130") == "2.11.0+cu130 (not the pinned 2.13.0)"


def test_the_torch_pin_has_one_source() -> None:
    """pyproject.toml pins torch and transformers; the package reads those pins from its installed metadata,
    and the Makefile and CI, which install torch first from a CPU wheel index, repeat the same torch pin."""
    dependencies = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {dependency for dependency in dependencies if dependency.startswith(("torch==", "transformers=="))}
    assert {pinned_requirement("torch"), pinned_requirement("transformers")} == pins
    for path in ("Makefile", ".github/workflows/ci.yml"):
        repeated = set(re.findall(r"torch==[\w.+]+", (PROJECT_ROOT / path).read_text()))
        assert repeated == {pinned_requirement("torch")}, path
