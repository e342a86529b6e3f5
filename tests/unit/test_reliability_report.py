"""reports/reliability.md is rendered from the suite's record (scripts/reliability_report.py), which the
plugin writes only when asked."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jinja2
import pytest

from ..conftest import PROJECT_ROOT

# scripts/ is not a package: the script loaded from its file, as it runs
_spec = importlib.util.spec_from_file_location(
    "reliability_report", PROJECT_ROOT / "scripts" / "reliability_report.py"
)
reliability_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reliability_report)

RECORD = {
    "date": "2026-01-02 03:04 UTC",
    "machine": {
        "cpu": "AMD EPYC",
        "cores": 2,
        "python": "3.11.7",
        "platform": "Linux x86_64",
        "torch": "2.13.0",
    },
    "command": "python -m pytest -m reliability --reliability-report",
    "counts": {"passed": 1, "failed": 1, "skipped": 1, "not run": 0},
    "deselected": 0,
    "seconds": 12.5,
    "cases": [
        {
            "test": "tests/integration/test_faults.py::test_kill",
            "case": "SIGKILL mid-epoch",
            "outcome": "no output looks complete",
            "result": "passed",
            "seconds": 10.0,
            "detail": "",
        },
        {
            "test": "tests/unit/test_x.py::test_pipe",
            "case": "a | in a case",
            "outcome": "escaped",
            "result": "failed",
            "seconds": 2.0,
            "detail": "assert 1 == 2",
        },
        {
            "test": "tests/unit/test_x.py::test_skip",
            "case": "needs root",
            "outcome": "skips",
            "result": "skipped",
            "seconds": 0.5,
            "detail": "not root",
        },
    ],
}


def with_record(tmp_path: Path, record: dict) -> tuple[Path, Path]:
    """A record file, and where its report goes."""
    (tmp_path / "record.json").write_text(json.dumps(record))
    return tmp_path / "record.json", tmp_path / "reports" / "reliability.md"


def test_the_committed_report_is_the_committed_records_rendering() -> None:
    assert reliability_report.main(["--check"]) == 0, "run `python scripts/reliability_report.py` and commit"


def test_the_report_is_rendered_from_the_record(tmp_path: Path) -> None:
    record, path = with_record(tmp_path, RECORD)
    assert reliability_report.main([str(record), str(path), "--check"]) == 1  # no report yet
    assert reliability_report.main([str(record), str(path)]) == 0
    report = path.read_text()
    assert "**1 of 3 cases passed**, **1 FAILED**, 1 skipped" in report
    assert "| SIGKILL mid-epoch | no output looks complete | passed | `test_faults.py::test_kill` |" in report
    assert "| a \\| in a case | escaped | **FAILED**: assert 1 == 2 |" in report
    assert "skipped: not root" in report
    assert "2026-01-02 03:04 UTC (AMD EPYC, 2 cores" in report
    assert reliability_report.main([str(record), str(path), "--check"]) == 0  # rendered once, now current


def test_a_hand_edited_report_is_caught(tmp_path: Path) -> None:
    record, path = with_record(tmp_path, RECORD)
    reliability_report.main([str(record), str(path)])
    path.write_text(path.read_text().replace("**FAILED**", "passed"))
    assert reliability_report.main([str(record), str(path), "--check"]) == 1


def test_a_sample_says_so(tmp_path: Path) -> None:
    record, path = with_record(tmp_path, {**RECORD, "deselected": 4})
    reliability_report.main([str(record), str(path)])
    assert "A sample: 4 marked case(s) were deselected" in path.read_text()


def test_a_record_missing_a_field_is_an_error_not_an_empty_cell(tmp_path: Path) -> None:
    record, path = with_record(tmp_path, {key: value for key, value in RECORD.items() if key != "date"})
    with pytest.raises(jinja2.UndefinedError, match="date"):
        reliability_report.main([str(record), str(path)])
    assert not path.exists()


INNER_TESTS = textwrap.dedent(
    """
    import pytest

    @pytest.mark.reliability("a case that holds", "the promise")
    def test_holds():
        pass

    @pytest.mark.reliability("a case that breaks", "the promise")
    def test_breaks():
        assert 1 == 2

    @pytest.mark.reliability("a case that cannot run here", "the promise")
    def test_skips():
        pytest.skip("needs something")

    @pytest.mark.reliability("a case left out", "the promise")
    def test_left_out():
        pass

    def test_unmarked():
        pass
    """
)


def inner_pytest(tmp_path: Path, *args: str, source: str = INNER_TESTS) -> subprocess.CompletedProcess:
    """pytest on one test file in ``tmp_path``, with the project's markers and the reliability plugin."""
    (tmp_path / "test_inner.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": f"{PROJECT_ROOT}{os.pathsep}{PROJECT_ROOT / 'src'}"}
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(tmp_path / "test_inner.py"),
        "-p",
        "tests.support.reliability",
    ]
    command += ["-c", str(PROJECT_ROOT / "pyproject.toml"), "--rootdir", str(tmp_path)]
    command += ["-p", "no:cacheprovider", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_the_plugin_writes_the_record_only_when_asked(tmp_path: Path) -> None:
    record_file = tmp_path / "record.json"
    inner_pytest(tmp_path, "-k", "not left_out")
    assert not record_file.exists()
    done = inner_pytest(tmp_path, "-k", "not left_out", "--reliability-report", str(record_file))
    assert done.returncode == 1, done.stdout[-2000:]  # test_breaks fails
    record = json.loads(record_file.read_text())
    assert record["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "not run": 0}
    assert record["deselected"] == 1  # test_left_out: marked, but not in this run
    results = {c["test"].split("::")[-1]: (c["case"], c["result"]) for c in record["cases"]}
    assert results == {
        "test_holds": ("a case that holds", "passed"),
        "test_breaks": ("a case that breaks", "failed"),
        "test_skips": ("a case that cannot run here", "skipped"),
    }
    detail = {c["test"].split("::")[-1]: c["detail"] for c in record["cases"]}
    assert "assert 1 == 2" in detail["test_breaks"] and detail["test_skips"] == "needs something"
    assert record["machine"]["cores"] == os.cpu_count()


@pytest.mark.slow
def test_a_marker_without_case_and_outcome_is_refused(tmp_path: Path) -> None:
    bad = "import pytest\n\n@pytest.mark.reliability('only a case')\ndef test_x():\n    pass\n"
    done = inner_pytest(tmp_path, "--reliability-report", str(tmp_path / "r.json"), source=bad)
    assert done.returncode != 0
    assert "takes two non-empty strings (case, outcome)" in done.stdout + done.stderr
