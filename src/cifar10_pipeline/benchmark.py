"""Training benchmark: the train stage's own code, several seeds, timed the way speed-run records are.

    python -m cifar10_pipeline.benchmark --profile default --seeds 3
    python -m cifar10_pipeline.benchmark --profile gpu_fast --seeds 5 --key gpu_fast
    python -m cifar10_pipeline.benchmark --vit-throughput      # ViT-B/16 at 224 px, random weights

Timed per seed (device-synchronised): the training loop plus the final test-set evaluation with the model's
test-time augmentation; one-off warm-up (kernel selection, compilation) is timed separately. Results merge
into ``metrics/benchmark.json`` under the profile's name (or ``--key``) and render to
``reports/benchmark.md``. Not a DVC stage: run it when you want the figures, on the machine they describe.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch
import yaml

from cifar10_pipeline.data import atomic_output, load_processed
from cifar10_pipeline.params import Params, resolve
from cifar10_pipeline.paths import DATA_SOURCE, PARAMS_FILE, PROCESSED_DIR, STAGE_EMISSIONS_DIR
from cifar10_pipeline.stages.train import build_model
from cifar10_pipeline.training import (
    describe_device,
    evaluate_normalised,
    resolve_device,
    synchronize,
    train_classifier,
)

BENCHMARK_METRICS = Path("metrics/benchmark.json")
BENCHMARK_REPORT = Path("reports/benchmark.md")


def load_profile(profile: str, overrides: list[str], params_file: Path = PARAMS_FILE) -> Params:
    raw = yaml.safe_load(Path(params_file).read_text())
    raw["profile"] = profile
    for item in overrides:  # same syntax as dvc exp run -S section.key=value
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        raw[section][name] = yaml.safe_load(value)
        raw["profiles"].get(profile, {}).get(section, {}).pop(name, None)
    return resolve(raw, source=f"{params_file} (profile {profile})")


def run_seed(params: Params, splits: dict, seed: int, device: torch.device) -> dict:
    hp = params.train.model_copy(update={"seed": seed})
    model = build_model(hp)
    synchronize(device)
    start = time.perf_counter()
    result = train_classifier(model, splits["train"], None, hp, device, progress=False)
    # Final evaluation with test-time augmentation counts as training time, as in the published records.
    test = splits["test"]
    from cifar10_pipeline.inference import normalize

    x_test = normalize(
        torch.as_tensor(test.images).to(device), model.config.image_mean, model.config.image_std
    )
    y_test = torch.as_tensor(test.labels).to(device)
    _, accuracy = evaluate_normalised(model, x_test, y_test, hp.precision, tta_level=model.config.tta_level)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seed": seed, "accuracy": accuracy, "seconds": seconds, "loop_seconds": result.train_seconds}


def _data_source() -> str:
    if not DATA_SOURCE.is_file():
        return "unknown (metrics/data_source.json missing)"
    source = json.loads(DATA_SOURCE.read_text())
    suffix = " (JPEG-derived mirror)" if source["source"] == "mirror" else ""
    return f"{source['source']}: {source['location']}{suffix}"


def warm_up(params: Params, splits: dict, device: torch.device) -> float:
    """A short run that pays the one-off costs (cuDNN autotuning, torch.compile) before timing starts."""
    hp = params.train.model_copy(update={"epochs": min(params.train.epochs, 0.3)})
    start = time.perf_counter()
    train_classifier(build_model(hp), splits["train"], None, hp, device, progress=False)
    synchronize(device)
    return time.perf_counter() - start


def benchmark_training(
    params: Params,
    seeds: int,
    processed_dir: Path = PROCESSED_DIR,
    on_seed: Callable[[dict], None] | None = None,
) -> dict:
    """Time ``seeds`` runs; ``on_seed`` gets the summary so far after each (long runs lose nothing)."""
    device = resolve_device(params.train.device)
    splits = load_processed(processed_dir)
    warmup_seconds = warm_up(params, splits, device) if device.type == "cuda" or params.train.compile else 0.0
    facts = model_facts(params)
    runs = []
    stage_wall = None
    for seed in range(seeds):
        runs.append(run_seed(params, splits, seed, device))
        if stage_wall is None:
            stage_wall = time.time() - psutil.Process().create_time()
        run = runs[-1]
        print(
            f"seed {seed}: accuracy {run['accuracy']:.4f} in {run['seconds']:.2f} s "
            f"({run['loop_seconds']:.2f} s in the epochs' loop)",
            flush=True,
        )
        entry = summarize(params, runs, device, splits, warmup_seconds, stage_wall) | facts
        if on_seed is not None:
            on_seed(entry)
    return entry


def summarize(
    params: Params,
    runs: list[dict],
    device: torch.device,
    splits: dict,
    warmup_seconds: float,
    stage_wall: float,
) -> dict:
    accuracies = [r["accuracy"] for r in runs]
    seconds = [round(r["seconds"], 3) for r in runs]
    hp = params.train
    entry = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "seeds": len(runs),
        "model": hp.model,
        "epochs": hp.epochs,
        "batch_size": hp.batch_size,
        "widths": hp.widths,
        "compile": hp.compile,
        "cuda_graphs": hp.cuda_graphs,
        "augmentation": {"flip": hp.flip, "translate": hp.translate, "cutout": hp.cutout},
        "train_images": len(splits["train"]),
        "test_images": len(splits["test"]),
        "accuracy_mean": statistics.fmean(accuracies),
        "accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "accuracies": accuracies,
        "train_seconds": seconds,
        "train_seconds_median": statistics.median(seconds),
        # The epochs alone (augmentation and steps): the rest of train_seconds is moving the data to the
        # device, whitening, recording the CUDA graph and the final evaluation.
        "loop_seconds": [round(r["loop_seconds"], 3) for r in runs],
        "warmup_seconds": round(warmup_seconds, 2),
        "stage_wall_seconds": round(stage_wall or 0.0, 2),
        "tta_level": hp.tta_level,
        "data": _data_source(),
    }
    return entry


def model_facts(params: Params) -> dict:
    """Size and compute split of the from-scratch ViT (nothing extra for the other models)."""
    hp = params.train
    if hp.model != "cifar_vit":
        return {}
    from cifar10_pipeline.vit import flops_split

    model = build_model(hp)
    return {
        "vit": {"dim": hp.vit_dim, "depth": hp.vit_depth, "heads": hp.vit_heads},
        "forward_macs_per_image": flops_split(model.config),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def vit_throughput(batch_size: int = 128, steps: int = 20) -> dict:
    """Training and inference images/s and peak memory of ViT-B/16 at 224 px with random weights."""
    from transformers import ViTConfig, ViTForImageClassification

    device = resolve_device("auto")
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_labels=10)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def train_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(pixel_values=x, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def timed(fn, n: int) -> float:
        for _ in range(3):
            fn()
        synchronize(device)
        start = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_time = timed(train_step, steps)
    train_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.eval()

    @torch.no_grad()
    def infer_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            model(pixel_values=x)

    infer_time = timed(infer_step, steps)
    return {
        "device": describe_device(device),
        "torch": torch.__version__,
        "model": "ViT-B/16 (architecture of google/vit-base-patch16-224-in21k, random weights), 224 px, bf16",
        "parameters": sum(p.numel() for p in model.parameters()),
        "batch_size": batch_size,
        "train_images_per_second": round(batch_size * steps / train_time, 1),
        "inference_images_per_second": round(batch_size * steps / infer_time, 1),
        "train_peak_memory_gib": round(train_peak, 2) if train_peak is not None else None,
    }


def render_report(results: dict) -> str:
    lines = [
        "# Training benchmark",
        "",
        "Written by `python -m cifar10_pipeline.benchmark`. Accuracy is on the CIFAR-10 test split of the",
        "local mirror, which is JPEG-derived: published recipes score about 3 points lower on it than on the",
        "original. Training time is device-synchronised: training loop plus the final test evaluation with",
        "test-time augmentation, one-off warm-up excluded (reported apart). Stage wall time runs from",
        "process start to the end of the first seed (imports, data loading and warm-up included), or, where",
        "a note says so, from the start of a fresh train-stage process to the model saved.",
        "",
        "| run | model | device | train images | epochs | compile | CUDA graphs | seeds "
        "| accuracy (mean ± std) | training time median (s) | warm-up (s) | stage wall (s) | energy (Wh) |",
        "|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for key, r in results.items():
        if key == "vit_b16_throughput":
            continue
        energy = f"{1000 * r['emissions']['energy_kwh']:.2f}" if "emissions" in r else "not measured"
        graphs = {True: "whole step", False: "no"}.get(r.get("cuda_graphs"), "-")
        if r.get("compile") == "reduce-overhead":
            graphs = "model only (reduce-overhead)"
        lines.append(
            f"| {key} | {r.get('model', 'cifar_convnet')} | {r['device']} | {r['train_images']:,} | "
            f"{r['epochs']} | {r.get('compile') or 'no'} | {graphs} | {r['seeds']} | "
            f"{100 * r['accuracy_mean']:.2f}% ± {100 * r['accuracy_std']:.2f} | "
            f"{r['train_seconds_median']:.2f} | "
            f"{r['warmup_seconds']:.1f} | {r['stage_wall_seconds']:.1f} | {energy} |"
        )
        if "note" in r:
            notes.append(f"- **{key}**: {r['note']}")
        if "forward_macs_per_image" in r:
            macs = r["forward_macs_per_image"]
            notes.append(
                f"- **{key}**: {r['parameters']:,} parameters; forward pass {macs['total'] / 1e6:.0f} M "
                f"multiply-accumulates per image, {100 * macs['transformer'] / macs['total']:.0f}% of them "
                f"in the transformer encoder, {100 * macs['tokenizer'] / macs['total']:.0f}% in the "
                "convolutional tokenizer."
            )
    if notes:
        lines += ["", *notes]
    vit = results.get("vit_b16_throughput")
    if vit:
        lines += [
            "",
            "## What a ViT-B/16 fine-tune costs",
            "",
            f"{vit['model']}, batch {vit['batch_size']}, on {vit['device']} (torch {vit['torch']}):",
            "",
            "| training images/s | inference images/s | peak training memory (GiB) | parameters |",
            "|---:|---:|---:|---:|",
            f"| {vit['train_images_per_second']:.0f} | {vit['inference_images_per_second']:.0f} | "
            f"{vit['train_peak_memory_gib']} | {vit['parameters']:,} |",
            "",
            "One epoch of CIFAR-10 (50,000 images) at that rate takes "
            f"{50_000 / vit['train_images_per_second']:.0f} s of training.",
        ]
    return "\n".join(lines) + "\n"


def save(
    key: str, entry: dict, metrics_file: Path = BENCHMARK_METRICS, report_file: Path = BENCHMARK_REPORT
) -> None:
    results = json.loads(Path(metrics_file).read_text()) if Path(metrics_file).is_file() else {}
    results = copy.deepcopy(results)
    results[key] = entry
    with atomic_output(Path(metrics_file)) as staged:
        staged.write_text(json.dumps(results, indent=2) + "\n")
    with atomic_output(Path(report_file)) as staged:
        staged.write_text(render_report(results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="default", help="profile from params.yaml (default: default)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--key", help="name of the entry in metrics/benchmark.json (default: the profile)")
    parser.add_argument("-S", "--set", action="append", default=[], help="override, e.g. -S train.epochs=12")
    parser.add_argument("--processed-dir", type=Path, default=PROCESSED_DIR)
    parser.add_argument("--vit-throughput", action="store_true", help="measure ViT-B/16 at 224 px instead")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    params = load_profile(args.profile, args.set)
    key = "vit_b16_throughput" if args.vit_throughput else args.key or args.profile
    emissions_file = STAGE_EMISSIONS_DIR / f"benchmark_{key}.json"
    with _measured(params.emissions.country_iso_code, emissions_file):
        if args.vit_throughput:
            entry = vit_throughput()
        else:
            entry = benchmark_training(
                params, args.seeds, args.processed_dir, on_seed=lambda partial: save(key, partial)
            )
    if emissions_file.is_file():
        record = json.loads(emissions_file.read_text())
        entry["emissions"] = {
            k: record[k] for k in ("emissions_kg", "energy_kwh", "duration_s", "country_iso_code")
        }
    save(key, entry)
    print(json.dumps(entry, indent=2))


def _measured(country_iso_code: str, out_file: Path) -> contextlib.AbstractContextManager:
    """codecarbon around the benchmark where it is installed (a bare GPU image may lack it)."""
    try:
        import codecarbon  # noqa: F401
    except ImportError:
        print("codecarbon is not installed: benchmark emissions not measured")
        return contextlib.nullcontext()
    from cifar10_pipeline.emissions import measure

    return measure("benchmark", country_iso_code, out_file)


if __name__ == "__main__":
    main()
