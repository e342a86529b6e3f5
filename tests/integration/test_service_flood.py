"""The service under a flood of valid and hostile uploads: a real uvicorn server on loopback, 32 clients for a
fixed time (benchmarks/service_flood.py, whose figures for the trained model are in
records/service_reliability.json). Here on a tiny model, so the flood is about the service, not the net."""

from __future__ import annotations

import json
import sys

import pytest

from ..conftest import PROJECT_ROOT
from ..support.helpers import save_tiny_convnet

sys.path.insert(0, str(PROJECT_ROOT))
from benchmarks.service_flood import HEALTH_BOUND_MS, RSS_BOUND_MB, run_flood

FLOOD_SECONDS = 20.0
CLIENTS = 32


@pytest.fixture(scope="module")
def flood(tmp_path_factory: pytest.TempPathFactory) -> dict:
    scratch = tmp_path_factory.mktemp("flood")
    model = save_tiny_convnet(scratch / "model", tta_level=2)
    result = run_flood(str(model), FLOOD_SECONDS, CLIENTS, scratch)
    (scratch / "service_reliability.json").write_text(json.dumps(result, indent=2))
    return result


def _explain(result: dict) -> str:
    wrong = [case for case in result["cases"] if case["wrong"]]
    return json.dumps(
        {"wrong": wrong, "transport": result["transport_failures"], "promises": result["promises"]}, indent=1
    )


@pytest.mark.slow
@pytest.mark.reliability(
    f"{CLIENTS} clients for {FLOOD_SECONDS:g} s sending valid images, 16-bit images, the largest images "
    "allowed, 6300x6300 PNGs (alone and 64 per request), bomb headers, corrupt and empty files, non-image "
    "parts and too many files",
    "no crash, no 5xx but a deliberate 503 with Retry-After, every hostile request refused with its 4xx",
)
def test_flood_no_crash_no_5xx_every_hostile_request_refused(flood: dict) -> None:
    promises = flood["promises"]
    assert promises["no_crash"], _explain(flood)
    assert promises["no_5xx_but_deliberate_503"], flood["requests"]["statuses"]
    assert promises["every_hostile_request_refused_as_expected"], _explain(flood)
    assert promises["no_traceback_in_server_log"]
    assert flood["requests"]["hostile_sent"] >= 50  # the flood did reach the server
    # The mix holds each kind of hostile input the issue names, and each was sent.
    sent = {case["case"]: (case["expected_status"], case["sent"]) for case in flood["cases"]}
    for name, status in {
        "a 115 KB PNG of 6300x6300 pixels": 413,
        "64 PNGs of 6300x6300 pixels in one request (7.4 MB)": 413,
        "a request over the pixel budget": 413,
        "an empty file": 400,
        "65 files in one request": 413,
        "a part that is not an image (text/plain)": 415,
    }.items():
        assert sent[name][0] == status and sent[name][1] > 0, name
    assert sum(1 for name in sent if name.startswith("corrupt: ")) >= 5
    assert sum(1 for name in sent if name.startswith("valid 16-bit image")) == 4


@pytest.mark.slow
@pytest.mark.reliability(
    "valid requests mixed into the hostile flood",
    "every one answered 200 with the class the CLI gives for the same file",
)
def test_flood_every_valid_request_answered_as_the_cli_answers(flood: dict) -> None:
    assert flood["promises"]["every_valid_request_answered_correctly"], _explain(flood)
    assert flood["requests"]["valid_answered_correctly"] >= 20


@pytest.mark.slow
@pytest.mark.reliability(
    "memory and responsiveness while flooded",
    f"server RSS stays under {RSS_BOUND_MB:g} MB and /health answers within {HEALTH_BOUND_MS:g} ms",
)
def test_flood_memory_bounded_and_health_responsive(flood: dict) -> None:
    assert flood["promises"]["rss_under_bound"], flood["server_rss_mb"]
    assert flood["promises"]["health_within_bound"], flood["health_latency_ms"]
    assert flood["health_latency_ms"]["samples"] >= FLOOD_SECONDS  # sampled throughout, not once
