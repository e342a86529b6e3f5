"""Stage 7, model_card: write ``reports/model_card.md`` from measured facts only.

Sections follow the Hugging Face model-card template. Every number comes from params, ``metrics/`` or the
saved model's ``config.json``, and every sentence that holds only for some profiles or devices is chosen by
those facts (``data_use``, ``calibration``, ``precision_row``). The card reads nothing DVC does not track: the
registry's version numbers and alias depend on the MLflow store's history, so the card only says where to
find them. Where the pipeline cannot know a fact, the card says so instead of "More information needed".

The front matter is huggingface_hub's ``ModelCardData`` (test accuracy and macro F1 as ``model-index`` eval
results), the body ``reporting/templates/model_card.md.j2``; this module chooses the sentences, the template
lays them out. What the network is and how it was trained (its registry entry in modeling/architectures.py)
comes from the train stage's record, so this stage imports neither torch nor the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cifar10_pipeline import CALIBRATION_TEMPERATURE
from cifar10_pipeline.core.data import atomic_output
from cifar10_pipeline.core.errors import PipelineError, StaleMetricsError, run_cli
from cifar10_pipeline.core.params import Params, TrainParams, load_params
from cifar10_pipeline.core.paths import (
    BENCHMARK_RECORD,
    DATA_SOURCE,
    EMISSIONS_METRICS,
    EVAL_METRICS,
    MODEL_CARD,
    MODEL_DIR,
    TRAIN_METRICS,
    VALIDATION_METRICS,
)
from cifar10_pipeline.reporting.templating import template_environment
from cifar10_pipeline.tracking.runs import stage_run

PARENT_MODEL = "google/vit-base-patch16-224-in21k"
DATASET_ID = "uoft-cs/cifar10"  # the Hub dataset whose schema (and, but for the mirror, pixels) the data have
# What FrozenScaleBatchNorm normalised in training, by the train stage's record (model.batchnorm_precision).
BATCHNORM_WORDING = {
    "bf16": "batch norm on the bf16 activations (fp32 parameters and statistics)",
    "fp32 copy": "batch norm on fp32 copies of the activations",
    "fp32": "batch norm in fp32",
}


def render_body(**facts: Any) -> str:
    """``reporting/templates/model_card.md.j2`` filled in. Not ``ModelCard.from_template``: its plain
    ``jinja2.Template`` prints a missing fact as an empty string, where StrictUndefined stops the stage."""
    environment = template_environment()
    return environment.get_template("model_card.md.j2").render(**facts)


def _load(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise PipelineError(f"{path} is missing", hint="run the pipeline up to here first: dvc repro")
    return json.loads(Path(path).read_text())


def _data_note(source: dict[str, Any]) -> str:
    if source["source"] == "mirror":
        return (
            f"the local mirror `{source['location']}` (Parquet in the `{DATASET_ID}` schema). **That "
            "mirror is JPEG-derived** (see its README): its pixels differ from the original CIFAR-10, so its "
            "accuracies are not directly comparable with published CIFAR-10 figures; all figures in this "
            "card are measured on the mirror"
        )
    if source["source"] == "hub":
        return f"the Hugging Face Hub dataset `{source['location']}` (the original pixels)"
    return f"the original archive `{source['location']}` (md5 `{source.get('md5')}`)"


def _optimiser_rows(hp: TrainParams, recipe: str) -> str:
    """Hyper-parameter table rows for the optimiser the model was trained with (training.make_optimizers),
    by the recipe the train stage recorded."""
    warmup = f"warm-up over {hp.warmup_fraction:.0%} of the steps" if hp.warmup_fraction else "no warm-up"
    schedule = f"{warmup}, linear decay to {hp.final_lr_fraction}"
    if recipe == "speed_run":
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
    """``benchmark select`` records in records/benchmark.json for the active profile whose chosen values are
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


def data_use(
    params: Params, train: dict[str, Any], validation: dict[str, Any], selections: list[dict[str, Any]]
) -> DataUse:
    """The sentences on which data did what, for every case in one place."""
    pre, n = params.preprocess, train["train_images"]
    if selections:
        knobs = ", ".join(f"`{key}`" for entry in selections for key in entry["chosen"])
        holdout = " / ".join(sorted({f"{entry['val_images']:,}" for entry in selections}))
        knobs_sentence = (
            f"knobs ({knobs}) chosen on a {holdout}-image stratified hold-out of the training split "
            "(`benchmark select`, `records/benchmark.json`)"
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
    rows: list[tuple[str, str]]  # results-table rows: (metric, value)


def calibration(
    train: dict[str, Any], evaluation: dict[str, Any], config: dict[str, Any], val_size: int
) -> Calibration:
    """What temperature scaling did, from the train stage's record (None: nothing fitted, no split), checked
    against the temperature the saved model applies (its config.json)."""
    fitted = train["temperature"]
    ece = evaluation["ece"]
    saved = float(config.get(CALIBRATION_TEMPERATURE, 1.0))
    if saved != (1.0 if fitted is None else fitted):
        raise StaleMetricsError(
            f"{TRAIN_METRICS} records temperature {fitted} but the saved model's config.json applies "
            f"{saved}: the metrics are stale"
        )
    if fitted is None:
        if val_size or evaluation["temperature"] != 1.0:
            raise StaleMetricsError(
                f"{TRAIN_METRICS} records no temperature but val_size is {val_size} and {EVAL_METRICS} used "
                f"{evaluation['temperature']}: the metrics are stale"
            )
        return Calibration(
            "No temperature scaling (no validation split): the probabilities are the network's own softmax "
            f"(test ECE {ece:.4f}).",
            [
                ("expected calibration error", f"{ece:.4f}"),
                ("softmax temperature", "none (no temperature scaling: no validation split)"),
            ],
        )
    if not val_size or evaluation["temperature"] != fitted:
        raise StaleMetricsError(
            f"{TRAIN_METRICS} records temperature {fitted} but val_size is {val_size} and {EVAL_METRICS} "
            f"used {evaluation['temperature']}: the metrics are stale"
        )
    confidence = "under" if fitted < 1 else "over" if fitted > 1 else "neither under- nor over"
    raw_ece = evaluation["ece_before_temperature"]
    return Calibration(
        f"The raw network is {confidence}-confident on the validation split: a softmax temperature of "
        f"{fitted:.3f}, fitted on those {val_size:,} images after training and stored in `config.json`, "
        f"takes the test ECE from {raw_ece:.4f} to {ece:.4f}. Every consumer "
        "(evaluation, CLI, web service) applies it.",
        [
            ("expected calibration error", f"{ece:.4f} (before temperature scaling: {raw_ece:.4f})"),
            ("softmax temperature (fitted on the validation split)", f"{fitted:.3f}"),
        ],
    )


def precision_row(precision: str, batchnorm: str | None) -> str:
    """Autocast precision from params, batch norm's from the train stage's record (None: no such layer)."""
    autocast = "bf16 autocast" if precision == "bf16" else "fp32 (no autocast)"
    return f"{autocast}; {BATCHNORM_WORDING[batchnorm]}" if batchnorm else autocast


def type_name(config: dict[str, Any]) -> str:
    return f"`{(config.get('architectures') or ['?'])[0]}` (model_type `{config.get('model_type')}`)"


def augmentation_sentence(hp: TrainParams) -> str:
    augmentation = (
        f"random translation by up to {hp.translate} px (reflect padding)"
        if hp.translate
        else "no translation"
    )
    if hp.flip:
        augmentation += ", horizontal flips (each image flipped on every other epoch)"
    if hp.cutout:
        augmentation += f", a {hp.cutout}x{hp.cutout} cutout square per image"
    return augmentation


def parent_sentence(hp: TrainParams, from_scratch: bool) -> str:
    if not from_scratch:
        return f"`{hp.model}`"
    return (
        f"none: this run trains the built-in `{hp.model}` from scratch (`train.model`). The Hugging "
        f"Face template this card follows names `{PARENT_MODEL}`; set `train.model` to that Hub id "
        "(or a local copy) to fine-tune it instead."
    )


def card_metadata(params: Params, evaluation: dict[str, Any], source: dict[str, Any]) -> ModelCardData:
    """The front matter: Hub metadata, with the headline test figures as ``model-index`` eval results."""
    # Where the figures came from, as the card's prose says: leaderboards read only this name.
    qualifiers = ["JPEG-derived mirror"] if source["source"] == "mirror" else []
    if params.preprocess.max_test_images is not None:
        qualifiers.append(f"stratified subset of {evaluation['test_images']:,} test images")
    dataset_name = "CIFAR-10" + (f" ({'; '.join(qualifiers)})" if qualifiers else "")
    test_split = {
        "task_type": "image-classification",
        "task_name": "Image Classification",
        "dataset_type": DATASET_ID,
        "dataset_name": dataset_name,
        "dataset_split": "test",
    }
    return ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="image-classification",
        datasets=[DATASET_ID],
        metrics=["accuracy", "f1"],
        model_name=params.mlflow.registered_model,
        eval_results=[
            EvalResult(
                **test_split,
                metric_type="accuracy",
                metric_name="Accuracy",
                metric_value=evaluation["accuracy"],
            ),
            EvalResult(
                **test_split,
                metric_type="f1",
                metric_name="F1 (macro)",
                metric_args={"average": "macro"},
                metric_value=evaluation["f1_macro"],
            ),
        ],
    )


def render(params: Params, facts: dict[str, Any]) -> str:
    """The card: ``card_metadata`` as YAML front matter, the body from ``templates/model_card.md.j2``."""
    train, evaluation, emissions = facts["train"], facts["eval"], facts["emissions"]
    validation, source, config = facts["validation"], facts["source"], facts["config"]
    hp = params.train
    country = params.emissions.country_iso_code
    if emissions["country_iso_code"] != country:
        raise StaleMetricsError(
            f"{EMISSIONS_METRICS} was measured for {emissions['country_iso_code']}, params say {country}: "
            "the metrics are stale"
        )
    robustness = evaluation["robustness"]
    severities = sorted(next(iter(robustness["accuracy"].values())), key=int)
    worst_severity = severities[-1]
    at_worst = {name: by_severity[worst_severity] for name, by_severity in robustness["accuracy"].items()}
    weakest = sorted(at_worst, key=at_worst.__getitem__)[:2]
    text = render_body(
        card_data=card_metadata(params, evaluation, source).to_yaml(),
        registered_model=params.mlflow.registered_model,
        data_note=_data_note(source),
        model_type=train["model_description"],
        architecture=type_name(config),
        classes=[config["id2label"][str(i)] for i in range(len(config["id2label"]))],
        parent=parent_sentence(hp, train["from_scratch"]),
        hp=hp,
        train=train,
        evaluation=evaluation,
        emissions=emissions,
        validation=validation,
        config=config,
        model_dir=MODEL_DIR.as_posix(),
        confusions=", ".join(
            f"{pair['true']} taken for {pair['predicted']} ({pair['count']})"
            for pair in evaluation["most_confused"]
        ),
        robustness=robustness,
        severities=severities,
        worst_severity=worst_severity,
        weakest=[{"name": name.replace("_", " "), "accuracy": at_worst[name]} for name in weakest],
        calibration=calibration(train, evaluation, config, params.preprocess.val_size),
        data_use=data_use(params, train, validation, selections_in_effect(params, facts["benchmark"])),
        augmentation=augmentation_sentence(hp),
        optimiser_rows=_optimiser_rows(hp, train["recipe"]),
        precision=precision_row(train["precision"], train["batchnorm_precision"]),
        tta_level=config.get("tta_level", 0),
        tta_confidence=config.get("tta_confidence"),
        tta_fitted_on=train.get("tta_fitted_on"),
        tta_fraction=hp.tta_fraction,
        tta_validation=[
            (label, train[key])
            for label, key in (
                ("no TTA", "val_accuracy_no_tta"),
                ("selective", "val_accuracy_selective_tta"),
                ("every image", "val_accuracy_full_tta"),
            )
            if train.get(key) is not None
        ],
        test_split=(
            "The CIFAR-10 test split"
            if params.preprocess.max_test_images is None
            else "A stratified subset of the CIFAR-10 test split"
        ),
        calibration_bins=params.evaluate.calibration_bins,
        cloud="on a cloud VM" if emissions.get("on_cloud") == "Y" else "without cloud metadata",
        transformers_version=config.get("transformers_version"),
    )
    # Parsed back the way the Hub's client reads a card: an invalid model-index raises here, not on upload.
    return str(ModelCard(text))


def gather_facts(model_dir: Path = MODEL_DIR) -> dict[str, Any]:
    """Every input of the card: all of them are DVC deps of the model_card stage."""
    train = _load(TRAIN_METRICS)
    needed = {"batchnorm_precision", "precision", "python", "temperature", "model_description", "recipe"}
    missing = sorted({*needed, "from_scratch"} - set(train))
    if missing:
        raise StaleMetricsError(
            f"{TRAIN_METRICS} lacks {', '.join(missing)}: it predates the train stage's code",
            hint="re-run the train stage and what follows: dvc repro",
        )
    return {
        "source": _load(DATA_SOURCE),
        "validation": _load(VALIDATION_METRICS),
        "train": train,
        "eval": _load(EVAL_METRICS),
        "emissions": _load(EMISSIONS_METRICS),
        # Written by `benchmark` (not a stage); a checkout without it has no knob-selection records.
        "benchmark": _load(BENCHMARK_RECORD) if BENCHMARK_RECORD.is_file() else {},
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
    run_cli(main)
