"""Bounded load benchmark of the web service, micro-batching off and on, and of the CLI's batch inference.

Starts ``python -m cifar10_pipeline.serving.serve`` on 127.0.0.1 twice (free ports), one server with
batching off (``--batching false``: one request per forward pass, the service before micro-batching), one
with it on (the default), and for single-image and batched requests at each concurrency runs closed-loop
clients for a fixed ``--duration`` after a short warm-up against each server in turn, back to back (so a
shared machine's changing load falls on both alike), recording throughput, p50/p95/p99 latency, the
forward passes the server ran (from ``/health``) and how much CPU other processes took meanwhile (the
machine may be shared). Any failed request makes the run exit 1. Then it measures the CLI path in-process:
``image_to_array`` decoding and ``predict_logits`` on CPU, in images per second. Last, one 12-megapixel
JPEG (4000x3000, a phone photo's size) through ``cifar10 predict`` (a fresh process: latency and its peak
RSS) and through the service (latency and the server's peak RSS while it handles the photo).

Writes reports/serving_benchmark.md and records/serving.json, with the issue's targets and whether they are
met. The load generator shares the CPU with the server, as on a one-box deployment; numbers are for
comparing versions on the same machine.

    python benchmarks/serving.py --model models/cifar10 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The loopback server harness is shared with the tests (tests/support/localserver.py), not shipped in the
# package.
sys.path.insert(0, str(PROJECT_ROOT))
from cifar10_pipeline.core.provenance import tree_provenance  # noqa: E402
from tests.support.localserver import model_server  # noqa: E402

TEST_SHARD = "test-00000-of-00001.parquet"
IMAGE_POOL = 256  # distinct images cycled through by the clients
MODES = {"off": "false", "on": "true"}  # --batching value of each server, in the order they run
# Issue 18's targets for the service (2-core CPU, one image per request): the throughput of 32 clients at
# least 3x what the service did before micro-batching (28.8 requests/s, records/serving.json of that
# version), with p99 <= 500 ms; one client's median at most 20 ms.
BASELINE_32_CLIENTS_RPS = 28.8
TARGETS = (
    ("32 clients, requests/s", 32, "requests_per_s", ">=", 3 * BASELINE_32_CLIENTS_RPS),
    ("32 clients, p99 latency ms", 32, "p99", "<=", 500.0),
    ("1 client, p50 latency ms", 1, "p50", "<=", 20.0),
)


# ---------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import torch

    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_flags": sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16"} & cpu_flags()),
    }


def cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


class CpuMeter:
    """CPU time the whole machine spent busy, and how much of it went to ``pids`` (ours), over a window."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.cores = os.cpu_count() or 1
        self._start = self._read()

    def _read(self) -> tuple[float, float, float]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        busy = user + nice + system + irq + softirq + steal
        ours = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ours += int(stat[11]) + int(stat[12])  # utime, stime
        return time.monotonic(), busy / self.ticks, ours / self.ticks

    def others_percent(self) -> float:
        """CPU used by other processes since construction, as a percentage of all cores."""
        now, busy, ours = self._read()
        wall = (now - self._start[0]) * self.cores
        return (
            round(100 * max(0.0, (busy - self._start[1]) - (ours - self._start[2])) / wall, 1)
            if wall
            else 0.0
        )


# ----------------------------------------------------------------------------------------------- images


def mirror_dir() -> Path | None:
    """The mirror params.yaml names (download.mirror_dir, relative to the project root), if it is there."""
    import yaml

    configured = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())["download"]["mirror_dir"]
    candidate = PROJECT_ROOT / configured if configured else None
    return candidate if candidate is not None and (candidate / TEST_SHARD).is_file() else None


def load_images(count: int) -> tuple[list[bytes], str]:
    """PNG bytes of real CIFAR-10 test images when the mirror is reachable, else of synthetic 32x32 images."""
    mirror = mirror_dir()
    if mirror is not None:
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(mirror / TEST_SHARD).iter_batches(batch_size=count, columns=["img"]))
        return [row["bytes"] for row in batch.column("img").to_pylist()], f"CIFAR-10 test images ({mirror})"
    from PIL import Image

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
        pngs.append(buffer.getvalue())
    return pngs, "synthetic 32x32 PNGs (CIFAR-10 mirror not found)"


@dataclass
class LoadResult:
    mode: str
    batching: str
    images_per_request: int
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    first_error: str | None
    latencies_ms: list[float]

    def summary(self) -> dict[str, Any]:
        latencies = np.asarray(self.latencies_ms) if self.latencies_ms else np.asarray([np.nan])
        return {
            "mode": self.mode,
            "batching": self.batching,
            "images_per_request": self.images_per_request,
            "concurrency": self.concurrency,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "errors": self.errors,
            "first_error": self.first_error,
            "requests_per_s": round(self.requests / self.duration_s, 2),
            "images_per_s": round(self.requests * self.images_per_request / self.duration_s, 1),
            "latency_ms": {
                "p50": round(float(np.percentile(latencies, 50)), 2),
                "p95": round(float(np.percentile(latencies, 95)), 2),
                "p99": round(float(np.percentile(latencies, 99)), 2),
                "mean": round(float(latencies.mean()), 2),
            },
        }


async def run_load(
    url: str,
    pngs: list[bytes],
    images_per_request: int,
    concurrency: int,
    warmup: float,
    duration: float,
    batching: str = "on",
) -> LoadResult:
    """Closed loop: each client sends its next request as soon as the previous one is answered."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    counts = {"requests": 0, "errors": 0}
    first_error: list[str] = []
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def client_loop(worker: int, http: httpx.AsyncClient) -> None:
        cursor = worker * images_per_request
        while (sent := time.perf_counter()) < stop_at:
            files = [
                ("files", (f"{(cursor + i) % len(pngs)}.png", pngs[(cursor + i) % len(pngs)], "image/png"))
                for i in range(images_per_request)
            ]
            cursor += images_per_request * concurrency
            try:
                response = await http.post(f"{url}/predict", files=files)
                ok = response.status_code == 200 and len(response.json()["predictions"]) == images_per_request
                problem = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            done = time.perf_counter()
            if problem is not None:  # an error counts whenever it happens, warm-up included
                counts["errors"] += 1
                first_error.append(problem)
            elif measure_from <= done <= stop_at:  # throughput = completions inside the window
                counts["requests"] += 1
                latencies.append(1000 * (done - sent))

    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as http:
        await asyncio.gather(*(client_loop(worker, http) for worker in range(concurrency)))
    return LoadResult(
        mode="single" if images_per_request == 1 else "batch",
        batching=batching,
        images_per_request=images_per_request,
        concurrency=concurrency,
        duration_s=duration,
        requests=counts["requests"],
        errors=counts["errors"],
        first_error=first_error[0] if first_error else None,
        latencies_ms=latencies,
    )


# -------------------------------------------------------------------------------------------------- CLI


def cli_path_throughput(model_dir: str, pngs: list[bytes], duration: float) -> dict[str, Any]:
    """Images/s of the CLI's two steps, decoding (image_to_array) and batched predict_logits on CPU."""
    from cifar10_pipeline.core.images import image_to_array
    from cifar10_pipeline.modeling.inference import predict_logits
    from cifar10_pipeline.modeling.model import load_model
    from cifar10_pipeline.serving.cli import DEFAULT_BATCH_SIZE

    model = load_model(model_dir, device="cpu")
    started = time.perf_counter()
    decoded = 0
    while decoded == 0 or time.perf_counter() - started < min(duration, 2.0):
        arrays = [image_to_array(png) for png in pngs]
        decoded += len(arrays)
    decode_rate = decoded / (time.perf_counter() - started)

    batch = np.stack(arrays)
    batch = np.concatenate([batch] * max(1, -(-DEFAULT_BATCH_SIZE * 4 // len(batch))))  # several full batches
    predict_logits(model, batch[:DEFAULT_BATCH_SIZE], batch_size=DEFAULT_BATCH_SIZE)  # warm-up
    started = time.perf_counter()
    predicted = 0
    while predicted == 0 or time.perf_counter() - started < duration:
        predict_logits(model, batch, batch_size=DEFAULT_BATCH_SIZE)
        predicted += len(batch)
    elapsed = time.perf_counter() - started
    return {
        "batch_size": DEFAULT_BATCH_SIZE,
        "tta_level": int(model.config.tta_level),
        "images": predicted,
        "seconds": round(elapsed, 3),
        "predict_images_per_s": round(predicted / elapsed, 1),
        "decode_images_per_s": round(decode_rate, 1),
    }


# ------------------------------------------------------------------------------------------ a phone photo

PHOTO_SIZE = (4000, 3000)  # 12 megapixels
PHOTO_REQUESTS = 5  # through the service; the median is reported


def phone_photo() -> bytes:
    """A 4000x3000 JPEG with a photo's texture (fine noise on smooth shading): a few MB, like a phone's, so
    decoding costs what a real photo's does (a smooth gradient would compress to almost nothing)."""
    from PIL import Image

    width, height = PHOTO_SIZE
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:height, 0:width]
    shading = np.stack([(rows * 0.05 + cols * 0.03 + 60 * c) % 256 for c in range(3)], axis=-1)
    pixels = np.clip(shading + rng.normal(0, 12, shading.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def peak_rss_mb(pid: int) -> float:
    """The peak resident set (VmHWM) of a running process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux clear_refs 5); False where that is refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# Runs the CLI as `python -m` would and records its own peak RSS (VmHWM) at exit. Not wait4's ru_maxrss:
# Linux carries the forking parent's peak across exec into the child's, so it would report the benchmark's.
CLI_WITH_PEAK_RSS = """
import atexit, os, runpy, sys
from pathlib import Path

def record() -> None:
    lines = Path("/proc/self/status").read_text().splitlines()
    peak = next(line for line in lines if line.startswith("VmHWM:"))
    Path(os.environ["PEAK_RSS_FILE"]).write_text(peak.split()[1])

atexit.register(record)
sys.argv[0] = "cifar10"
runpy.run_module("cifar10_pipeline.serving.cli", run_name="__main__")
"""


def photo_through_cli_and_service(model_dir: str, url: str | None, photo: bytes) -> dict[str, Any]:
    """One 12-megapixel JPEG: ``cifar10 predict`` in a fresh process (wall time, its peak RSS), the
    shared decoder in-process, and, given a running server's ``url``, ``POST /predict`` (median latency of
    PHOTO_REQUESTS requests, the server's peak RSS meanwhile)."""
    from cifar10_pipeline.core.images import decode_image, image_to_array

    result: dict[str, Any] = {"width": PHOTO_SIZE[0], "height": PHOTO_SIZE[1], "jpeg_bytes": len(photo)}
    result["decoded_at"] = "x".join(map(str, decode_image(photo).size))  # draft mode's reduced scale
    timings = []
    for _ in range(PHOTO_REQUESTS):
        started = time.perf_counter()
        image_to_array(photo)
        timings.append(time.perf_counter() - started)
    result["decode_ms"] = round(1000 * float(np.median(timings)), 1)

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "photo.jpg"
        path.write_bytes(photo)
        peak_file = Path(scratch) / "peak_rss_kb"
        command = [
            sys.executable,
            "-c",
            CLI_WITH_PEAK_RSS,
            "predict",
            str(path),
            "--json",
            "--model",
            model_dir,
        ]
        started = time.perf_counter()
        done = subprocess.run(
            command, capture_output=True, env={**os.environ, "PEAK_RSS_FILE": str(peak_file)}
        )
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(
                f"cifar10 predict failed on the photo: {done.stderr.decode(errors='replace')[-500:]}"
            )
        label = json.loads(done.stdout)["results"][0]["label"]
        peak_kb = int(peak_file.read_text())
    result["cli"] = {
        "label": label,
        "wall_s": round(wall, 2),  # the whole command: interpreter, torch import, model load, decode
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }
    if url is not None:
        pid = url.pid  # type: ignore[attr-defined]
        reset = reset_peak_rss(pid)
        latencies = []
        with httpx.Client(base_url=url, timeout=60) as http:
            for _ in range(PHOTO_REQUESTS):
                started = time.perf_counter()
                response = http.post("/predict", files=[("files", ("photo.jpg", photo, "image/jpeg"))])
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"the service refused the photo: {response.status_code} {response.text}"
                    )
        result["service"] = {
            "requests": PHOTO_REQUESTS,
            "p50_ms": round(1000 * float(np.median(latencies)), 1),
            "max_ms": round(1000 * max(latencies), 1),
            # Since the reset: the photo's cost. Where the reset is refused: the server's whole lifetime.
            "peak_rss_mb": peak_rss_mb(pid),
            "peak_rss_since": "photo requests" if reset else "server start",
        }
    return result


# ----------------------------------------------------------------------------------------------- report


def write_report(path: Path, result: dict[str, Any]) -> None:
    machine, settings, cli = result["machine"], result["settings"], result["cli"]
    lines = [
        "# Serving benchmark",
        "",
        f"Machine: {machine['cpu_model']} ({', '.join(machine['cpu_flags']) or 'no AVX2'}), "
        f"{machine['usable_cores']} usable of {machine['logical_cores']} logical cores, torch "
        f"{machine['torch']} ({machine['torch_threads']} threads), Python {machine['python']}.",
        f"Model: `{settings['model']}` (model.safetensors sha256 `{settings['model_sha256'][:16]}`), "
        f"TTA level {cli['tta_level']}. Images: {settings['images']}.",
        f"Each setting: {settings['warmup_s']} s warm-up, then {settings['duration_s']} s measured; "
        "closed-loop clients on the same machine as the single uvicorn worker (they share the CPU). "
        "Batching off and on are measured in the same run, one server each "
        f"(on: at most {settings['batch_max_size']} images per forward pass, held back at most "
        f"{settings['batch_max_wait_ms']} ms). 'other CPU' is what other processes on the machine took "
        "during the window, in % of all cores: above a few %, the figures are contended.",
        "",
        "## Targets (issue 18, one image per request)",
        "",
        "| target | batching off | batching on | met (on) |",
        "|---|---:|---:|---|",
    ]
    for target in result["targets"]:
        lines.append(
            f"| {target['name']} {target['comparison']} {target['target']} | {target['before']} "
            f"| {target['after']} | {'yes' if target['met'] else '**no**'} |"
        )
    lines += [
        "",
        "## HTTP API (`POST /predict`)",
        "",
        "| batching | request | clients | requests/s | images/s | p50 ms | p95 ms | p99 ms | images per "
        "forward pass | requests | errors | other CPU % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["http"]:
        latency = row["latency_ms"]
        kind = "1 image" if row["images_per_request"] == 1 else f"{row['images_per_request']} images"
        lines.append(
            f"| {row['batching']} | {kind} | {row['concurrency']} | {row['requests_per_s']} "
            f"| {row['images_per_s']} | {latency['p50']} | {latency['p95']} | {latency['p99']} "
            f"| {row['server']['images_per_forward_pass']} | {row['requests']} | {row['errors']} "
            f"| {row['other_cpu_percent']} |"
        )
    lines += [
        "",
        "## CLI path (in-process, CPU)",
        "",
        f"- `predict_logits`, batches of {cli['batch_size']}: **{cli['predict_images_per_s']} images/s** "
        f"({cli['images']} images in {cli['seconds']} s)",
        f"- `image_to_array` decoding of 32x32 PNGs, one thread: {cli['decode_images_per_s']} images/s",
        "",
    ]
    photo = result["photo"]
    lines += [
        f"## One {photo['width']}x{photo['height']} JPEG ({photo['jpeg_bytes']} bytes, a phone photo's size)",
        "",
        f"- decoded at {photo['decoded_at']} (draft mode), `image_to_array` {photo['decode_ms']} ms",
        f"- `cifar10 predict photo.jpg --json`, a fresh process (interpreter, torch import, model load "
        f"included): {photo['cli']['wall_s']} s, peak RSS {photo['cli']['peak_rss_mb']} MB",
    ]
    if "service" in photo:
        service = photo["service"]
        lines.append(
            f"- `POST /predict` with the photo, {service['requests']} requests: p50 {service['p50_ms']} ms, "
            f"max {service['max_ms']} ms; server peak RSS {service['peak_rss_mb']} MB (since "
            f"{service['peak_rss_since']})"
        )
    lines += [
        "",
        f"Errors: {result['errors']} (the benchmark fails on any). Regenerate: "
        f"`python benchmarks/serving.py --model {settings['model']} --duration {settings['duration_s']}`.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 18's service targets, from the single-image rows, before (batching off) and after (on)."""

    def value(batching: str, clients: int, key: str) -> float | None:
        for row in rows:
            if (
                row["batching"] == batching
                and row["images_per_request"] == 1
                and row["concurrency"] == clients
            ):
                return row[key] if key == "requests_per_s" else row["latency_ms"][key]
        return None

    targets = []
    for name, clients, key, comparison, target in TARGETS:
        before, after = value("off", clients, key), value("on", clients, key)
        if after is None:
            continue  # that concurrency was not run
        met = after >= target if comparison == ">=" else after <= target
        targets.append(
            {
                "name": name,
                "comparison": comparison,
                "target": round(target, 2),
                "before": before,
                "after": after,
                "met": met,
            }
        )
    return targets


def server_counters(http: httpx.Client) -> dict[str, int]:
    load = http.get("/health").json()["load"]
    return {"batches": load["batches"], "images": load["batched_images"]}


def warm_up(url: str, pngs: list[bytes], batch: int) -> bool:
    """Reach steady state (first requests pay torch's kernel setup for each new batch shape)."""
    with httpx.Client(base_url=url, timeout=60) as http:
        for size in (1, batch, 1, batch):
            files = [("files", (f"{i}.png", pngs[i % len(pngs)], "image/png")) for i in range(size)]
            response = http.post("/predict", files=files)
            if response.status_code != 200:
                print(
                    f"FAILED: warm-up request answered {response.status_code}: {response.text}",
                    file=sys.stderr,
                )
                return False
    return True


def measure_setting(
    url: str,
    batching: str,
    pngs: list[bytes],
    images_per_request: int,
    concurrency: int,
    args: argparse.Namespace,
    warmup: float,
) -> dict[str, Any]:
    """One load setting against one running server, with its forward passes and the machine's contention."""
    with httpx.Client(base_url=url, timeout=60) as http:
        before = server_counters(http)
        meter = CpuMeter([os.getpid(), url.pid])  # type: ignore[attr-defined]
        load = asyncio.run(
            run_load(url, pngs, images_per_request, concurrency, warmup, args.duration, batching)
        )
        others = meter.others_percent()
        after = server_counters(http)
    row = load.summary()
    passes = after["batches"] - before["batches"]
    row["server"] = {
        "forward_passes": passes,
        "images_per_forward_pass": round((after["images"] - before["images"]) / max(1, passes), 2),
    }
    row["other_cpu_percent"] = others
    print(
        f"  batching {batching:3} {row['mode']:6} x{images_per_request:<3} clients={concurrency:<3} "
        f"{row['requests_per_s']:8.1f} req/s {row['images_per_s']:9.1f} img/s "
        f"p50={row['latency_ms']['p50']} p99={row['latency_ms']['p99']} ms "
        f"img/pass={row['server']['images_per_forward_pass']} errors={row['errors']} other CPU={others}%",
        file=sys.stderr,
    )
    return row


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/cifar10", help="model directory (default: models/cifar10)")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per setting (default 10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=None, help="warm-up seconds per setting (default: min(2, duration/5))"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8, 32], help="clients (default: 1 8 32)"
    )
    parser.add_argument("--batch", type=int, default=16, help="images per batched request (default 16)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="batching off (before) and/or on (after), in this order (default: off on)",
    )
    parser.add_argument("--report", type=Path, default=Path("reports/serving_benchmark.md"))
    parser.add_argument("--metrics", type=Path, default=Path("records/serving.json"))
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.batch < 2 or min(args.concurrency) < 1:
        parser.error("--duration must be positive, --batch at least 2 and every --concurrency at least 1")
    weights = Path(args.model) / "model.safetensors"
    if not weights.is_file():
        parser.error(
            f"no model at {args.model} (model.safetensors missing); train one first: dvc repro train"
        )
    warmup = min(2.0, args.duration / 5) if args.warmup is None else args.warmup

    from cifar10_pipeline.serving.settings import ServeSettings

    defaults = ServeSettings()
    pngs, image_source = load_images(IMAGE_POOL)
    settings_count = 2 * len(args.concurrency) * len(args.modes)
    estimate = settings_count * (warmup + args.duration) + args.duration + 2
    print(
        f"benchmarking {args.model}: {settings_count} HTTP settings + CLI path, about {estimate:.0f} s",
        file=sys.stderr,
    )

    # One server per mode, all running at once; each setting is measured against each in turn, back to back,
    # so that a shared machine's changing load falls on both alike.
    http_rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch, contextlib.ExitStack() as servers:
        urls = {
            batching: servers.enter_context(
                model_server(
                    args.model,
                    Path(scratch) / f"server_{batching}.log",
                    timeout=180,
                    max_files=args.batch,
                    batching=MODES[batching],
                    log_level="warning",  # no access log: it would cost the server time per request
                )
            )
            for batching in args.modes
        }
        if not all(warm_up(url, pngs, args.batch) for url in urls.values()):
            return 1
        for images_per_request in (1, args.batch):
            for concurrency in args.concurrency:
                for batching, url in urls.items():
                    http_rows.append(
                        measure_setting(url, batching, pngs, images_per_request, concurrency, args, warmup)
                    )
        # After the load, on the server with the default setting (batching on) where it ran.
        photo = photo_through_cli_and_service(
            args.model, urls.get("on", next(iter(urls.values()))), phone_photo()
        )
        print(f"  photo  {json.dumps(photo)}", file=sys.stderr)
    cli = cli_path_throughput(args.model, pngs, args.duration)
    print(f"  cli    predict_logits {cli['predict_images_per_s']} img/s", file=sys.stderr)

    errors = sum(row["errors"] for row in http_rows)
    result = {
        "machine": machine_info(),
        **tree_provenance(PROJECT_ROOT).fields(),  # the commit read from the tree, never typed
        "settings": {
            "model": args.model,
            "model_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
            "images": image_source,
            "duration_s": args.duration,
            "warmup_s": warmup,
            "concurrency": args.concurrency,
            "batch": args.batch,
            "batch_max_size": defaults.batch_max_size,
            "batch_max_wait_ms": defaults.batch_max_wait_ms,
        },
        "targets": check_targets(http_rows),
        "http": http_rows,
        "cli": cli,
        "photo": photo,
        "errors": errors,
    }
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.report, result)
    for target in result["targets"]:
        print(
            f"  target {target['name']} {target['comparison']} {target['target']}: "
            f"before {target['before']}, after {target['after']} -> {'met' if target['met'] else 'NOT met'}",
            file=sys.stderr,
        )
    print(f"wrote {args.report} and {args.metrics}", file=sys.stderr)
    if errors:
        first = next(row["first_error"] for row in http_rows if row["errors"])
        print(f"FAILED: {errors} request(s) failed; first: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
