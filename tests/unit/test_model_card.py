"""The model card states only what its facts say: each profile's sentences are right for that profile, and the
card is the same whatever the local MLflow store's history (real SQLite stores in tmp_path). Its front matter
is model-index metadata that huggingface_hub's own parser reads back as the figures in metrics/eval.json.

Facts are small synthetic metrics plus the real config.json of the profile's network, shaped like the files
the stages write.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch
import yaml
from huggingface_hub import EvalResult, ModelCard

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.errors import StaleMetricsError
from cifar10_pipeline.core.params import Params, compose, validate_params
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
from cifar10_pipeline.modeling.architectures import architecture, build_model, describe_architecture
from cifar10_pipeline.modeling.base import batchnorm_precision
from cifar10_pipeline.modeling.inference import set_calibration_temperature
from cifar10_pipeline.reporting.templating import template_environment
from cifar10_pipeline.stages import model_card

from ..conftest import PROJECT_ROOT
from ..support.helpers import default_raw_params, fresh_and_history_stores

TRAIN_SPLIT_IMAGES = 50_000  # the raw training split, as metrics/validation.json records it
TEMPERATURE = 0.52


def profile_params(profile: str) -> Params:
    return validate_params(compose([f"profile={profile}"], PROJECT_ROOT / "conf"))


def model_config(params: Params, tmp_path: Path, temperature: float | None) -> dict:
    """config.json as save_pretrained writes it for the profile's network (after calibrate, if any)."""
    model = build_model(params.train)
    if temperature is not None:
        set_calibration_temperature(model, temperature)
    model.save_pretrained(tmp_path / "config-model")
    return json.loads((tmp_path / "config-model" / "config.json").read_text())


def registry_facts(model: str, config: dict) -> dict:
    """What the train stage records of the network's registry entry (stages/train.py)."""
    entry = architecture(model)
    return {
        "model_description": describe_architecture(model, config),
        "recipe": entry.recipe.name,
        "from_scratch": entry.from_scratch,
    }


def synthetic_facts(params: Params, tmp_path: Path, device: str) -> dict:
    """Every input of the card, consistent with ``params`` the way the stages make them."""
    pre, hp = params.preprocess, params.train
    kept = min(pre.max_train_images or TRAIN_SPLIT_IMAGES, TRAIN_SPLIT_IMAGES)
    test_images = pre.max_test_images or 10_000
    temperature = TEMPERATURE if pre.val_size else None  # train.calibrate fits only on a validation split
    config = model_config(params, tmp_path, temperature)
    model = build_model(hp)
    precision = "bf16" if hp.precision == "auto" else hp.precision
    per_class = {
        name: {"precision": 0.9 - i / 100, "recall": 0.88 - i / 100, "f1": 0.89 - i / 100, "support": 100}
        for i, name in enumerate(CLASS_NAMES)
    }
    severities = {"1": 0.8, "2": 0.7, "3": 0.6}
    return {
        "source": {"source": "mirror", "location": "../shared/data/cifar10"},
        "validation": {"evaluated": 41, "failed": 0, "train": {"images": TRAIN_SPLIT_IMAGES}},
        "train": {
            **registry_facts(hp.model, config),
            "parameters": sum(p.numel() for p in model.parameters()),
            "device": "NVIDIA H200" if device == "cuda" else "AMD EPYC CPU, 2 threads",
            # The machines these fixtures stand for (an AVX-512 BF16 CPU, an H200) resolve `auto` to bf16.
            "precision": precision,
            "batchnorm_precision": batchnorm_precision(model, torch.device(device), precision),
            "python": "3.12.3",
            "torch": "2.13.0",
            "steps": 598,
            "train_images": kept - pre.val_size,
            "temperature": temperature,
            "train_seconds": 1380.66,
            "train_images_per_second": 443.5,
            "stage_wall_seconds": 1411.03,
            "checkpoint_bytes": 7_904_740,
        },
        "eval": {
            "accuracy": 0.9099,
            "f1_macro": 0.9097,
            "f1_weighted": 0.9096,
            "test_images": test_images,
            "ece": 0.0113,
            "nll": 0.2737,
            "temperature": temperature or 1.0,
            "ece_before_temperature": 0.1958 if temperature else 0.0113,
            "class_gap": {
                "best_class": "airplane",
                "best_f1": 0.89,
                "worst_class": "truck",
                "worst_f1": 0.80,
                "f1_gap": 0.09,
                "recall_gap": 0.09,
            },
            "most_confused": [{"true": "dog", "predicted": "cat", "count": 91}],
            "per_class": per_class,
            "robustness": {
                "images": min(params.evaluate.robustness_images, test_images),
                "clean_accuracy": 0.91,
                "accuracy": {"blur": severities, "gaussian_noise": {"1": 0.5, "2": 0.3, "3": 0.1}},
            },
            "inference": {
                "device": "AMD EPYC CPU, 2 threads",
                "tta_level": hp.tta_level,
                "batch_size": 1000,
                "images_per_second": 812.0,
            },
        },
        "emissions": {
            "codecarbon_version": "3.3.2",
            "tracking_mode": "machine",
            "country_name": "United States",
            "country_iso_code": "USA",
            "stages": {"train": {"duration_s": 1400.0, "energy_kwh": 0.0109, "emissions_kg": 0.004}},
            "duration_s": 1400.0,
            "energy_kwh": 0.0109,
            "emissions_kg": 0.004,
            "hardware": {"cpu_model": "AMD EPYC", "cpu_count": 2, "gpu_model": None},
        },
        "benchmark": {},
        "config": config,
    }


def selection(profile: str, chosen: dict, val_images: int = 5000) -> dict:
    """A knob-selection entry as ``benchmark select`` writes it (the keys the card reads)."""
    return {"kind": "selection", "profile": profile, "val_images": val_images, "train_images": 45000,
            "seeds": [100, 101, 102, 103], "chosen": chosen}  # fmt: skip


def normalised(card: str) -> str:
    """The card's prose with line breaks folded, so sentences can be matched whole."""
    return re.sub(r"\s+", " ", card)


@pytest.fixture(scope="module")
def cards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Rendered cards: the default and quick profiles trained on the CPU, gpu_fast on CUDA."""
    out = {}
    for profile, device in (("default", "cpu"), ("quick", "cpu"), ("gpu_fast", "cuda")):
        params = profile_params(profile)
        out[profile] = model_card.render(
            params, synthetic_facts(params, tmp_path_factory.mktemp(profile), device)
        )
    return out


# Sentences that some profile makes false, and where they used to be fixed prose.
NEVER = ("never used for training or model selection", "about 3 points", "quality about 75")


def test_default_profile_sentences(cards: dict[str, str]) -> None:
    card = normalised(cards["default"])
    assert (
        "48,000 images of the training split trained the final model; a stratified hold-out of 2,000 others "
        "(seed 0) was scored after every epoch" in card
    )
    assert (
        "The raw network is under-confident on the validation split: a softmax temperature of 0.520, "
        "fitted on those 2,000 images after training" in card
    )
    assert "| softmax temperature (fitted on the validation split) | 0.520 |" in card
    assert "| expected calibration error | 0.0113 (before temperature scaling: 0.1958) |" in card
    assert "| precision | bf16 autocast; batch norm on fp32 copies of the activations |" in card
    assert "The CIFAR-10 test split (10,000 images). How the knob values in `params.yaml` were chosen" in card
    assert "final model trained on 48,000 images and validated on a 2,000-image hold-out" in card
    assert "test set never read by the train stage, scored once per reported seed (this model: seed 0" in card
    assert "no validation split" not in card and "may have informed" not in card
    assert "| lookahead | True |" in card and "Muon" not in card
    assert "warm-up over 23% of the steps, linear decay to 0.07" in card


def test_quick_profile_sentences(cards: dict[str, str]) -> None:
    card = normalised(cards["quick"])
    assert (
        "4,500 images of a stratified subset of the training split trained the final model; a stratified "
        "hold-out of 500 others (seed 0)" in card
    )
    assert "fitted on those 500 images" in card
    assert "A stratified subset of the CIFAR-10 test split (2,000 images)." in card
    assert "on the first 500 test images" in card
    assert "| epochs | 4.0 (598 steps) |" in card and "| batch size | 256 |" in card


def test_gpu_fast_profile_sentences(cards: dict[str, str]) -> None:
    card = normalised(cards["gpu_fast"])
    assert "The final model trained on all 50,000 training images; there is no validation split." in card
    assert "No temperature scaling (no validation split)" in card
    assert "| softmax temperature | none (no temperature scaling: no validation split) |" in card
    assert "| expected calibration error | 0.0113 |" in card
    assert (
        "fitted on" not in card and "stratified hold-out of" not in card and "before temperature" not in card
    )
    assert (
        "| precision | bf16 autocast; batch norm on the bf16 activations (fp32 parameters and statistics) |"
        in card
    )
    # No selection record: the card cannot say the knobs were chosen on anything but the test figures.
    assert (
        "How the knob values in `params.yaml` were chosen is not recorded in `metrics/`, so the test figures "
        "may have informed them; final model trained on all 50,000 training images; test set never read"
        in card
    )
    assert "| conv filters | Muon" in card and "no warm-up, linear decay to 0.0" in card


@pytest.mark.parametrize("profile", ["default", "quick", "gpu_fast"])
def test_no_fixed_prose_that_a_profile_makes_false(cards: dict[str, str], profile: str) -> None:
    card = normalised(cards[profile])
    for phrase in NEVER:
        assert phrase not in card, phrase
    assert "batch norm in fp32" not in card  # every profile here runs bf16 autocast
    assert not re.search(r"version \d", card)  # registry versions live in MLflow only
    assert "# CIFAR-10 classifier (`cifar10-classifier`)" in card
    assert "`models:/cifar10-classifier@champion`" in card
    assert "Python 3.12.3 and torch 2.13.0 (train stage), transformers 5.24.0 (saved the checkpoint)" in card


def test_knobs_chosen_on_a_hold_out_are_said_only_from_a_matching_record(tmp_path: Path) -> None:
    params = profile_params("gpu_fast")
    facts = synthetic_facts(params, tmp_path, "cuda")
    hp = params.train
    chosen = {"train.head_lr_scale": hp.head_lr_scale, "train.label_smoothing": hp.label_smoothing}
    facts["benchmark"] = {"select_gpu_fast": selection("gpu_fast", chosen)}
    card = normalised(model_card.render(params, facts))
    assert (
        "Knobs (`train.head_lr_scale`, `train.label_smoothing`) chosen on a 5,000-image stratified "
        "hold-out of the training split (`benchmark select`, `records/benchmark.json`); final model "
        "trained on all 50,000 training images; test set never read by the train stage, scored once per "
        "reported seed" in card
    )
    assert "may have informed" not in card
    # A record for other values, or for another profile, does not describe these knobs.
    for stale in (
        selection("gpu_fast", chosen | {"train.head_lr_scale": hp.head_lr_scale * 2}),
        selection("gpu_accurate", chosen),
        selection("gpu_fast", {"train.no_such_knob": 1}),
    ):
        facts["benchmark"] = {"select": stale}
        card = normalised(model_card.render(params, facts))
        assert "chosen on a" not in card and "so the test figures may have informed them" in card


def test_committed_selection_record_describes_gpu_fast(tmp_path: Path) -> None:
    """With the committed records/benchmark.json, the gpu_fast card names the knobs chosen on a hold-out."""
    committed = PROJECT_ROOT / BENCHMARK_RECORD
    records = json.loads(committed.read_text()) if committed.is_file() else {}
    params = profile_params("gpu_fast")
    if not model_card.selections_in_effect(params, records):
        pytest.skip("no knob-selection record in records/benchmark.json matches gpu_fast's params")
    facts = synthetic_facts(params, tmp_path, "cuda") | {"benchmark": records}
    card = normalised(model_card.render(params, facts))
    assert re.search(r"Knobs \(`train\.[^)]*\) chosen on a [\d,]+-image stratified hold-out", card)
    assert "final model trained on all 50,000 training images" in card


def card_sentences() -> Any:
    """The card's sentence macros (model_card_sentences.md.j2), callable one by one."""
    return template_environment().get_template("model_card_sentences.md.j2").module


def test_fp32_training_and_a_network_without_batch_norm(tmp_path: Path) -> None:
    say = card_sentences()
    assert say.precision_row("fp32", "fp32") == "fp32 (no autocast); batch norm in fp32"
    assert say.precision_row("bf16", None) == "bf16 autocast"  # e.g. a fine-tuned Hub checkpoint
    with pytest.raises(jinja2.UndefinedError):  # a batch-norm precision the card has no words for
        say.precision_row("bf16", "fp16")


def test_stale_temperature_facts_stop_the_card(tmp_path: Path) -> None:
    params = profile_params("default")
    facts = synthetic_facts(params, tmp_path, "cpu")
    no_split = copy.deepcopy(facts)
    no_split["train"]["temperature"] = None  # a train.json from a run without a validation split
    with pytest.raises(StaleMetricsError, match="stale"):
        model_card.render(params, no_split)
    other = copy.deepcopy(facts)
    other["eval"]["temperature"] = 0.7  # evaluate used another temperature than the train stage fitted
    with pytest.raises(StaleMetricsError, match="stale"):
        model_card.render(params, other)
    gpu = profile_params("gpu_fast")
    fitted = synthetic_facts(gpu, tmp_path / "gpu", "cuda")
    fitted["train"]["temperature"] = 0.5  # a temperature with no validation split to fit it on
    with pytest.raises(StaleMetricsError, match="stale"):
        model_card.render(gpu, fitted)
    unsaved = copy.deepcopy(facts)
    del unsaved["config"]["calibration_temperature"]  # a model saved without the fitted temperature
    with pytest.raises(StaleMetricsError, match=r"config\.json applies 1\.0"):
        model_card.render(params, unsaved)


# --- The card and the MLflow store's history ------------------------------------------------------------


def write_facts(root: Path, facts: dict) -> None:
    """The card's inputs as files in a project root (what `dvc repro` leaves there)."""
    for path, key in (
        (DATA_SOURCE, "source"),
        (VALIDATION_METRICS, "validation"),
        (TRAIN_METRICS, "train"),
        (EVAL_METRICS, "eval"),
        (EMISSIONS_METRICS, "emissions"),
        (BENCHMARK_RECORD, "benchmark"),
        (MODEL_DIR / "config.json", "config"),
    ):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(json.dumps(facts[key], indent=2) + "\n")


@pytest.mark.slow
def test_card_is_byte_identical_whatever_the_mlflow_history(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    write_facts(project, synthetic_facts(validate_params(raw), tmp_path, "cpu"))
    cards = []
    for _ in fresh_and_history_stores(tmp_path, monkeypatch):
        model_card.main()
        cards.append((project / MODEL_CARD).read_bytes())
    assert cards[0] == cards[1]
    assert b"models:/cifar10-classifier@champion" in cards[0]


# --- The front matter as the Hugging Face Hub reads it ----------------------------------------------------


def model_index_figures(card: ModelCard) -> dict[tuple[str, str], float]:
    """Each eval result of the parsed card as (metric type, averaging) -> value."""
    return {
        (result.metric_type, (result.metric_args or {}).get("average", "")): result.metric_value
        for result in card.data.eval_results or []
    }


def assert_model_index_matches(card: ModelCard, evaluation: dict, dataset_name: str) -> None:
    """The card's model-index holds exactly the headline test figures of ``evaluation`` (eval.json)."""
    assert card.data.model_name == "cifar10-classifier"
    assert model_index_figures(card) == {
        ("accuracy", ""): evaluation["accuracy"],
        ("f1", "macro"): evaluation["f1_macro"],
    }
    for result in card.data.eval_results:
        assert (result.task_type, result.dataset_type, result.dataset_split) == (
            "image-classification",
            "uoft-cs/cifar10",
            "test",
        )
        assert result.dataset_name == dataset_name


def test_written_card_loads_with_the_hubs_parser_and_holds_eval_json(project: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    write_facts(project, synthetic_facts(validate_params(raw), tmp_path, "cpu"))
    model_card.main()
    card = ModelCard.load(project / MODEL_CARD)
    evaluation = json.loads((project / EVAL_METRICS).read_text())
    assert_model_index_matches(card, evaluation, "CIFAR-10 (JPEG-derived mirror)")
    assert card.data.to_dict() | {"model-index": None} == {
        "datasets": ["uoft-cs/cifar10"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "metrics": ["accuracy", "f1"],
        "pipeline_tag": "image-classification",
        "model-index": None,
    }
    assert card.text.startswith("\n# CIFAR-10 classifier (`cifar10-classifier`)\n")
    assert str(card) == (project / MODEL_CARD).read_text()  # the file is what the parser writes back


def test_model_index_names_the_data_the_figures_come_from(cards: dict[str, str], tmp_path: Path) -> None:
    quick = ModelCard(cards["quick"])
    names = {result.dataset_name for result in quick.data.eval_results}
    assert names == {"CIFAR-10 (JPEG-derived mirror; stratified subset of 2,000 test images)"}
    params = profile_params("default")
    facts = synthetic_facts(params, tmp_path, "cpu")
    facts["source"] = {"source": "hub", "location": "uoft-cs/cifar10"}  # the original pixels
    card = ModelCard(model_card.render(params, facts))
    assert_model_index_matches(card, facts["eval"], "CIFAR-10")


def eval_result_mutations(card: ModelCard, evaluation: dict) -> dict[str, ModelCard]:
    """Copies of ``card`` whose model-index is wrong in one way each, written out and parsed again."""
    results = card.data.eval_results
    wrong_f1 = copy.deepcopy(results)
    wrong_f1[1].metric_value = evaluation["f1_weighted"]
    rounded = copy.deepcopy(results)
    rounded[0].metric_value = round(evaluation["accuracy"], 2)
    unaveraged = copy.deepcopy(results)
    unaveraged[1].metric_args = None
    other_split = copy.deepcopy(results)
    other_split[0].dataset_split = "train"
    variants = {
        "accuracy dropped": results[1:],
        "f1 dropped": results[:1],
        "f1 is the weighted one": wrong_f1,
        "accuracy rounded": rounded,
        "f1 without its averaging": unaveraged,
        "accuracy on another split": other_split,
        "an extra result": [*results, EvalResult(**{**vars(results[0]), "metric_type": "precision"})],
    }
    mutated = {}
    for name, eval_results in variants.items():
        copy_of_card = ModelCard(str(card))
        copy_of_card.data.eval_results = eval_results
        mutated[name] = ModelCard(str(copy_of_card))
    return mutated


def test_the_model_index_check_fails_for_every_wrong_eval_result(
    cards: dict[str, str], tmp_path: Path
) -> None:
    """Mutation check for assert_model_index_matches: each wrong model-index is caught."""
    params = profile_params("default")
    evaluation = synthetic_facts(params, tmp_path, "cpu")["eval"]
    card = ModelCard(cards["default"])
    assert_model_index_matches(card, evaluation, "CIFAR-10 (JPEG-derived mirror)")
    missed = []
    for name, mutated in eval_result_mutations(card, evaluation).items():
        try:
            assert_model_index_matches(mutated, evaluation, "CIFAR-10 (JPEG-derived mirror)")
        except AssertionError:
            continue
        missed.append(name)
    assert not missed, f"wrong model-index not caught: {missed}"


def test_a_missing_fact_stops_the_card(tmp_path: Path) -> None:
    """The template is strict: a fact it quotes but the metrics lack is an error, not an empty cell."""
    params = profile_params("default")
    facts = synthetic_facts(params, tmp_path, "cpu")
    # Printed as is by the template alone (a number it formats fails even without StrictUndefined).
    del facts["validation"]["failed"]
    with pytest.raises(jinja2.UndefinedError, match="'failed'"):
        model_card.render(params, facts)


def test_card_of_a_fine_tuned_hub_checkpoint_reads_no_builtin_config_keys(tmp_path: Path) -> None:
    """Outside the registry's description the card uses only keys every transformers config has."""
    raw = default_raw_params()
    raw["train"]["model"] = model_card.PARENT_MODEL
    raw["preprocess"]["val_size"] = 0
    params = validate_params(raw)
    facts = synthetic_facts(profile_params("gpu_fast"), tmp_path, "cuda")  # no validation split either
    builtin_config = facts["config"]
    facts["config"] = {
        "model_type": "vit",
        "architectures": ["ViTForImageClassification"],
        "id2label": builtin_config["id2label"],
        "image_mean": builtin_config["image_mean"],
        "image_std": builtin_config["image_std"],
        "transformers_version": builtin_config["transformers_version"],
    }
    facts["train"]["batchnorm_precision"] = None  # no FrozenScaleBatchNorm in a Hub ViT
    facts["train"].update(registry_facts(model_card.PARENT_MODEL, facts["config"]))
    card = normalised(model_card.render(params, facts))
    assert (
        "- **Model type:** `vit` image classifier fine-tuned from `google/vit-base-patch16-224-in21k`."
        in card
    )
    assert "- **Parent model:** `google/vit-base-patch16-224-in21k` - **Parameters:**" in card
    assert "`ViTForImageClassification` (model_type `vit`)" in card
    assert "| optimiser | AdamW |" in card and "| test-time augmentation | level 0 " in card
