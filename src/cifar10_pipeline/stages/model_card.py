"""Stage 7, model_card: write ``reports/model_card.md`` from measured facts only.

Sections follow the Hugging Face model-card template. Every number comes from ``metrics/`` or params; where
the pipeline cannot know a fact, the card says what is missing and why instead of "More information needed".
"""

from __future__ import annotations

import json
import platform
from importlib.metadata import version
from pathlib import Path

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.data import atomic_output
from cifar10_pipeline.params import Params, TrainParams, load_params
from cifar10_pipeline.paths import (
    DATA_SOURCE,
    EMISSIONS_METRICS,
    EVAL_METRICS,
    MODEL_CARD,
    MODEL_DIR,
    TRAIN_METRICS,
    VALIDATION_METRICS,
)

REGISTRY_RECORD = Path("metrics/registry.json")
PARENT_MODEL = "google/vit-base-patch16-224-in21k"


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
            "is JPEG-derived** (every image went through JPEG at quality about 75), so accuracies measured on "
            "it run about 3 points below figures on the original CIFAR-10; all figures in this card are "
            "measured on the mirror"
        )
    if source["source"] == "hub":
        return f"the Hugging Face Hub dataset `{source['location']}` (the original pixels)"
    return f"the original archive `{source['location']}` (md5 `{source.get('md5')}`)"


def _optimiser_rows(hp: TrainParams) -> str:
    """Hyper-parameter table rows for the optimiser the model was trained with (see training.make_optimizers)."""
    schedule = f"warm-up {hp.warmup_fraction:.0%}, linear decay to {hp.final_lr_fraction}"
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
        "| optimiser | AdamW, betas (0.9, 0.98) |\n"
        f"| learning rate | {hp.adamw_lr}; {schedule} |\n"
        f"| weight decay | {hp.adamw_weight_decay} (not on biases, norms, position embeddings) |"
    )


def render(params: Params, facts: dict) -> str:
    train, ev, em, val = facts["train"], facts["eval"], facts["emissions"], facts["validation"]
    source, reg, config = facts["source"], facts["registry"], facts["config"]
    hp = params.train
    builtin = hp.is_builtin_model
    per_class_rows = "\n".join(
        f"| {name} | {pct(s['precision'])} | {pct(s['recall'])} | {pct(s['f1'])} | {s['support']} |"
        for name, s in ev["per_class"].items()
    )
    gap = ev["class_gap"]
    robust = ev["robustness"]
    robust_rows = "\n".join(
        f"| {name} | " + " | ".join(pct(row[s]) for s in sorted(row, key=int)) + " |"
        for name, row in robust["accuracy"].items()
    )
    stage_rows = "\n".join(
        f"| {name} | {s['duration_s']:.0f} | {s['energy_kwh'] * 1000:.2f} | {s['emissions_kg'] * 1000:.2f} |"
        for name, s in em["stages"].items()
    )
    hw = em["hardware"]
    validation_line = f"{val['evaluated']} expectations evaluated, {val['failed']} failed"
    extra = config.get("extra_convs", 0)
    residual = f"plus {extra} residual conv layer(s) per group" if extra else "no residual connections"
    confusions = ", ".join(
        f"{c['true']} taken for {c['predicted']} ({c['count']})" for c in ev["most_confused"]
    )
    worst_corruptions = sorted(robust["accuracy"], key=lambda name: robust["accuracy"][name]["3"])[:2]
    if hp.model == "cifar_convnet":
        model_type = (
            "convolutional network for 32x32 images trained from scratch (`cifar_convnet`: a frozen "
            f"patch-whitening layer, three conv groups of widths {config['widths']}, batch norm, GELU, "
            f"{residual}, global max-pool, linear head)"
        )
    elif hp.model == "cifar_vit":
        model_type = (
            "vision transformer for 32x32 images trained from scratch (`cifar_vit`: a convolutional "
            f"tokenizer of two conv groups, widths {config['tokenizer_widths']}, makes a 7x7 grid of tokens; "
            f"{config['num_hidden_layers']} pre-norm encoder layers of width {config['hidden_size']} with "
            f"{config['num_attention_heads']} heads; mean-pooled tokens, linear head)"
        )
    else:
        model_type = f"`{config.get('model_type')}` image classifier fine-tuned from `{hp.model}`"
    augmentation_extras = ", alternating horizontal flips" if hp.flip else ""
    if hp.cutout:
        augmentation_extras += f", a {hp.cutout}x{hp.cutout} cutout square per image"
    if builtin:
        parent = (
            f"none. The card we started from names `{PARENT_MODEL}` as the parent model; this run trains a "
            f"built-in network from scratch (`train.model: {hp.model}`); the conv net reaches the accuracy "
            "target on a CPU. Set `train.model` to that Hub id (or a local copy) to fine-tune the ViT instead."
        )
    else:
        parent = f"`{hp.model}`"
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

# CIFAR-10 classifier (`{params.mlflow.registered_model}` version {reg["version"]})

Generated by the `model_card` stage of `dvc repro` from `params.yaml` and `metrics/`; do not edit by hand.
Figures were measured on {_data_note(source)}.

## Model details

- **Model type:** {model_type}.
- **Classes ({len(CLASS_NAMES)}):** {", ".join(CLASS_NAMES)} (`id2label` in `config.json`).
- **Parent model:** {parent}
- **Parameters:** {train["parameters"]:,}; checkpoint {train["checkpoint_bytes"] / 1e6:.1f} MB (safetensors).
- **Registry:** MLflow registered model `{reg["registered_model"]}`, version {reg["version"]}; alias `champion` \
points to version {reg["champion_version"]} ({"this model" if reg["promoted"] else "an earlier model, which this one does not beat on the same test set"}).
- **License:** Apache-2.0 (code and weights of this project). CIFAR-10 itself carries no explicit license.
- **Developed by:** the cifar10-pipeline contributors.

## Uses

- **Direct use:** classifying small natural images into the 10 CIFAR-10 classes; a teaching and reference
  model for reproducible ML pipelines (DVC, MLflow, Great Expectations, codecarbon).
- **Downstream use:** a starting point for experiments (`dvc exp run -S ...`) and for serving examples.
- **Out of scope:** any image whose subject is not one of the 10 classes (the model always answers one of
  them: there is no "none of these"), photographs of people, medical, security or surveillance decisions,
  and inputs far from 32x32 thumbnails (larger images are downscaled to 32x32 first, losing detail).

## Bias, risks and limitations

The classes are not served equally. On the test set the best class is **{gap["best_class"]}**
(F1 {pct(gap["best_f1"])}) and the worst is **{gap["worst_class"]}** (F1 {pct(gap["worst_f1"])}): a gap of
{100 * gap["f1_gap"]:.1f} F1 points (recall gap {100 * gap["recall_gap"]:.1f} points). The most frequent
confusions are {confusions} (test images; see `reports/figures/confusion_matrix.png`).

| class | precision | recall | F1 | test images |
|---|---:|---:|---:|---:|
{per_class_rows}

Accuracy falls under common corruptions (below); {worst_corruptions[0].replace("_", " ")} and
{worst_corruptions[1].replace("_", " ")} hurt most (severity 3: {pct(robust["accuracy"][worst_corruptions[0]]["3"])}
and {pct(robust["accuracy"][worst_corruptions[1]]["3"])}). The training data are
32x32 web thumbnails from 2009; photographs with other statistics (phone cameras, other regions, other
decades) are out of distribution. Label smoothing leaves the raw network under-confident (test ECE
{ev["ece_before_temperature"]:.4f}); a softmax temperature of {ev["temperature"]:.3f}, fitted on the validation
split after training and stored in `config.json`, brings the ECE to {ev["ece"]:.4f}. Every consumer (evaluation,
CLI, web service) applies it.

## How to get started with the model

```bash
cifar10 predict path/to/image.png --top-k 3     # command line
cifar10 serve                                    # web service on http://127.0.0.1:8000 (see docs/serving.md)
```

```python
from cifar10_pipeline.inference import image_to_array, predict_logits
from cifar10_pipeline.model import load_model

model = load_model("{MODEL_DIR.as_posix()}")
images = image_to_array("path/to/image.png")[None]          # any size/format Pillow reads -> (1, 32, 32, 3)
probabilities = predict_logits(model, images).softmax(1)[0]
print(model.config.id2label[int(probabilities.argmax())], float(probabilities.max()))
```

## Training details

### Training data

CIFAR-10 training split from {_data_note(source)}. Validation before training: {validation_line}
(Great Expectations; Data Docs in `reports/data_docs/`). {train["train_images"]:,} images were used for
training and a stratified hold-out of {params.preprocess.val_size:,} for per-epoch validation (seed
{params.preprocess.seed}).

### Preprocessing

Images are decoded to 32x32 RGB uint8 and standardised per channel (mean {config["image_mean"]}, std
{config["image_std"]}). Training augmentation: random translation by up to {hp.translate} px (reflect
padding){augmentation_extras}. The same `cifar10_pipeline.inference` code
prepares images for evaluation, the CLI and the web service.

### Training hyper-parameters

| setting | value |
|---|---|
| epochs | {hp.epochs} ({train["steps"]} steps) |
| batch size | {hp.batch_size} |
{_optimiser_rows(hp)}
| label smoothing | {hp.label_smoothing} |
| precision | {hp.precision} autocast, batch norm in fp32 |
| test-time augmentation | level {config.get("tta_level", 0)} (0 none, 1 mirror, 2 mirror + 1-px shifts) |
| seed | {hp.seed} |

### Speeds, sizes, times

| what | value |
|---|---|
| training time | {train["train_seconds"]:.0f} s ({train["train_images_per_second"]:.0f} images/s) on {train["device"]} |
| train stage wall time (process start to model saved) | {train["stage_wall_seconds"]:.0f} s |
| inference (with TTA) | {ev["inference"]["images_per_second"]:.0f} images/s on {ev["inference"]["device"]}, batch {ev["inference"]["batch_size"]} |
| checkpoint size | {train["checkpoint_bytes"] / 1e6:.1f} MB |

## Evaluation

### Testing data, factors and metrics

The CIFAR-10 test split ({ev["test_images"]:,} images), never used for training or model selection.
Metrics: accuracy, macro and weighted F1 (scikit-learn), per-class precision/recall/F1, expected calibration
error ({params.evaluate.calibration_bins} bins), and accuracy under corruptions generated on the fly at three
severities on the first {robust["images"]:,} test images.

### Results

| metric | value |
|---|---:|
| accuracy | **{pct(ev["accuracy"])}** |
| F1 (macro) | {pct(ev["f1_macro"])} |
| F1 (weighted) | {pct(ev["f1_weighted"])} |
| expected calibration error | {ev["ece"]:.4f} (before temperature scaling: {ev["ece_before_temperature"]:.4f}) |
| softmax temperature (fitted on the validation split) | {ev["temperature"]:.3f} |
| negative log-likelihood | {ev["nll"]:.4f} |
| best / worst class F1 | {gap["best_class"]} {pct(gap["best_f1"])} / {gap["worst_class"]} {pct(gap["worst_f1"])} |

Robustness (accuracy; clean accuracy on the same images: {pct(robust["clean_accuracy"])}):

| corruption | severity 1 | severity 2 | severity 3 |
|---|---:|---:|---:|
{robust_rows}

Figures: `reports/figures/` (confusion matrix, per-class scores, reliability diagram, robustness, most
confident mistakes) and `reports/training_curves.png`.

## Environmental impact

Measured with codecarbon {em["codecarbon_version"]} ({em["tracking_mode"]} mode), carbon intensity of
{em["country_name"]} ({em["country_iso_code"]}, from params):

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
- **Software:** Python {platform.python_version()}, torch {train["torch"]}, transformers {version("transformers")},
  scikit-learn {version("scikit-learn")}, DVC {version("dvc")}, MLflow {version("mlflow")},
  Great Expectations {version("great-expectations")}, codecarbon {em["codecarbon_version"]}.

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
    return {
        "source": _load(DATA_SOURCE),
        "validation": _load(VALIDATION_METRICS),
        "train": _load(TRAIN_METRICS),
        "eval": _load(EVAL_METRICS),
        "emissions": _load(EMISSIONS_METRICS),
        "registry": _load(REGISTRY_RECORD),
        "config": _load(Path(model_dir) / "config.json"),
    }


def main() -> None:
    params = load_params()
    card = render(params, gather_facts())
    with atomic_output(MODEL_CARD) as staged:
        staged.write_text(card)
    print(f"model_card: -> {MODEL_CARD}")


if __name__ == "__main__":
    main()
