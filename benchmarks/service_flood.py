"""Flood the web service with a mix of valid and hostile uploads and check that it keeps its promises.

Starts ``python -m cifar10_pipeline.serving.serve`` on 127.0.0.1 (a free port, default limits) and runs
``--clients`` closed-loop clients for a fixed ``--duration``; each sends, in turn, requests from a fixed mix:
real CIFAR-10 test images (one or eight per request), their 16-bit copies, the largest images the limits
allow, PNGs of 6300x6300 pixels that are 115 KB on the wire (alone and 64 to a request), decompression-bomb
headers, requests over the per-request pixel budget, corrupt and truncated files, empty files, parts that
are not images, JSON bodies and too many files. Meanwhile it reads the server's resident memory from
``/proc/PID/status`` and times ``GET /health`` from a separate connection.

Promises checked, each a field of the result: the server never crashes; it answers nothing 5xx except a
deliberate 503 with Retry-After when it is saturated (counted apart); every hostile request gets the 4xx
its case expects; every valid request is answered 200 with, for each image, the class the CLI gives for the
same file (``cifar10 predict --json``, run once beforehand); its RSS stays under ``--rss-bound-mb``; and
``/health`` answers within ``--health-bound-ms`` (p99 and max).

Writes records/service_reliability.json (machine named); exits 1 if a promise is broken.

    python benchmarks/service_flood.py --model models/cifar10 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
from benchmarks.serving import CpuMeter, load_images, machine_info  # noqa: E402
from cifar10_pipeline.core.provenance import tree_provenance  # noqa: E402
from tests.support.hostile_images import (  # noqa: E402
    blank_png,
    corrupt_payloads,
    noisy_png,
    png_declaring,
    sixteen_bit_copies,
)
from tests.support.localserver import model_server  # noqa: E402

VALID_IMAGES = 32  # distinct CIFAR-10 test images cycled through by the valid requests
# The bounds the service is held to under the flood (2-core machine, default limits; docs/serving.md).
RSS_BOUND_MB = 1280.0
HEALTH_BOUND_MS = 1000.0
HEALTH_EVERY_S = 0.1
RSS_EVERY_S = 0.05


@dataclass
class Case:
    """One kind of request of the mix: its files (or raw body) and the answer it must get."""

    name: str
    status: int  # expected; 503 is always allowed as well (deliberate overload), and counted
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    expected_labels: list[str] | None = None  # for 200: the CLI's class of each file
    json_body: dict[str, Any] | None = None


@dataclass
class Tally:
    sent: int = 0
    as_expected: int = 0
    busy_503: int = 0
    wrong: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    first_wrong: str | None = None


def cli_labels(model: str, files: dict[str, bytes], scratch: Path) -> dict[str, str]:
    """The class ``cifar10 predict --json`` gives each file (written under ``scratch``)."""
    folder = scratch / "cli_inputs"
    folder.mkdir()
    paths = []
    for name, data in files.items():
        (folder / name).write_bytes(data)
        paths.append(str(folder / name))
    result = subprocess.run(
        [sys.executable, "-m", "cifar10_pipeline.serving.cli", "predict", *paths, "--model", model, "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"cifar10 predict failed ({result.returncode}):\n{result.stderr}")
    return {Path(item["path"]).name: item["label"] for item in json.loads(result.stdout)["results"]}


def build_cases(model: str, max_image_pixels: int, max_request_pixels: int, scratch: Path) -> list[Case]:
    """The request mix, with the expected answer of each; valid images' classes from the CLI."""
    pngs, _ = load_images(VALID_IMAGES)
    from PIL import Image

    # The largest square PNG the limits allow: a PNG decodes at full size, so the request's pixel budget
    # bounds it as well as the per-image limit (since JPEGs decode at reduced scale, that one is larger).
    side = int(min(max_image_pixels, max_request_pixels) ** 0.5)
    largest = blank_png(side, side)
    per_request = max(1, max_request_pixels // (side * side))
    cat = np.asarray(Image.open(io.BytesIO(pngs[3])).convert("RGB"))
    sixteen = {
        f"16bit_{i}.{'png' if 'PNG' in name else 'tif'}": data
        for i, (name, (data, _)) in enumerate(sixteen_bit_copies(cat).items())
    }
    valid = {f"cifar_{i}.png": png for i, png in enumerate(pngs)} | sixteen | {"largest.png": largest}
    labels = cli_labels(model, valid, scratch)

    def part(name: str, data: bytes, content_type: str = "image/png") -> tuple[str, tuple[str, bytes, str]]:
        return ("files", (name, data, content_type))

    huge = blank_png(6300, 6300)
    cases = [
        Case(f"valid CIFAR-10 image {i}", 200, [part(n, valid[n])], [labels[n]])
        for i, n in enumerate(f"cifar_{i}.png" for i in range(8))
    ]
    eight = [f"cifar_{i}.png" for i in range(8, 16)]
    cases += [
        Case(
            "valid request of 8 CIFAR-10 images",
            200,
            [part(n, valid[n]) for n in eight],
            [labels[n] for n in eight],
        ),
        *[
            Case(f"valid 16-bit image ({n})", 200, [part(n, data, "application/octet-stream")], [labels[n]])
            for n, data in sixteen.items()
        ],
        Case(
            f"the largest image allowed ({side}x{side})",
            200,
            [part("largest.png", largest)],
            [labels["largest.png"]],
        ),
        Case(
            f"a request at the pixel budget ({per_request} x {side}x{side})",
            200,
            [part(f"largest{i}.png", largest) for i in range(per_request)],
            [labels["largest.png"]] * per_request,
        ),
        Case(
            "a request over the pixel budget",
            413,
            [part(f"largest{i}.png", largest) for i in range(per_request + 1)],
        ),
        Case("a 115 KB PNG of 6300x6300 pixels", 413, [part("huge.png", huge)]),
        Case(
            "64 PNGs of 6300x6300 pixels in one request (7.4 MB)",
            413,
            [part(f"huge{i}.png", huge) for i in range(64)],
        ),
        Case(
            "a decompression-bomb header (100000x100000)",
            413,
            [part("bomb.png", png_declaring(100_000, 100_000))],
        ),
        Case("an empty file", 400, [part("empty.png", b"")]),
        *[
            Case(f"corrupt: {name}", 400, [part("corrupt.png", data)])
            for name, data in corrupt_payloads(noisy_png(64, 64)).items()
        ],
        Case("a part that is not an image (text/plain)", 415, [part("notes.txt", b"hello", "text/plain")]),
        Case("a JSON body instead of an upload", 415, json_body={"files": ["cat.png"]}),
        Case("65 files in one request", 413, [part(f"{i}.png", pngs[i % len(pngs)]) for i in range(65)]),
    ]
    return cases


async def _client(
    http: httpx.AsyncClient,
    cases: list[Case],
    offset: int,
    stop_at: float,
    tallies: dict[str, Tally],
    failures: list[str],
) -> None:
    index = offset
    while time.monotonic() < stop_at:
        case = cases[index % len(cases)]
        index += 1
        tally = tallies[case.name]
        tally.sent += 1
        try:
            if case.json_body is not None:
                response = await http.post("/predict", json=case.json_body)
            else:
                response = await http.post("/predict", files=case.files)
        except httpx.HTTPError as exc:
            failures.append(f"{case.name}: {type(exc).__name__}: {exc}")
            tally.wrong += 1
            continue
        tally.statuses[response.status_code] += 1
        problem = None
        if response.status_code == 503 and "retry-after" in response.headers:
            tally.busy_503 += 1
            continue
        if response.status_code != case.status:
            problem = f"answered {response.status_code}, expected {case.status}: {response.text[:300]}"
        elif case.status == 200:
            got = [p["label"] for p in response.json()["predictions"]]
            if got != case.expected_labels:
                problem = f"classes {got}, the CLI gives {case.expected_labels}"
        else:
            detail = response.json().get("detail", "")
            if " object at 0x" in detail:
                problem = f"message holds a Python object repr: {detail}"
        if problem is None:
            tally.as_expected += 1
        else:
            tally.wrong += 1
            tally.first_wrong = tally.first_wrong or problem


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def _watch(
    url: str, pid: int, stop_at: float, health_ms: list[float], health_fail: list[str], rss: list[float]
) -> None:
    async def health() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = await http.get("/health")
                    if response.status_code != 200:
                        health_fail.append(f"/health answered {response.status_code}")
                except httpx.HTTPError as exc:
                    health_fail.append(f"/health: {type(exc).__name__}: {exc}")
                health_ms.append(1000 * (time.perf_counter() - started))
                await asyncio.sleep(HEALTH_EVERY_S)

    async def memory() -> None:
        while time.monotonic() < stop_at:
            value = rss_mb(pid)
            if value is not None:
                rss.append(value)
            await asyncio.sleep(RSS_EVERY_S)

    await asyncio.gather(health(), memory())


async def flood(url: str, pid: int, cases: list[Case], clients: int, duration: float) -> dict[str, Any]:
    tallies = {case.name: Tally() for case in cases}
    failures: list[str] = []
    health_ms: list[float] = []
    health_fail: list[str] = []
    rss: list[float] = []
    stop_at = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0)) as http:
        await asyncio.gather(
            _watch(url, pid, stop_at, health_ms, health_fail, rss),
            # Clients start spread over the mix, so every case is sent from the first seconds on.
            *(
                _client(http, cases, client * len(cases) // clients, stop_at, tallies, failures)
                for client in range(clients)
            ),
        )
    return {
        "tallies": tallies,
        "failures": failures,
        "health_ms": health_ms,
        "health_fail": health_fail,
        "rss": rss,
    }


def run_flood(
    model: str,
    duration: float,
    clients: int,
    scratch: Path,
    rss_bound_mb: float = RSS_BOUND_MB,
    health_bound_ms: float = HEALTH_BOUND_MS,
    **settings: object,
) -> dict[str, Any]:
    """Start a server for ``model`` (extra CIFAR10_SERVE_* ``settings``), flood it, return the result."""
    from cifar10_pipeline.serving.settings import ServeSettings

    configured = ServeSettings(**{k: v for k, v in settings.items() if k in ServeSettings.model_fields})
    cases = build_cases(model, configured.max_image_pixels, configured.max_request_pixels, scratch)
    with model_server(model, scratch / "server.log", timeout=180, log_level="warning", **settings) as url:
        pid = url.pid
        with httpx.Client(base_url=url, timeout=60) as http:
            for case in cases[:2]:  # warm: the first forward passes pay torch's one-off setup
                http.post("/predict", files=case.files)
            health = http.get("/health").json()
        idle_rss = rss_mb(pid) or 0.0
        meter = CpuMeter([pid])
        started = time.monotonic()
        observed = asyncio.run(flood(url, pid, cases, clients, duration))
        elapsed = time.monotonic() - started
        others = meter.others_percent()
        alive = rss_mb(pid) is not None
        with httpx.Client(base_url=url, timeout=60) as http:
            after = http.get("/health")
            healthy_after = after.status_code == 200
            load_after = after.json().get("load", {}) if healthy_after else {}
        server_log = (scratch / "server.log").read_text(errors="replace")

    tallies: dict[str, Tally] = observed["tallies"]
    latencies = np.asarray(observed["health_ms"] or [np.nan])
    rss = np.asarray(observed["rss"] or [np.nan])
    valid = [c for c in cases if c.status == 200]
    statuses: Counter[int] = Counter()
    for tally in tallies.values():
        statuses.update(tally.statuses)
    unexpected_5xx = sum(n for status, n in statuses.items() if status >= 500 and status != 503)
    busy = sum(t.busy_503 for t in tallies.values())
    result = {
        "machine": machine_info(),
        **tree_provenance(PROJECT_ROOT).fields(),  # the commit read from the tree, never typed
        "settings": {
            "model": model,
            "duration_s": duration,
            "measured_s": round(elapsed, 2),
            "clients": clients,
            "limits": health["limits"],
            "batching": health.get("batching"),
            "rss_bound_mb": rss_bound_mb,
            "health_bound_ms": health_bound_ms,
            "other_cpu_percent": others,
        },
        "requests": {
            "sent": sum(t.sent for t in tallies.values()),
            "valid_sent": sum(tallies[c.name].sent for c in valid),
            "valid_answered_correctly": sum(tallies[c.name].as_expected for c in valid),
            "hostile_sent": sum(tallies[c.name].sent for c in cases if c.status != 200),
            "hostile_refused_as_expected": sum(tallies[c.name].as_expected for c in cases if c.status != 200),
            "busy_503": busy,
            "wrong": sum(t.wrong for t in tallies.values()),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
        },
        "cases": [
            {
                "case": case.name,
                "expected_status": case.status,
                "sent": tallies[case.name].sent,
                "as_expected": tallies[case.name].as_expected,
                "busy_503": tallies[case.name].busy_503,
                "wrong": tallies[case.name].wrong,
                "first_wrong": tallies[case.name].first_wrong,
            }
            for case in cases
        ],
        "server_rss_mb": {
            "idle": round(idle_rss, 1),
            "max": round(float(np.nanmax(rss)), 1),
            "samples": int(np.isfinite(rss).sum()),
        },
        "health_latency_ms": {
            "p50": round(float(np.nanpercentile(latencies, 50)), 2),
            "p99": round(float(np.nanpercentile(latencies, 99)), 2),
            "max": round(float(np.nanmax(latencies)), 2),
            "samples": int(np.isfinite(latencies).sum()),
            "failures": len(observed["health_fail"]),
        },
        "server_load_after": load_after,
        "transport_failures": observed["failures"][:10],
    }
    requests = result["requests"]
    result["promises"] = {
        "no_crash": alive and healthy_after and not observed["failures"],
        "no_5xx_but_deliberate_503": unexpected_5xx == 0,
        "every_hostile_request_refused_as_expected": requests["hostile_refused_as_expected"]
        + sum(tallies[c.name].busy_503 for c in cases if c.status != 200)
        == requests["hostile_sent"],
        "every_valid_request_answered_correctly": requests["valid_answered_correctly"]
        + sum(tallies[c.name].busy_503 for c in valid)
        == requests["valid_sent"]
        and requests["valid_answered_correctly"] > 0,
        "rss_under_bound": bool(np.nanmax(rss) <= rss_bound_mb),
        "health_within_bound": bool(np.nanmax(latencies) <= health_bound_ms) and not observed["health_fail"],
        "no_traceback_in_server_log": "Traceback" not in server_log,
    }
    result["promises_kept"] = all(result["promises"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/cifar10", help="model directory (default: models/cifar10)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of flood (default 20)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--rss-bound-mb", type=float, default=RSS_BOUND_MB)
    parser.add_argument("--health-bound-ms", type=float, default=HEALTH_BOUND_MS)
    parser.add_argument("--metrics", type=Path, default=Path("records/service_reliability.json"))
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.clients < 1:
        parser.error("--duration must be positive and --clients at least 1")
    if not (Path(args.model) / "model.safetensors").is_file():
        parser.error(
            f"no model at {args.model} (model.safetensors missing); train one first: dvc repro train"
        )
    print(
        f"flooding a server of {args.model} with {args.clients} clients for {args.duration:g} s",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as scratch:
        result = run_flood(
            args.model, args.duration, args.clients, Path(scratch), args.rss_bound_mb, args.health_bound_ms
        )
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(result, indent=2) + "\n")
    requests, rss, health = result["requests"], result["server_rss_mb"], result["health_latency_ms"]
    print(
        f"  {requests['sent']} requests ({requests['valid_sent']} valid, "
        f"{requests['hostile_sent']} hostile), "
        f"statuses {requests['statuses']}, busy 503: {requests['busy_503']}, wrong: {requests['wrong']}\n"
        f"  server RSS idle {rss['idle']} MB, max {rss['max']} MB (bound {args.rss_bound_mb:g}); "
        f"/health p50 {health['p50']} ms, p99 {health['p99']} ms, max {health['max']} ms "
        f"(bound {args.health_bound_ms:g})",
        file=sys.stderr,
    )
    broken = [name for name, kept in result["promises"].items() if not kept]
    print(f"wrote {args.metrics}; promises broken: {', '.join(broken) or 'none'}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
