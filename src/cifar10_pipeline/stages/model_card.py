"""Stage 7, model_card: write ``reports/model_card.md`` from measured facts only.

Sections follow the Hugging Face model-card template. Every number comes from params, ``metrics/`` or the
saved model's ``config.json``, and every sentence that holds only for some profiles or devices is chosen by
those facts (``data_use``, ``calibration``, ``precision_row``). The card reads nothing DVC does not track: the
registry's version numbers and alias depend on the MLflow store's history, so the card only says where to
find them. Where the pipeline cannot know a fact, the card says so instead of "More information needed".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from cifar10_pipeline.core.data import atomic_output
from cifar10_pipeline.core.params import Params, TrainParams, load_params
from cifar10_pipeline.core.paths import (
    BENCHMARK_METRICS,
    DATA_SOURCE,
    EMISSIONS_METRICS,
    EVAL_METRICS,
    MODEL_CARD,
    MODEL_DIR,
    TRAIN_METRICS,
    VALIDATION_METRICS,
)
from cifar10_pipeline.tracking.runs import stage_run

PARENT_MODEL = "google/vit-base-patch16-224-in21k"
# What FrozenScaleBatchNorm normalised in training, by the train stage's record (model.batchnorm_precision).
BATCHNORM_WORDING = {
    "bf16": "batch norm on the bf16 activations (fp32 parameters and statistics)",
    "fp32 copy": "batch norm on fp32 copies of the activations",
    "fp32": "batch norm in fp32",
}


def _load(path: Path) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is missing: run the pipeline up to here first (dvc repro)")
    return json.loads(Path(path).read_text())


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _data_note(source: dict) -> str:
    if source["source"] == "mirror":
        return (
            f"the local mirror `{source['location']}` (Parquet in the `uoft-cs/cifar10` schema). **That mirror "
            "is JPEG-derived** (see its README): its pixels differ from the original CIFAR-10, so its "
            "accuracies are not directly comparable with published CIFAR-10 figures; all figures in this "
            "card are measured on the mirror"
        )
    if source["source"] == "hub":
        return f"the Hugging Face Hub dataset `{source['location']}` (the original pixels)"
    return f"the original archive `{source['location']}` (md5 `{source.get('md5')}`)"


def _optimiser_rows(hp: TrainParams) -> str:
    """Hyper-parameter table rows for the optimiser the model was trained with (see training.make_optimizers)."""
    warmup = f"warm-up over {hp.warmup_fraction:.0%} of the steps" if hp.warmup_fraction else "no warm-up"
    schedule = f"{warmup}, linear decay to {hp.final_lr_fraction}"
    if hp.model == "cifar_convnet":
        scales = f"norm biases x{hp.bias_lr_scale}, head x{hp.head_lr_scale}"
        rows = (
            f"| optimiser | Nesterov SGD, momentum {hp.momentum} |\n"
            f"| learning rate | {hp.lr} per 1024 examples ({scales}); {schedule} |\n"
            f"| weight decay | {hp.weight_decay} per 1024 examples |\n"
            f"| lookahead | {hp.lookahead} |"
        )
        if hp.filter_optimizer == "muon":
            muon = (
                f"Muon (orthogonalised Nesterov momentum {hp.muon_momentum}, filters renormalised each "
                f"step), learning rate {hp.muon_lr}; same schedule; SGD for biases and head"
            )
            rows += f"\n| conv filters | {muon} |"
        return rows
    return (
        "| optimiser | AdamW |\n"
        f"| learning rate | {hp.adamw_lr}; {schedule} |\n"
        f"| weight decay | {hp.adamw_weight_decay} (not on biases, norms, position embeddings) |"
    )


def selections_in_effect(params: Params, benchmark: dict[str, Any]) -> list[dict[str, Any]]:
    """``benchmark select`` records in metrics/benchmark.json for the active profile whose chosen values are
    the ones in effect: only those say how these knobs were chosen."""
    # The sections this stage declares as params in dvc.yaml; a knob elsewhere is never "in effect" here.
    effective = {
        "preprocess": params.preprocess.model_dump(),
        "train": params.train.model_dump(),
        "evaluate": params.evaluate.model_dump(),
    }

    def in_effect(chosen: dict[str, Any]) -> bool:
        unset = object()
        return bool(chosen) and all(
            effective.get(section, {}).get(name, unset) == value
            for (section, _, name), value in ((key.partition("."), v) for key, v in chosen.items())
        )

    return [
        entry
        for entry in benchmark.values()
        if isinstance(entry, dict)
        and entry.get("kind") == "selection"
        and entry.get("profile") == params.profile
        and in_effect(entry.get("chosen") or {})
    ]


class DataUse(NamedTuple):
    training: str  # "Training data": what trained the final model and what validated it
    testing: str  # "Testing data": how knobs were chosen, what the model trained on, what the test set did


def data_use(params: Params, train: dict, validation: dict, selections: list[dict]) -> DataUse:
    """The sentences on which data did what, for every case in one place."""
    pre, n = params.preprocess, train["train_images"]
    if selections:
        knobs = ", ".join(f"`{key}`" for entry in selections for key in entry["chosen"])
        holdout = " / ".join(sorted({f"{entry['val_images']:,}" for entry in selections}))
        knobs_sentence = (
            f"knobs ({knobs}) chosen on a {holdout}-image stratified hold-out of the training split "
            "(`benchmark select`, `metrics/benchmark.json`)"
        )
    else:
        knobs_sentence = "how the knob values in `params.yaml` were chosen is not recorded in `metrics/`"
        if not pre.val_size:
            knobs_sentence += ", so the test figures may have informed them"
    test_sentence = (
        f"test set never read by the train stage, scored once per reported seed (this model: seed "
        f"{params.train.seed}, by the evaluate stage)"
    )
    if pre.val_size:
        pool = (
            "the training split"
            if pre.max_train_images is None
            else "a stratified subset of the training split"
        )
        training = (
            f"{n:,} images of {pool} trained the final model; a stratified hold-out of {pre.val_size:,} "
            f"others (seed {pre.seed}) was scored after every epoch (`metrics/train_history.csv`)."
        )
        final = f"final model trained on {n:,} images and validated on a {pre.val_size:,}-image hold-out"
    elif n == validation["train"]["images"]:
        training = f"The final model trained on all {n:,} training images; there is no validation split."
        final = f"final model trained on all {n:,} training images"
    else:
        training = (
            f"The final model trained on a stratified subset of {n:,} training images; there is no "
            "validation split."
        )
        final = f"final model trained on a stratified subset of {n:,} training images"
    testing = f"{knobs_sentence[0].upper()}{knobs_sentence[1:]}; {final}; {test_sentence}."
    return DataUse(training, testing)


class Calibration(NamedTuple):
    sentence: str  # in "Bias, risks and limitations"
    rows: str  # results-table rows


def calibration(train: dict, ev: dict, val_size: int) -> Calibration:
    """What temperature scaling did, from the train stage's record (None: nothing fitted, no split)."""
    fitted = train["temperature"]
    if fitted is None:
        if val_size or ev["temperature"] != 1.0:
            raise ValueError(
                f"{TRAIN_METRICS} records no temperature but val_size is {val_size} and {EVAL_METRICS} used "
                f"{ev['temperature']}: the metrics are stale, re-run the pipeline (dvc repro)"
            )
        return Calibration(
            "No temperature scaling (no validation split): the probabilities are the network's own softmax "
            f"(test ECE {ev['ece']:.4f}).",
            f"| expected calibration error | {ev['ece']:.4f} |\n"
            "| softmax temperature | none (no temperature scaling: no validation split) |",
        )
    if not val_size or ev["temperature"] != fitted:
        raise ValueError(
            f"{TRAIN_METRICS} records temperature {fitted} but val_size is {val_size} and {EVAL_METRICS} "
            f"used {ev['temperature']}: the metrics are stale, re-run the pipeline (dvc repro)"
        )
    confidence = "under" if fitted < 1 else "over" if fitted > 1 else "neither under- nor over"
    return Calibration(
        f"The raw network is {confidence}-confident on the validation split: a softmax temperature of "
        f"{fitted:.3f}, fitted on those {val_size:,} images after training and stored in `config.json`, "
        f"takes the test ECE from {ev['ece_before_temperature']:.4f} to {ev['ece']:.4f}. Every consumer "
        "(evaluation, CLI, web service) applies it.",
        f"| expected calibration error | {ev['ece']:.4f} (before temperature scaling: "
        f"{ev['ece_before_temperature']:.4f}) |\n"
        f"| softmax temperature (fitted on the validation split) | {fitted:.3f} |",
    )


def precision_row(precision: str, batchnorm: str | None) -> str:
    """Autocast precision from params, batch norm's from the train stage's record (None: no such layer)."""
    autocast = "bf16 autocast" if precision == "bf16" else "fp32 (no autocast)"
    return f"{autocast}; {BATCHNORM_WORDING[batchnorm]}" if batchnorm else autocast


def render(params: Params, facts: dict) -> str:
    train, ev, em, val = facts["train"], facts["eval"], facts["emissions"], facts["validation"]
    source, config = facts["source"], facts["config"]
    hp, registered = params.train, params.mlflow.registered_model
    builtin = hp.is_builtin_model
    use = data_use(params, train, val, selections_in_effect(params, facts["benchmark"]))
    calib = calibration(train, ev, params.preprocess.val_size)
    classes = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    per_class_rows = "\n".join(
        f"| {name} | {pct(s['precision'])} | {pct(s['recall'])} | {pct(s['f1'])} | {s['support']} |"
        for name, s in ev["per_class"].items()
    )
    gap = ev["class_gap"]
    robust = ev["robustness"]
    severities = sorted(next(iter(robust["accuracy"].values())), key=int)
    robust_rows = "\n".join(
        f"| {name} | " + " | ".join(pct(row[s]) for s in severities) + " |"
        for name, row in robust["accuracy"].items()
    )
    stage_rows = "\n".join(
        f"| {name} | {s['duration_s']:.0f} | {s['energy_kwh'] * 1000:.2f} | {s['emissions_kg'] * 1000:.2f} |"
        for name, s in em["stages"].items()
    )
    hw = em["hardware"]
    country = params.emissions.country_iso_code
    if em["country_iso_code"] != country:
        raise ValueError(
            f"{EMISSIONS_METRICS} was measured for {em['country_iso_code']}, params say {country}: the metrics "
            "are stale, re-run the pipeline (dvc repro)"
        )
    validation_line = f"{val['evaluated']} expectations evaluated, {val['failed']} failed"
    extra = config.get("extra_convs", 0)
    residual = f"plus {extra} residual conv layer(s) per group" if extra else "no residual connections"
    confusions = ", ".join(
        f"{c['true']} taken for {c['predicted']} ({c['count']})" for c in ev["most_confused"]
    )
    top = severities[-1]
    worst = sorted(robust["accuracy"], key=lambda name: robust["accuracy"][name][top])[:2]
    if hp.model == "cifar_convnet":
        model_type = (
            "convolutional network for 32x32 images trained from scratch (`cifar_convnet`: a frozen "
            f"patch-whitening layer, three conv groups of widths {config['widths']}, batch norm, GELU, "
            f"{residual}, global max-pool, linear head)"
        )
    elif hp.model == "cifar_vit":
        grid = (config["image_size"] - config["whiten_kernel_size"] + 1) // 4  # as in vit.py
        model_type = (
            "vision transformer for 32x32 images trained from scratch (`cifar_vit`: a convolutional "
            f"tokenizer of two conv groups, widths {config['tokenizer_widths']}, makes a {grid}x{grid} grid "
            f"of tokens; {config['num_hidden_layers']} pre-norm encoder layers of width "
            f"{config['hidden_size']} with {config['num_attention_heads']} heads; mean-pooled tokens, "
            "linear head)"
        )
    else:
        model_type = f"`{config.get('model_type')}` image classifier fine-tuned from `{hp.model}`"
    augmentation = (
        f"random translation by up to {hp.translate} px (reflect padding)"
        if hp.translate
        else "no translation"
    )
    if hp.flip:
        augmentation += ", horizontal flips (each image flipped on every other epoch)"
    if hp.cutout:
        augmentation += f", a {hp.cutout}x{hp.cutout} cutout square per image"
    if builtin:
        parent = (
            f"none: this run trains the built-in `{hp.model}` from scratch (`train.model`). The Hugging "
            f"Face template this card follows names `{PARENT_MODEL}`; set `train.model` to that Hub id "
            "(or a local copy) to fine-tune it instead."
        )
    else:
        parent = f"`{hp.model}`"
    test_split = (
        "The CIFAR-10 test split"
        if params.preprocess.max_test_images is None
        else "A stratified subset of the CIFAR-10 test split"
    )
    return f"""---
license: apache-2.0
library_name: transformers
pipeline_tag: image-classification
datasets:
  - uoft-cs/cifar10
metrics:
  - accuracy
  - f1
---

# CIFAR-10 classifier (`{registered}`)

Generated by the `model_card` stage of `dvc repro` from `params.yaml`, `metrics/` and the saved model's
`config.json`; do not edit by hand. Figures were measured on {_data_note(source)}.

## Model details

- **Model type:** {model_type}.
- **Classes ({len(classes)}):** {", ".join(classes)} (`id2label` in `config.json`).
- **Parent model:** {parent}
- **Parameters:** {train["parameters"]:,}; checkpoint {train["checkpoint_bytes"] / 1e6:.1f} MB (safetensors).
- **Registry:** the evaluate stage registers the model in MLflow as `{registered}` and moves the alias
  `champion` to it only if it beats the champion's accuracy on the same test set. Version numbers and the
  alias depend on the MLflow store's history, not on this pipeline's inputs, so this card does not state
  them: MLflow does (`models:/{registered}@champion`; the evaluate run's `registry.*` tags).
- **License:** Apache-2.0 (code and weights of this project). CIFAR-10 itself carries no explicit license.
- **Developed by:** the cifar10-pipeline contributors.

## Uses

- **Direct use:** classifying small natural images into the {len(classes)} CIFAR-10 classes; a teaching and
  reference model for reproducible ML pipelines (DVC, MLflow, Great Expectations, codecarbon).
- **Downstream use:** a starting point for experiments (`dvc exp run -S ...`) and for serving examples.
- **Out of scope:** any image whose subject is not one of the {len(classes)} classes (the model always answers
  one of them: there is no "none of these"), photographs of people, medical, security or surveillance
  decisions, and inputs far from 32x32 thumbnails (other sizes are resized to 32x32 first, losing detail).

## Bias, risks and limitations

The classes are not served equally. On the test set the best class is **{gap["best_class"]}**
(F1 {pct(gap["best_f1"])}) and the worst is **{gap["worst_class"]}** (F1 {pct(gap["worst_f1"])}): a gap of
{100 * gap["f1_gap"]:.1f} F1 points (recall gap {100 * gap["recall_gap"]:.1f} points). The most frequent
confusions are {confusions} (test images; see `reports/figures/confusion_matrix.png`).

| class | precision | recall | F1 | test images |
|---|---:|---:|---:|---:|
{per_class_rows}

Under common corruptions (below), {worst[0].replace("_", " ")} and {worst[1].replace("_", " ")} give the
lowest accuracy at severity {top} ({pct(robust["accuracy"][worst[0]][top])} and
{pct(robust["accuracy"][worst[1]][top])}; {pct(robust["clean_accuracy"])} on the same images uncorrupted).
The training data are 32x32 web thumbnails from 2009; photographs with other statistics (phone cameras,
other regions, other decades) are out of distribution. {calib.sentence}

## How to get started with the model

```bash
cifar10 predict path/to/image.png --top-k 3     # command line
cifar10 serve                                    # web service on http://127.0.0.1:8000 (see docs/serving.md)
```

```python
from cifar10_pipeline.modeling.inference import image_to_array, predict_logits
from cifar10_pipeline.modeling.model import load_model

model = load_model("{MODEL_DIR.as_posix()}")
images = image_to_array("path/to/image.png")[None]          # any size/format Pillow reads -> (1, 32, 32, 3)
probabilities = predict_logits(model, images).softmax(1)[0]
print(model.config.id2label[int(probabilities.argmax())], float(probabilities.max()))
```

The registry's champion (which may be another version than this card's model), through MLflow:

```python
import mlflow

champion = mlflow.pyfunc.load_model("models:/{registered}@champion")  # uint8 (N, 32, 32, 3) -> probabilities
```

## Training details

### Training data

CIFAR-10 training split from {_data_note(source)}. Validation before training: {validation_line}
(Great Expectations; Data Docs in `reports/data_docs/`). {use.training}

### Preprocessing

Images are decoded to 32x32 RGB uint8 and standardised per channel (mean {config["image_mean"]}, std
{config["image_std"]}). Training augmentation: {augmentation}. The same `cifar10_pipeline.modeling.inference` code
prepares images for evaluation, the CLI and the web service.

### Training hyper-parameters

| setting | value |
|---|---|
| epochs | {hp.epochs} ({train["steps"]} steps) |
| batch size | {hp.batch_size} |
{_optimiser_rows(hp)}
| label smoothing | {hp.label_smoothing} |
| precision | {precision_row(train["precision"], train["batchnorm_precision"])} |
| test-time augmentation | level {config.get("tta_level", 0)} (0 none, 1 mirror, 2 mirror + 1-px shifts) |
| seed | {hp.seed} |

### Speeds, sizes, times

| what | value |
|---|---|
| training time | {train["train_seconds"]:.0f} s ({train["train_images_per_second"]:.0f} images/s) on {train["device"]} |
| train stage wall time (process start to model saved) | {train["stage_wall_seconds"]:.0f} s |
| inference (TTA level {ev["inference"]["tta_level"]}) | {ev["inference"]["images_per_second"]:.0f} images/s on {ev["inference"]["device"]}, batch {ev["inference"]["batch_size"]} |
| checkpoint size | {train["checkpoint_bytes"] / 1e6:.1f} MB |

## Evaluation

### Testing data, factors and metrics

{test_split} ({ev["test_images"]:,} images). {use.testing}
Metrics: accuracy, macro and weighted F1 (scikit-learn), per-class precision/recall/F1, expected calibration
error ({params.evaluate.calibration_bins} bins), and accuracy under corruptions generated on the fly at
{len(severities)} severities on the first {robust["images"]:,} test images.

### Results

| metric | value |
|---|---:|
| accuracy | **{pct(ev["accuracy"])}** |
| F1 (macro) | {pct(ev["f1_macro"])} |
| F1 (weighted) | {pct(ev["f1_weighted"])} |
{calib.rows}
| negative log-likelihood | {ev["nll"]:.4f} |
| best / worst class F1 | {gap["best_class"]} {pct(gap["best_f1"])} / {gap["worst_class"]} {pct(gap["worst_f1"])} |

Robustness (accuracy; clean accuracy on the same images: {pct(robust["clean_accuracy"])}):

| corruption | {" | ".join(f"severity {s}" for s in severities)} |
|---|{"---:|" * len(severities)}
{robust_rows}

Figures: `reports/figures/` (confusion matrix, per-class scores, reliability diagram, robustness, most
confident mistakes) and `reports/training_curves.png`.

## Environmental impact

Measured with codecarbon {em["codecarbon_version"]} ({em["tracking_mode"]} mode), carbon intensity of
{em["country_name"]} ({country}, `emissions.country_iso_code` in params):

| stage | duration (s) | energy (Wh) | emissions (g CO2eq) |
|---|---:|---:|---:|
{stage_rows}
| **total** | **{em["duration_s"]:.0f}** | **{em["energy_kwh"] * 1000:.2f}** | **{em["emissions_kg"] * 1000:.2f}** |

Hardware as detected by codecarbon: CPU {hw["cpu_model"]} ({hw["cpu_count"]} cores), GPU
{hw["gpu_model"] or "none"}. Without hardware power counters codecarbon estimates power from the CPU's
thermal design power, so treat these as order-of-magnitude estimates. Cloud provider and region are not
known to the pipeline (it ran {"on a cloud VM" if em.get("on_cloud") == "Y" else "without cloud metadata"}).

## Technical specifications

- **Architecture and objective:** {type_name(config)}; cross-entropy with label smoothing {hp.label_smoothing}.
- **Hardware (training):** {train["device"]}.
- **Software:** Python {train["python"]} and torch {train["torch"]} (train stage), transformers
  {config.get("transformers_version")} (saved the checkpoint); every other library at its version pinned in
  `pyproject.toml`.

## Citation

```bibtex
@techreport{{krizhevsky2009cifar,
  title  = {{Learning Multiple Layers of Features from Tiny Images}},
  author = {{Alex Krizhevsky}},
  institution = {{University of Toronto}},
  year   = {{2009}}
}}
@misc{{jordan2024airbench,
  title  = {{94\\% on CIFAR-10 in 3.29 Seconds on a Single GPU}},
  author = {{Keller Jordan}},
  year   = {{2024}},
  eprint = {{2404.00498}},
  archivePrefix = {{arXiv}}
}}
```
"""


def type_name(config: dict) -> str:
    return f"`{(config.get('architectures') or ['?'])[0]}` (model_type `{config.get('model_type')}`)"


def gather_facts(model_dir: Path = MODEL_DIR) -> dict:
    """Every input of the card: all of them are DVC deps of the model_card stage."""
    train = _load(TRAIN_METRICS)
    missing = sorted({"batchnorm_precision", "precision", "python", "temperature"} - set(train))
    if missing:
        raise ValueError(f"{TRAIN_METRICS} lacks {missing}: it predates the train stage's code, re-run it")
    return {
        "source": _load(DATA_SOURCE),
        "validation": _load(VALIDATION_METRICS),
        "train": train,
        "eval": _load(EVAL_METRICS),
        "emissions": _load(EMISSIONS_METRICS),
        # Written by `benchmark` (not a stage); a checkout without it has no knob-selection records.
        "benchmark": _load(BENCHMARK_METRICS) if BENCHMARK_METRICS.is_file() else {},
        "config": _load(Path(model_dir) / "config.json"),
    }


def main() -> None:
    params = load_params()
    with stage_run("model_card", params, outputs=(MODEL_CARD,)) as run:
        card = render(params, gather_facts())
        with atomic_output(MODEL_CARD) as staged:
            staged.write_text(card)
        run.log_artifact(MODEL_CARD)
    print(f"model_card: -> {MODEL_CARD}")


if __name__ == "__main__":
    main()
