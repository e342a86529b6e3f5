"""params.yaml (composed from conf/) is validated on load: bad keys, values and profiles fail clearly."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from cifar10_pipeline.core.params import (
    MIN_IMAGES_PER_CLASS,
    MIN_SPLIT_IMAGES,
    ParamsError,
    compose,
    did_you_mean,
    load_params,
    validate_params,
)

from ..conftest import PROJECT_ROOT

CONF = PROJECT_ROOT / "conf"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def test_committed_params_are_valid(raw: dict) -> None:
    params = validate_params(copy.deepcopy(raw))
    assert params.profile == "default"
    assert params.train.model == "cifar_convnet"
    assert params.preprocess.max_train_images is None


def _profile_file(profile: str) -> dict:
    return yaml.safe_load((CONF / "profile" / f"{profile}.yaml").read_text()) or {}


@pytest.mark.parametrize("profile", ["default", "quick", "gpu_fast", "gpu_accurate", "parent_vit"])
def test_every_profile_composes_to_valid_params(profile: str) -> None:
    params = validate_params(compose([f"profile={profile}"], CONF), source=f"profile {profile}")
    assert params.profile == profile, f"conf/profile/{profile}.yaml must set profile: {profile}"
    for section, overrides in _profile_file(profile).items():
        if section == "profile":
            continue
        for key, value in overrides.items():
            assert params.model_dump(by_alias=True)[section][key] == value, f"{profile}: {section}.{key}"


def test_quick_profile_overrides_only_what_it_names(raw: dict) -> None:
    quick = compose(["profile=quick"], CONF)
    named = _profile_file("quick")
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                if key not in named.get(section, {}):
                    assert quick[section][key] == value, f"quick changed {section}.{key}"


def test_unknown_key_is_named(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["train"]["epocs"] = 3
    with pytest.raises(ParamsError, match=r"train\.epocs"):
        validate_params(changed)


def test_missing_keys_are_named_concisely(raw: dict) -> None:
    """Before: each missing key's message held its whole section's repr (about 1,000 characters for train)."""
    changed = copy.deepcopy(raw)
    del changed["train"]["lr"], changed["train"]["epochs"], changed["evaluate"]
    with pytest.raises(ParamsError) as failure:
        validate_params(changed)
    assert str(failure.value).splitlines()[1:] == [
        "  train: missing required key(s) epochs, lr",
        "  missing required section(s) evaluate",
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("train", "epochs", -1, "train.epochs"),
        ("train", "device", "tpu", "train.device"),
        ("train", "widths", [64, 256], "train.widths"),
        ("preprocess", "val_size", -5, "preprocess.val_size"),
        ("download", "sources", ["ftp"], "download.sources"),
        ("download", "url_md5", "not-a-hash", "download.url_md5"),
        ("emissions", "country_iso_code", "usa", "emissions.country_iso_code"),
    ],
)
def test_invalid_value_is_named(raw: dict, section: str, key: str, value: object, fragment: str) -> None:
    changed = copy.deepcopy(raw)
    changed[section][key] = value
    with pytest.raises(ParamsError, match=fragment.replace(".", r"\.")):
        validate_params(changed)


def test_val_size_must_fit_the_subset(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["preprocess"].update(max_train_images=100, val_size=100)
    with pytest.raises(ParamsError, match="val_size"):
        validate_params(changed)


def test_unknown_profile_lists_the_choices() -> None:
    with pytest.raises(ParamsError, match="quick"):
        compose(["profile=fastest"], CONF)


def test_profile_setting_an_unknown_key_fails(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    quick = conf / "profile" / "quick.yaml"
    quick.write_text(quick.read_text() + "  learning_rate: 1.0\n")  # an unknown key under its last section
    with pytest.raises(ParamsError, match="learning_rate"):
        validate_params(compose(["profile=quick"], conf))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def _selections() -> list[tuple[str, object]]:
    from cifar10_pipeline.reporting.benchmark_records import read_results

    results = read_results(PROJECT_ROOT / "records" / "benchmark.json")
    return [(name, e) for name, e in results.items() if e.kind == "selection"]


@pytest.mark.parametrize(("name", "selection"), _selections(), ids=[name for name, _ in _selections()])
def test_profile_holds_the_values_chosen_on_validation(raw: dict, name: str, selection) -> None:
    """A profile's swept knobs are what `benchmark select` chose on the hold-out, never hand-picked."""
    params = validate_params(compose([f"profile={selection.profile}"], CONF))
    for key, chosen in selection.chosen.items():
        section, _, field = key.partition(".")
        value = getattr(params, section if section != "validate" else "validation").model_dump()[field]
        assert value == chosen, (
            f"conf/profile/{selection.profile}.yaml {key} is {value}, {name} chose {chosen}"
        )


# --- cross-field checks, strict values, typos (issue 17) -------------------------------------------------


def _invalid(raw: dict, section: str, **values: object) -> str:
    changed = copy.deepcopy(raw)
    changed[section].update(values)
    with pytest.raises(ParamsError) as error:
        validate_params(changed)
    return str(error.value)


@pytest.mark.reliability(
    "preprocess.max_test_images: 5 (fewer test images than classes)",
    "params validation names preprocess.max_test_images and the minimum (100, 10 per class), before any "
    "work, instead of a scikit-learn error about train_size",
)
def test_too_few_test_images_name_the_key(raw: dict) -> None:
    message = _invalid(raw, "preprocess", max_test_images=5)
    assert "the test split would keep 5 images (preprocess.max_test_images: 5, of 10000)" in message
    assert f"at least {MIN_SPLIT_IMAGES} ({MIN_IMAGES_PER_CLASS} per class)" in message
    assert "train_size" not in message


@pytest.mark.reliability(
    "preprocess.val_size at or above the training split without max_train_images",
    "refused by params validation, naming preprocess.val_size and the training images kept",
)
@pytest.mark.parametrize("val_size", [50_000, 60_000])
def test_val_size_must_fit_the_whole_training_split(raw: dict, val_size: int) -> None:
    message = _invalid(raw, "preprocess", val_size=val_size, max_train_images=None)
    assert (
        f"preprocess.val_size ({val_size}) must be smaller than the 50000 training images kept "
        "(preprocess.max_train_images: null, the whole split)"
    ) in message


@pytest.mark.reliability(
    "a split left with fewer than 10 images per class (train after the hold-out, or the hold-out itself)",
    "refused by params validation with the keys to change",
)
@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"val_size": 49_950}, "the train split would keep 50 images"),
        ({"max_train_images": 1000, "val_size": 950}, "the train split would keep 50 images"),
        ({"val_size": 50}, "preprocess.val_size (50) holds out too few images: use 0"),
    ],
)
def test_every_split_keeps_the_minimum_per_class(raw: dict, values: dict, fragment: str) -> None:
    assert fragment in _invalid(raw, "preprocess", **values)


def test_split_minimum_boundary(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["preprocess"].update(max_train_images=2 * MIN_SPLIT_IMAGES, val_size=MIN_SPLIT_IMAGES)
    changed["preprocess"]["max_test_images"] = MIN_SPLIT_IMAGES
    validate_params(changed)  # exactly the minimum everywhere is fine
    changed["preprocess"]["max_test_images"] = MIN_SPLIT_IMAGES - 1
    with pytest.raises(ParamsError, match=r"preprocess\.max_test_images"):
        validate_params(changed)


@pytest.mark.reliability(
    "train.epochs: .inf, .nan, true or '3'; tta_level: true; flip: 1",
    "refused by params validation (strict, finite types), naming the key and the value",
)
@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("epochs", float("inf"), "Input should be a finite number (got inf)"),
        ("epochs", float("nan"), "Input should be a finite number (got nan)"),
        ("epochs", True, "Input should be a valid number (got True)"),
        ("epochs", "3", "Input should be a valid number (got '3')"),
        ("lr", float("inf"), "Input should be a finite number"),
        ("tta_level", True, "Input should be a valid integer (got True)"),
        ("tta_level", 3, "Input should be less than or equal to 2 (got 3)"),
        ("flip", 1, "Input should be a valid boolean (got 1)"),
    ],
)
def test_values_are_strict_and_finite(raw: dict, key: str, value: object, message: str) -> None:
    assert f"train.{key}: {message}" in _invalid(raw, "train", **{key: value})


def test_whole_numbers_stay_valid_for_float_keys(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["train"].update(epochs=13, lr=11)  # YAML ints for float params are fine, as before
    assert validate_params(changed).train.epochs == 13


@pytest.mark.reliability(
    "a typo in a key that the active profile also sets (train.epoch, profile quick)",
    "reported as the unknown key train.epoch with 'did you mean train.epochs?', not blamed on the profile",
)
def test_typo_of_a_profile_key_is_an_unknown_key(tmp_path: Path) -> None:
    # In params.yaml, as a user editing it by hand (or +train.epoch=3) gets it:
    params = compose(["profile=quick", "+train.epoch=3"], CONF)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ParamsError) as error:
        load_params(tmp_path / "params.yaml")
    assert str(error.value) == (
        f"{tmp_path / 'params.yaml'} is invalid:\n  train.epoch: unknown key (did you mean train.epochs?)"
    )  # the key, the hint, and no word of the profile
    # As an override (dvc exp run -S profile=quick -S train.epoch=3):
    with pytest.raises(ParamsError) as error:
        compose(["profile=quick", "train.epoch=3"], CONF)
    assert str(error.value).startswith("unknown key train.epoch in the overrides")
    assert "(did you mean train.epochs?)" in str(error.value)


@pytest.mark.parametrize(
    ("dotted", "guess"),
    [
        ("train.epoch", "train.epochs"),
        ("trian.epochs", "train.epochs"),
        ("preprocess.valsize", "preprocess.val_size"),
        ("download.mirror", "download.mirror_dir"),
        ("train.zzzz", None),
        ("profil", "profile"),
    ],
)
def test_did_you_mean(dotted: str, guess: str | None) -> None:
    assert did_you_mean(dotted) == guess


def test_unknown_section_gets_a_hint(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["trian"] = changed.pop("train")
    with pytest.raises(ParamsError) as error:
        validate_params(changed)
    assert "trian: unknown key (did you mean train?)" in str(error.value)
