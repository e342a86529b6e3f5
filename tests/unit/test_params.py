"""params.yaml (composed from conf/) is validated on load: bad keys, values and profiles fail clearly."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

from cifar10_pipeline.core.params import ParamsError, compose, load_params, validate_params

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


@pytest.mark.parametrize("profile", ["default", "quick", "gpu_fast", "gpu_accurate"])
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

    results = read_results(PROJECT_ROOT / "metrics" / "benchmark.json")
    return [(name, e) for name, e in results.items() if e.kind == "selection"]


@pytest.mark.parametrize(("name", "selection"), _selections(), ids=[name for name, _ in _selections()])
def test_profile_holds_the_values_chosen_on_validation(raw: dict, name: str, selection) -> None:
    """A profile's swept knobs are what `benchmark select` chose on the hold-out, never hand-picked."""
    params = validate_params(compose([f"profile={selection.profile}"], CONF))
    for key, chosen in selection.chosen.items():
        section, _, field = key.partition(".")
        value = getattr(params, section if section != "validate" else "validate_").model_dump()[field]
        assert value == chosen, (
            f"conf/profile/{selection.profile}.yaml {key} is {value}, {name} chose {chosen}"
        )
