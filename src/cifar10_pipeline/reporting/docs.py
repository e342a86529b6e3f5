"""Figures in the docs come from ``metrics/`` and ``records/``: marked blocks that this module renders, never
typed by hand.

    python -m cifar10_pipeline.reporting.docs          # re-render every block and the reports below
    python -m cifar10_pipeline.reporting.docs --check  # exit 1, naming each stale block

A block is the text between ``<!-- generated:NAME ... -->`` and ``<!-- /generated:NAME -->`` in a
document listed in ``DOCUMENTS``; it is rendered from ``templates/NAME.md.j2`` with every file in
``metrics/`` (what ``dvc repro`` writes) and in ``records/`` (records/README.md: each with the command that
rewrites it) as context (``tests/unit/test_docs.py`` fails when a committed block differs from its rendering).
A whole report rendered the same way: reports/benchmark.md from records/benchmark.json. (The test suite's
own report, reports/reliability.md, is rendered by scripts/reliability_report.py: the package ships without
the tests.)
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml

from cifar10_pipeline.core.io import atomic_output
from cifar10_pipeline.core.paths import BENCHMARK_RECORD, METRICS_DIR, PARAMS_FILE, RECORDS_DIR
from cifar10_pipeline.core.provenance import pinned_requirement
from cifar10_pipeline.reporting.benchmark_records import Entry, read_results
from cifar10_pipeline.reporting.templating import template_environment

DOCUMENTS = (Path("README.md"), Path("docs/gpu.md"), Path("docs/team.md"))
BENCHMARK_REPORT = Path("reports/benchmark.md")
BLOCK = re.compile(
    r"(?P<open><!-- generated:(?P<name>[\w-]+)[^\n]*-->\n)(?P<body>.*?)"
    r"(?P<close><!-- /generated:(?P=name) -->)",
    re.DOTALL,
)


def pct(value: float, digits: int = 2) -> str:
    return f"{100 * value:.{digits}f}%"


def pm(values: dict[str, Any], mean: str = "accuracy_mean", std: str = "accuracy_std") -> str:
    """``90.86% ± 0.15`` from an entry's mean and standard deviation (points)."""
    return f"{100 * values[mean]:.2f}% ± {100 * values[std]:.2f}"


def torch_label(version: str) -> str:
    """The torch version, flagged where it is not the project's pinned one."""
    # pyproject.toml's pin: figures from another torch say so.
    pinned = pinned_requirement("torch").partition("==")[2]
    return version if version.startswith(pinned) else f"{version} (not the pinned {pinned})"


def commit_label(record: Any) -> str:
    """``commit 06d24a3b`` from a record's provenance fields (core/provenance.py), flagged where the tree had
    uncommitted changes or where the commit is not known."""
    fields = record if isinstance(record, dict) else record.model_dump()
    commit = fields.get("git_commit")
    if not commit:
        return "commit unknown"
    dirty = {True: ", with uncommitted changes", None: ", tree state not recorded"}.get(
        fields.get("git_dirty"), ""
    )
    return f"commit {commit[:8]}{dirty}"


def _environment() -> jinja2.Environment:
    return template_environment(pct=pct, pm=pm, torch_label=torch_label, commit_label=commit_label)


def load_metrics(
    metrics_dir: Path = METRICS_DIR, params_file: Path = PARAMS_FILE, records_dir: Path = RECORDS_DIR
) -> dict[str, Any]:
    """Every JSON and CSV file in ``metrics_dir`` and ``records_dir`` by stem (``emissions/train.json`` ->
    ``emissions_train``), benchmark entries validated, plus the active profile from params.yaml."""
    context: dict[str, Any] = {"params": yaml.safe_load(Path(params_file).read_text())}
    for folder in (Path(metrics_dir), Path(records_dir)):
        for path in sorted(folder.rglob("*")):
            name = "_".join(path.relative_to(folder).with_suffix("").parts)
            if path.suffix not in (".json", ".csv"):
                continue
            if name in context:
                raise SystemExit(f"{path}: a second file named {name!r} in metrics/ and records/")
            if path.suffix == ".json":
                context[name] = json.loads(path.read_text())
            else:
                with open(path, newline="") as handle:
                    context[name] = list(csv.DictReader(handle))
    context["benchmark"] = read_results(Path(records_dir) / BENCHMARK_RECORD.name)
    return context


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: a killed render leaves the old document, not half of one."""
    with atomic_output(path) as staged:
        staged.write_text(text)


def render_template(name: str, **context: Any) -> str:
    return _environment().get_template(name).render(**context)


def render_benchmark_report(results: dict[str, Entry]) -> str:
    """reports/benchmark.md for the entries of records/benchmark.json."""
    return render_template("benchmark_report.md.j2", results=results)


@dataclass
class Stale:
    document: Path
    block: str


def render_document(text: str, context: dict[str, Any]) -> tuple[str, list[str]]:
    """``text`` with every block re-rendered, and the names of the blocks whose body changed."""
    changed: list[str] = []

    def replace(match: re.Match[str]) -> str:
        body = render_template(f"{match['name']}.md.j2", **context)
        if body != match["body"]:
            changed.append(match["name"])
        return match["open"] + body + match["close"]

    return BLOCK.sub(replace, text), changed


def render_all(root: Path = Path("."), write: bool = True) -> list[Stale]:
    """Re-render every block of every document (and the benchmark report); returns what was stale."""
    root = Path(root)
    context = load_metrics(root / METRICS_DIR, root / PARAMS_FILE, root / RECORDS_DIR)
    stale: list[Stale] = []
    for document in DOCUMENTS:
        path = root / document
        text = path.read_text()
        if not BLOCK.search(text):
            raise SystemExit(f"{path} has no generated block: it must quote its figures through one")
        rendered, changed = render_document(text, context)
        stale += [Stale(document, name) for name in changed]
        if write and changed:
            write_text_atomic(path, rendered)
    reports = {BENCHMARK_REPORT: render_benchmark_report(context["benchmark"])}
    for relative, report in reports.items():
        path = root / relative
        if not path.is_file() or path.read_text() != report:
            stale.append(Stale(relative, "(whole file)"))
            if write:
                write_text_atomic(path, report)
    return stale


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = render_all(write=not args.check)
    for item in stale:
        verb = "is stale" if args.check else "re-rendered"
        print(f"{item.document}: block {item.block} {verb}")
    if args.check and stale:
        print("run `python -m cifar10_pipeline.reporting.docs` and commit the result", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
