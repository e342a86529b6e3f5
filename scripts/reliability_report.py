"""reports/reliability.md from the record the test suite writes when run with ``--reliability-report``
(tests/support/reliability.py: every test marked ``reliability(case, outcome)`` and its result). The
suite's own report, so it is rendered here and not by the package (which ships without the tests).

    python scripts/reliability_report.py                # records/reliability_suite.json -> reports/
    python scripts/reliability_report.py --check        # exit 1 if the report is not its rendering
    python scripts/reliability_report.py RECORD REPORT  # another record (CI's own run, not in records/)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import jinja2

ROOT = Path(__file__).resolve().parents[1]
RECORD = Path("records/reliability_suite.json")
REPORT = Path("reports/reliability.md")
TEMPLATES = Path(__file__).resolve().parent / "templates"


def render(suite: dict[str, Any]) -> str:
    """The report's text for a reliability record (a missing field is an error, not an empty cell)."""
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return environment.get_template("reliability.md.j2").render(suite=suite)


def is_current(record: Path, report: Path) -> bool:
    return report.is_file() and report.read_text() == render(json.loads(record.read_text()))


def write(record: Path, report: Path) -> None:
    """Render ``record`` into ``report`` at once: a killed render leaves the old report, not half of one."""
    text = render(json.loads(record.read_text()))
    report.parent.mkdir(parents=True, exist_ok=True)
    handle, staged = tempfile.mkstemp(dir=report.parent, prefix=f".{report.name}.")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(staged, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("record", nargs="?", type=Path, default=ROOT / RECORD, help=f"default {RECORD}")
    parser.add_argument("report", nargs="?", type=Path, default=ROOT / REPORT, help=f"default {REPORT}")
    parser.add_argument(
        "--check", action="store_true", help="only check that REPORT is current (exit 1 if not)"
    )
    args = parser.parse_args(argv)
    if not args.record.is_file():
        print(f"error: {args.record} does not exist", file=sys.stderr)
        print("hint: python -m pytest -m reliability --reliability-report writes it", file=sys.stderr)
        return 1
    if args.check:
        if is_current(args.record, args.report):
            return 0
        print(
            f"{args.report} is stale: run `python scripts/reliability_report.py` and commit", file=sys.stderr
        )
        return 1
    write(args.record, args.report)
    print(f"{args.report}: rendered from {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
