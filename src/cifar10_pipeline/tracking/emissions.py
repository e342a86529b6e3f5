"""codecarbon measurement of a compute stage, written as one small JSON per stage for the emissions stage."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from cifar10_pipeline.core.io import write_json_atomic

STAGE_FIELDS = (
    "emissions_kg",
    "energy_kwh",
    "duration_s",
    "cpu_energy_kwh",
    "gpu_energy_kwh",
    "ram_energy_kwh",
)


@contextlib.contextmanager
def measure(stage: str, country_iso_code: str, out_file: Path) -> Iterator[None]:
    """Track energy and CO2eq of the block with codecarbon's OfflineEmissionsTracker (no network needed).

    The JSON is written only when the block succeeds, so a failed stage leaves no emissions record behind.

    ``allow_multiple_runs=True`` explicitly (codecarbon's default, which a user's .codecarbon.config or
    CODECARBON_ALLOW_MULTIPLE_RUNS can turn off): without it codecarbon takes a lock file in the temp folder
    that a SIGKILLed run leaves behind, and every later run then measures nothing and writes no record; it
    would also replace the stage harness's SIGTERM and Ctrl-C handlers with its own, so an interrupted
    stage's run would be marked FAILED instead of KILLED.
    """
    from codecarbon import OfflineEmissionsTracker

    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    tracker = OfflineEmissionsTracker(
        project_name=f"cifar10-{stage}",
        country_iso_code=country_iso_code,
        save_to_file=False,
        log_level="error",
        measure_power_secs=5,
        allow_multiple_runs=True,
    )
    tracker.start()
    try:
        yield
    except BaseException:
        tracker.stop()
        raise
    tracker.stop()
    data = tracker.final_emissions_data
    record = {
        "stage": stage,
        "emissions_kg": data.emissions,
        "energy_kwh": data.energy_consumed,
        "duration_s": data.duration,
        "cpu_energy_kwh": data.cpu_energy,
        "gpu_energy_kwh": data.gpu_energy,
        "ram_energy_kwh": data.ram_energy,
        "cpu_model": data.cpu_model,
        "cpu_count": data.cpu_count,
        "gpu_model": data.gpu_model or None,
        "gpu_count": data.gpu_count,
        "country_iso_code": data.country_iso_code,
        "country_name": data.country_name,
        "tracking_mode": data.tracking_mode,
        "codecarbon_version": data.codecarbon_version,
    }
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_file, record)
