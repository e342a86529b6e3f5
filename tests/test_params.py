"""params.yaml is validated on load: unknown keys, bad values and bad profiles fail with clear messages."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cifar10_pipeline.core.params import ParamsError, load_params, resolve

from .conftest import PROJECT_ROOT


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def test_committed_params_are_valid(raw: dict) -> None:
    params = resolve(copy.deepcopy(raw))
    assert params.profile == "default"
    assert params.train.is_builtin_model
    assert params.preprocess.max_train_images is None


@pytest.mark.parametrize("profile", ["quick", "gpu_fast", "gpu_accurate", "gpu_vit"])
def test_every_profile_resolves(raw: dict, profile: str) -> None:
    changed = copy.deepcopy(raw)
    changed["profile"] = profile
    params = resolve(changed)
    for section, overrides in raw["profiles"][profile].items():
        for key, value in overrides.items():
            assert (
                getattr(params, section if section != "validate" else "validate_").model_dump()[key] == value
            )


def test_quick_profile_overrides_only_what_it_names(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["profile"] = "quick"
    params = resolve(changed)
    assert params.preprocess.max_train_images == raw["profiles"]["quick"]["preprocess"]["max_train_images"]
    assert params.train.lr == raw["train"]["lr"]


def test_unknown_key_is_named(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["train"]["epocs"] = 3
    with pytest.raises(ParamsError, match=r"train\.epocs"):
        resolve(changed)


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
        resolve(changed)


def test_val_size_must_fit_the_subset(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["preprocess"].update(max_train_images=100, val_size=100)
    with pytest.raises(ParamsError, match="val_size"):
        resolve(changed)


def test_unknown_profile_lists_the_choices(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["profile"] = "fastest"
    with pytest.raises(ParamsError, match="quick"):
        resolve(changed)


def test_profile_overriding_an_unknown_key_fails(raw: dict) -> None:
    changed = copy.deepcopy(raw)
    changed["profiles"]["quick"]["train"]["learning_rate"] = 1.0
    with pytest.raises(ParamsError, match=r"train\.learning_rate"):
        resolve(changed)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "params.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def _selections() -> list[tuple[str, object]]:
    from cifar10_pipeline.benchmark import read_results

    results = read_results(PROJECT_ROOT / "metrics" / "benchmark.json")
    return [(name, e) for name, e in results.items() if e.kind == "selection"]


@pytest.mark.parametrize(("name", "selection"), _selections(), ids=[name for name, _ in _selections()])
def test_profile_holds_the_values_chosen_on_validation(raw: dict, name: str, selection) -> None:
    """A profile's swept knobs are what `benchmark select` chose on the hold-out, never hand-picked."""
    changed = copy.deepcopy(raw)
    changed["profile"] = selection.profile
    params = resolve(changed)
    for key, chosen in selection.chosen.items():
        section, _, field = key.partition(".")
        value = getattr(params, section if section != "validate" else "validate_").model_dump()[field]
        assert value == chosen, f"profiles.{selection.profile}.{key} is {value}, {name} chose {chosen}"
