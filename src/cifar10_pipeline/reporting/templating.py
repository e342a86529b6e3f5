"""The one Jinja environment every document is rendered with (the README blocks, the card, the reports).

Kept apart from reporting.docs (the README/docs renderer, which also reads records/benchmark.json through
reporting.benchmark_records): a stage that renders a template depends (for DVC) on this file and its
template only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jinja2


def pct(fraction: float) -> str:
    return f"{100 * fraction:.2f}%"


def template_environment(**filters: Callable[..., Any]) -> jinja2.Environment:
    """Templates of reporting/templates; a missing value is an error (StrictUndefined), not an empty cell."""
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("cifar10_pipeline.reporting", "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters |= {"pct": pct, **filters}
    return environment
