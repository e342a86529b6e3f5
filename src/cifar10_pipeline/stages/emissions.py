"""Stage 6, emissions: add up what codecarbon measured in the compute stages (train, evaluate).

Writes ``metrics/emissions.json`` (per stage and total: kg CO2eq, kWh, seconds; the hardware codecarbon
detected and the grid country used) and the human-readable ``reports/emissions.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cifar10_pipeline.core.data import DataError
from cifar10_pipeline.core.errors import run_cli
from cifar10_pipeline.core.io import atomic_output, write_json_atomic
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.core.paths import EMISSIONS_METRICS, EMISSIONS_REPORT, STAGE_EMISSIONS_DIR
from cifar10_pipeline.reporting.templating import template_environment
from cifar10_pipeline.tracking.emissions import STAGE_FIELDS
from cifar10_pipeline.tracking.runs import stage_run

COMPUTE_STAGES = ("train", "evaluate")


def aggregate(stage_dir: Path = STAGE_EMISSIONS_DIR) -> dict:
    stages = {}
    for stage in COMPUTE_STAGES:
        path = Path(stage_dir) / f"{stage}.json"
        if not path.is_file():
            raise DataError(f"{path} is missing: run the {stage} stage first (dvc repro {stage})")
        stages[stage] = json.loads(path.read_text())
    total = {field: sum(record[field] or 0.0 for record in stages.values()) for field in STAGE_FIELDS}
    first = stages[COMPUTE_STAGES[0]]
    return {
        **{field: total[field] for field in ("emissions_kg", "energy_kwh", "duration_s")},
        "stages": {name: {field: record[field] for field in STAGE_FIELDS} for name, record in stages.items()},
        "total": total,
        "hardware": {
            "cpu_model": first["cpu_model"],
            "cpu_count": first["cpu_count"],
            "gpu_model": first["gpu_model"],
            "gpu_count": first["gpu_count"],
        },
        "country_iso_code": first["country_iso_code"],
        "country_name": first["country_name"],
        "tracking_mode": first["tracking_mode"],
        "codecarbon_version": first["codecarbon_version"],
    }


def render_report(summary: dict[str, Any]) -> str:
    """``reports/emissions.md`` from ``reporting/templates/emissions.md.j2``."""
    environment = template_environment()
    return environment.get_template("emissions.md.j2").render(summary=summary)


def main() -> None:
    params = load_params()
    with stage_run("emissions", params, outputs=(EMISSIONS_METRICS, EMISSIONS_REPORT)) as run:
        summary = aggregate()
        write_json_atomic(EMISSIONS_METRICS, summary)
        with atomic_output(EMISSIONS_REPORT) as staged:
            staged.write_text(render_report(summary))
        run.log_metrics(
            {f"emissions_{k}": v for k, v in summary["total"].items() if k in STAGE_FIELDS[:3]},
            to_parent=True,
        )
        run.log_artifact(EMISSIONS_REPORT)
    print(
        f"emissions: {summary['emissions_kg'] * 1000:.2f} g CO2eq, {summary['energy_kwh'] * 1000:.2f} Wh "
        f"over {summary['duration_s']:.0f} s -> {EMISSIONS_METRICS}"
    )


if __name__ == "__main__":
    run_cli(main)
