"""pytest plugin: the reliability suite's results, for reports/reliability.md.

Every test marked ``@pytest.mark.reliability(case, outcome)`` is one fault or hostile input tried (``case``)
and the promise it checks (``outcome``). With ``--reliability-report`` the session writes, at its end,
``records/reliability_suite.json`` (or the path given): the date, the machine, the command line, the counts
and each case with its result (passed, failed or skipped), from which ``python
scripts/reliability_report.py`` renders reports/reliability.md. Without the option nothing is written,
so an ordinary or partial run never overwrites the record; a run that deselects some marked tests (``-k``)
says so in the record (``deselected``), and the report says it was a sample.

    python -m pytest -m reliability --reliability-report      # every case, the record CI keeps
"""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECORD = PROJECT_ROOT / "records" / "reliability_suite.json"
MARKER = "reliability"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-report",
        nargs="?",
        const=str(DEFAULT_RECORD),
        default=None,
        metavar="PATH",
        help="write the reliability cases' results to PATH (default records/reliability_suite.json)",
    )


def marker_case(item: pytest.Item) -> tuple[str, str] | None:
    """The (case, outcome) of a marked test; a marker without both is a usage error."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    args = list(marker.args) + [marker.kwargs[k] for k in ("case", "outcome") if k in marker.kwargs]
    if len(args) != 2 or not all(isinstance(a, str) and a.strip() for a in args):
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.reliability takes two non-empty strings (case, outcome), "
            f"got {args!r}"
        )
    return args[0], args[1]


@dataclass
class Case:
    test: str
    case: str
    outcome: str
    result: str = "not run"
    seconds: float = 0.0
    detail: str = ""


@dataclass
class Collector:
    """The cases and their results, on the process that writes the record.

    Without xdist this process collects and runs every test. With xdist (``-n``) the workers collect and
    run; each sends its cases and deselections at its end (``workeroutput``), and the reports reach this
    process as they happen: results are therefore kept by node id and matched with the cases at the end."""

    path: Path
    cases: dict[str, Case] = field(default_factory=dict)
    deselected: set[str] = field(default_factory=set)
    reports: dict[str, list[tuple[str, str, float, str]]] = field(default_factory=dict)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        self.cases.update(collected_cases(items))

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected |= {item.nodeid for item in items if item.get_closest_marker(MARKER)}

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:  # xdist: a worker finished
        found = getattr(node, "workeroutput", {}).get(MARKER, {})
        for nodeid, (case, outcome) in found.get("cases", {}).items():
            self.cases.setdefault(nodeid, Case(nodeid, case, outcome))
        self.deselected |= set(found.get("deselected", ()))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        detail = ""
        if report.failed:
            detail = _first_line(report.longreprtext)
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            detail = reason.removeprefix("Skipped: ")
        self.reports.setdefault(report.nodeid, []).append(
            (report.when, report.outcome, report.duration, detail)
        )

    def results(self) -> list[Case]:
        for nodeid in self.deselected:
            self.cases.pop(nodeid, None)
        for nodeid, case in self.cases.items():
            for when, outcome, duration, detail in self.reports.get(nodeid, []):
                case.seconds += duration
                if outcome == "failed":
                    case.result = "failed"
                    case.detail = case.detail or detail
                elif outcome == "skipped" and case.result != "failed":
                    case.result, case.detail = "skipped", detail
                elif when == "call" and outcome == "passed" and case.result == "not run":
                    case.result = "passed"
        return list(self.cases.values())

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from cifar10_pipeline.core.io import write_json_atomic
        from cifar10_pipeline.core.provenance import tree_provenance

        cases = self.results()
        record = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            **tree_provenance(PROJECT_ROOT).fields(),  # the commit read from the tree (core/provenance.py)
            "machine": machine(),
            "command": "python -m pytest " + " ".join(session.config.invocation_params.args),
            "counts": {
                result: sum(c.result == result for c in cases)
                for result in ("passed", "failed", "skipped", "not run")
            },
            "deselected": len(self.deselected),
            "seconds": round(sum(c.seconds for c in cases), 1),
            "cases": [
                {
                    "test": c.test,
                    "case": c.case,
                    "outcome": c.outcome,
                    "result": c.result,
                    "seconds": round(c.seconds, 2),
                    "detail": c.detail,
                }
                for c in cases
            ],
        }
        write_json_atomic(self.path, record)


def collected_cases(items: list[pytest.Item]) -> dict[str, Case]:
    cases = {}
    for item in items:
        found = marker_case(item)
        if found is not None:
            cases[item.nodeid] = Case(item.nodeid, *found)
    return cases


@dataclass
class WorkerCases:
    """On an xdist worker: the cases it collected and deselected, sent to the controller at its end."""

    config: pytest.Config
    cases: dict[str, tuple[str, str]] = field(default_factory=dict)
    deselected: list[str] = field(default_factory=list)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        self.cases.update({k: (c.case, c.outcome) for k, c in collected_cases(items).items()})

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        self.deselected += [item.nodeid for item in items if item.get_closest_marker(MARKER)]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.config.workeroutput[MARKER] = {"cases": self.cases, "deselected": self.deselected}  # type: ignore[attr-defined]


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("E ")]
    return (lines[0][2:].strip() if lines else text.strip().splitlines()[-1] if text.strip() else "")[:200]


def machine() -> dict[str, Any]:
    from cifar10_pipeline.core.device import cpu_model_name

    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch_version,
    }


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--reliability-report")
    if path is None:
        return
    if hasattr(config, "workerinput"):  # an xdist worker: the controller writes the record
        config.pluginmanager.register(WorkerCases(config), "reliability-worker")
    else:
        config.pluginmanager.register(Collector(Path(path)), "reliability-collector")
