"""Stage 7, model_card: write ``reports/model_card.md`` from measured facts only.

Sections follow the Hugging Face model-card template. Every number comes from params, ``metrics/`` or the
saved model's ``config.json``, and every sentence that holds only for some profiles or devices is chosen by
those facts, in the template's macros (``reporting/templates/model_card_sentences.md.j2``). The card reads
nothing DVC does not track: the registry's version numbers and alias depend on the MLflow store's history,
so the card only says where to find them. Where the pipeline cannot know a fact, the card says so instead
of "More information needed".

The front matter is huggingface_hub's ``ModelCardData`` (test accuracy and macro F1 as ``model-index`` eval
results), the body ``reporting/templates/model_card.md.j2``: this module gathers and checks the facts into
one ``CardFacts``, the template words them. What the network is and how it was trained (its registry entry
in modeling/architectures.py) comes from the train stage's record, so this stage imports neither torch nor
the models.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from cifar10_pipeline import CALIBRATION_TEMPERATURE
from cifar10_pipeline.core.errors import PipelineError, StaleMetricsError, run_cli
from cifar10_pipeline.core.io import atomic_output
from cifar10_pipeline.core.params import Params, PreprocessParams, TrainParams, load_params
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


def render_body(card: CardFacts) -> str:
    """``reporting/templates/model_card.md.j2`` filled in. Not ``ModelCard.from_template``: its plain
    ``jinja2.Template`` prints a missing fact as an empty string, where StrictUndefined stops the stage."""
    environment = template_environment(thousands=lambda number: f"{number:,}")
    # The sentence macros' template is named here, so that what the card renders is visible from its code.
    template = environment.get_template("model_card.md.j2")
    return template.render(card=card, sentences="model_card_sentences.md.j2")


def _load(path: Path) -> dict[str, Any]:
    if not Path(path).is_file():
        raise PipelineError(f"{path} is missing", hint="run the pipeline up to here first: dvc repro")
    return json.loads(Path(path).read_text())


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


def checked_temperature(
    train: dict[str, Any], evaluation: dict[str, Any], config: dict[str, Any], val_size: int
) -> float | None:
    """The softmax temperature fitted after training (the train stage's record; None: nothing fitted, no
    validation split), checked against what the saved model (its config.json) and evaluate applied."""
    fitted = train["temperature"]
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
    elif not val_size or evaluation["temperature"] != fitted:
        raise StaleMetricsError(
            f"{TRAIN_METRICS} records temperature {fitted} but val_size is {val_size} and {EVAL_METRICS} "
            f"used {evaluation['temperature']}: the metrics are stale"
        )
    return fitted


@dataclass(frozen=True)
class CardFacts:
    """Everything the card states, read and checked; ``model_card.md.j2`` words it (as ``card``)."""

    card_data: str  # the front matter: huggingface_hub's YAML of card_metadata
    registered_model: str  # mlflow.registered_model
    hp: TrainParams
    pre: PreprocessParams
    calibration_bins: int  # evaluate.calibration_bins
    source: dict[str, Any]  # metrics/data_source.json
    validation: dict[str, Any]  # metrics/validation.json
    train: dict[str, Any]  # metrics/train.json
    evaluation: dict[str, Any]  # metrics/eval.json
    emissions: dict[str, Any]  # metrics/emissions.json
    config: dict[str, Any]  # the saved model's config.json
    selections: list[dict[str, Any]]  # knob-selection records in effect (selections_in_effect)
    temperature: float | None  # checked_temperature
    classes: list[str]  # by class id
    severities: list[str]  # corruption severities, mildest first
    weakest: list[dict[str, Any]]  # the two corruptions with the lowest accuracy at the worst severity
    tta_validation: list[tuple[str, float]]  # validation accuracy without, with selective and with full TTA
    model_dir: str = MODEL_DIR.as_posix()
    parent_model: str = PARENT_MODEL
    dataset_id: str = DATASET_ID

    @property
    def worst_severity(self) -> str:
        return self.severities[-1]


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


def card_facts(params: Params, facts: dict[str, Any]) -> CardFacts:
    """The card's facts from ``gather_facts``'s files, checked against each other and against params."""
    train, evaluation, emissions = facts["train"], facts["eval"], facts["emissions"]
    config = facts["config"]
    country = params.emissions.country_iso_code
    if emissions["country_iso_code"] != country:
        raise StaleMetricsError(
            f"{EMISSIONS_METRICS} was measured for {emissions['country_iso_code']}, params say {country}: "
            "the metrics are stale"
        )
    robustness = evaluation["robustness"]
    severities = sorted(next(iter(robustness["accuracy"].values())), key=int)
    at_worst = {name: by_severity[severities[-1]] for name, by_severity in robustness["accuracy"].items()}
    weakest = sorted(at_worst, key=at_worst.__getitem__)[:2]
    tta_labels = {
        "no TTA": "val_accuracy_no_tta",
        "selective": "val_accuracy_selective_tta",
        "every image": "val_accuracy_full_tta",
    }
    return CardFacts(
        card_data=card_metadata(params, evaluation, facts["source"]).to_yaml(),
        registered_model=params.mlflow.registered_model,
        hp=params.train,
        pre=params.preprocess,
        calibration_bins=params.evaluate.calibration_bins,
        source=facts["source"],
        validation=facts["validation"],
        train=train,
        evaluation=evaluation,
        emissions=emissions,
        config=config,
        selections=selections_in_effect(params, facts["benchmark"]),
        temperature=checked_temperature(train, evaluation, config, params.preprocess.val_size),
        classes=[config["id2label"][str(i)] for i in range(len(config["id2label"]))],
        severities=severities,
        weakest=[{"name": name.replace("_", " "), "accuracy": at_worst[name]} for name in weakest],
        tta_validation=[
            (label, train[key]) for label, key in tta_labels.items() if train.get(key) is not None
        ],
    )


def render(params: Params, facts: dict[str, Any]) -> str:
    """The card: ``card_metadata`` as YAML front matter, the body from ``templates/model_card.md.j2``."""
    text = render_body(card_facts(params, facts))
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
