"""Great Expectations plumbing for the raw-split suites: the context, the runner, and the failure lines.

A suite is one pandas table and the expectations it must meet (``TableCheck``, built by validation/raw.py
with ``expect``). ``run_checks`` validates every table in an ephemeral GE context (in-memory stores), so
nothing is written except the Data Docs site a caller asks for, and turns every failed expectation into one
line, ``<stage>: <split>: <check>: observed <x>, expected <y>``, decoded from the result formats of the
expectation kinds the suites use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cifar10_pipeline.validation.common import CheckReport, listed

if TYPE_CHECKING:
    from great_expectations.data_context import EphemeralDataContext
    from great_expectations.expectations import Expectation

# Every table's index is named this; GE reports offending rows by it, so it must read well in a message.
INDEX = "item"
DOCS_SITE = "cifar10"


@dataclass
class TableCheck:
    """A pandas table and the expectations it must meet; becomes one suite named ``<split>.<table>``."""

    split: str
    table: str
    frame: pd.DataFrame
    expectations: list[Expectation]


# --- suites and the runner -------------------------------------------------------------------------------


def expect(kind: str, check: str, expected: str, **kwargs: Any) -> Expectation:
    """Build ``gx.expectations.<kind>`` with what a failure message needs in ``meta``.

    meta keys: ``check`` and ``expected`` (the message), ``unit`` (what one row is), ``detail`` (a column
    whose value explains an offending row), ``hide_value`` (the detail says it all), ``flagged`` (a boolean
    column whose true rows a sum expectation counts; they are listed in the message), ``scalar`` (one-row
    table: report just the value).
    """
    import great_expectations as gx

    meta_keys = ("unit", "detail", "hide_value", "flagged", "scalar")
    meta = {"check": check, "expected": expected} | {k: kwargs.pop(k) for k in meta_keys if k in kwargs}
    return getattr(gx.expectations, kind)(meta=meta, description=f"{check}: expected {expected}", **kwargs)


def _context(docs_dir: Path | None) -> EphemeralDataContext:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites: dict[str, Any] = {}
    if docs_dir is not None:
        sites[DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    # Explicit config: the default ephemeral context would also build a docs site in a temp folder.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_checks(checks: Sequence[TableCheck], stage: str, docs_dir: Path | None = None) -> CheckReport:
    """Validate every table with its suite; build Data Docs into ``docs_dir`` only if all of them pass."""
    import great_expectations as gx

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("cifar10")
    run_id = gx.RunIdentifier(run_name=stage)
    report = CheckReport()
    for check in checks:
        name = f"{check.split}.{check.table}"
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all rows")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in check.expectations:
            suite.add_expectation(expectation)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": check.frame}, result_format="SUMMARY", run_id=run_id
        )
        counts = report.counts.setdefault(check.split, {"evaluated": 0, "failed": 0})
        counts["evaluated"] += result.statistics["evaluated_expectations"]
        counts["failed"] += result.statistics["unsuccessful_expectations"]
        for outcome in result.results:
            if not outcome.success:
                report.failures.append(_failure_line(stage, check, outcome))
    if docs_dir is not None and report.success:
        context.build_data_docs(site_names=[DOCS_SITE])
    return report


# --- failure messages ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    """A value from a GE result: numpy scalars print as plain numbers, pandas' NA and NaN as "null"."""
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "null"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _exception_message(outcome: Any) -> str | None:
    """The first line of an error GE caught: its exception_info is one ExceptionInfo-shaped dict, or one such
    dict per failed metric when a metric could not be computed."""
    info = outcome.exception_info or {}
    for entry in [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]:
        if entry.get("raised_exception"):
            return str(entry.get("exception_message")).splitlines()[0]
    return None


def _observed(outcome: Any, meta: Mapping[str, Any], frame: pd.DataFrame) -> str:
    """What a failed expectation saw, from the three result shapes the suites' expectation kinds produce."""
    result = outcome.result or {}
    unit = meta.get("unit", "rows")
    detail = meta.get("detail")
    error = _exception_message(outcome)
    if error is not None:
        return f"an error while checking ({error})"
    if "partial_missing_list" in result:  # distinct values vs a set
        parts = []
        for key, word in (("partial_missing_list", "missing"), ("partial_unexpected_list", "unexpected")):
            if result.get(key):
                parts.append(f"{word} {', '.join(_fmt(v) for v in sorted(result[key]))}")
        return "; ".join(parts)
    if "unexpected_count" in result:  # per-row expectations; the index list holds {INDEX: row, column: value}
        values = result["partial_unexpected_list"]
        if meta.get("scalar") and len(values) == 1:
            return _fmt(values[0])
        entries = []
        for where, value in zip(result["partial_unexpected_index_list"], values, strict=False):
            item = where[INDEX]
            text = f"{item}" if meta.get("hide_value") else f"{item}: {_fmt(value)}"
            entries.append(f"{text} ({frame.at[item, detail]})" if detail else text)
        named = listed(entries, result["unexpected_count"])
        return f"{result['unexpected_count']} of {result['element_count']} {unit}: {named}"
    value = result.get("observed_value")  # row counts and sums
    text = f"{_fmt(value)} {unit.removesuffix('s') if value == 1 else unit}"  # "1 image", "1 shard"
    flagged = meta.get("flagged")
    if flagged and value:
        rows = frame.index[frame[flagged].astype(bool)]
        entries = [f"{row} ({frame.at[row, detail]})" if detail else str(row) for row in rows]
        text += f": {listed(entries, len(entries))}"
    return text


def _failure_line(stage: str, check: TableCheck, outcome: Any) -> str:
    meta = outcome.expectation_config.meta or {}
    name = meta.get("check", outcome.expectation_config.type)
    observed = _observed(outcome, meta, check.frame)
    return f"{stage}: {check.split}: {name}: observed {observed}, expected {meta.get('expected', '?')}"
