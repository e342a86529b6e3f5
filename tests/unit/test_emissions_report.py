"""reports/emissions.md comes from templates/emissions.md.j2 and says what metrics/emissions.json says."""

from __future__ import annotations

import json

import jinja2
import pytest

from cifar10_pipeline.core.paths import EMISSIONS_METRICS, EMISSIONS_REPORT
from cifar10_pipeline.stages.emissions import render_report

from ..conftest import PROJECT_ROOT


def summary(gpu_model: str | None) -> dict:
    """metrics/emissions.json as the emissions stage writes it (the keys the report reads)."""
    stages = {
        "train": {"duration_s": 1400.04, "energy_kwh": 0.0109, "emissions_kg": 0.004},
        "evaluate": {"duration_s": 12.34, "energy_kwh": 0.00012, "emissions_kg": 0.00005},
    }
    return {
        "stages": stages,
        "total": {"duration_s": 1412.38, "energy_kwh": 0.01102, "emissions_kg": 0.00405},
        "hardware": {"cpu_model": "AMD EPYC", "cpu_count": 2, "gpu_model": gpu_model, "gpu_count": 2},
        "country_iso_code": "USA",
        "country_name": "United States",
        "tracking_mode": "machine",
        "codecarbon_version": "3.3.2",
    }


def test_report_rows_and_hardware() -> None:
    report = render_report(summary("NVIDIA H200"))
    assert report.startswith("# Emissions of the last `dvc repro`\n\nMeasured with codecarbon 3.3.2 ")
    assert (
        "the average grid of\nUnited States (USA, set by `emissions.country_iso_code` in params.yaml)"
        in report
    )
    assert "Hardware detected: CPU AMD EPYC (2 cores), GPU 2 x NVIDIA H200.\n" in report
    assert (
        "|---|---:|---:|---:|\n"
        "| train | 1400.0 | 10.900 | 4.000 |\n"
        "| evaluate | 12.3 | 0.120 | 0.050 |\n"
        "| **total** | **1412.4** | **11.020** | **4.050** |\n\nHow to read it:"
    ) in report
    assert report.endswith("not meter readings.\n")
    assert "GPU none." in render_report(summary(None))


def test_committed_report_is_the_rendering_of_committed_metrics() -> None:
    metrics, report = PROJECT_ROOT / EMISSIONS_METRICS, PROJECT_ROOT / EMISSIONS_REPORT
    if not (metrics.is_file() and report.is_file()):
        pytest.skip("no committed emissions results yet")
    assert render_report(json.loads(metrics.read_text())) == report.read_text()


def test_a_missing_field_stops_the_report() -> None:
    incomplete = summary(None)
    del incomplete["country_name"]  # printed as is: without StrictUndefined it would be an empty string
    with pytest.raises(jinja2.UndefinedError, match="'country_name'"):
        render_report(incomplete)
