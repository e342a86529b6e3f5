"""Typed, validated view of ``params.yaml``: the project's single owner of configuration.

Each stage asks for its own section (``load_params().train``). The active ``profile``'s overrides are merged
first, then every key is validated, so a typo or a bad value fails before any work is done, with a message
that names the key and the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cifar10_pipeline.core.paths import PARAMS_FILE

SourceName = Literal["mirror", "hub", "url"]
# Networks this project defines and trains from scratch; any other train.model is a checkpoint to fine-tune.
BUILTIN_MODELS = ("cifar_convnet", "cifar_vit")
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class ParamsError(ValueError):
    """params.yaml is missing, malformed, or holds an unknown key or an invalid value."""


class _Section(BaseModel):
    # extra="forbid": an unknown key is a typo until proven otherwise.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DownloadParams(_Section):
    sources: list[SourceName] = Field(min_length=1)
    mirror_dir: str | None
    hub_repo: str
    hub_revision: str
    url: str
    url_md5: str = Field(pattern=r"^[0-9a-f]{32}$")


class ValidateParams(_Section):
    class_share_tolerance: Fraction
    channel_stat_tolerance: Annotated[float, Field(gt=0.0, le=0.5)]
    known_duplicates_train: Annotated[int, Field(ge=0)]
    known_duplicates_test: Annotated[int, Field(ge=0)]
    known_train_test_overlap: Annotated[int, Field(ge=0)]


class PreprocessParams(_Section):
    seed: int
    val_size: Annotated[int, Field(ge=0)]
    max_train_images: PositiveInt | None
    max_test_images: PositiveInt | None

    @model_validator(mode="after")
    def _val_fits(self) -> PreprocessParams:
        if self.max_train_images is not None and self.val_size >= self.max_train_images:
            raise ValueError(
                f"val_size ({self.val_size}) must be smaller than max_train_images ({self.max_train_images})"
            )
        return self


class TrainParams(_Section):
    model: str = Field(min_length=1)
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    epochs: Annotated[float, Field(gt=0)]
    batch_size: PositiveInt
    lr: Annotated[float, Field(gt=0)]
    momentum: Annotated[float, Field(ge=0, lt=1)]
    weight_decay: Annotated[float, Field(ge=0)]
    bias_lr_scale: Annotated[float, Field(gt=0)]
    head_lr_scale: Annotated[float, Field(gt=0)]
    filter_optimizer: Literal["sgd", "muon"]
    muon_lr: Annotated[float, Field(gt=0)]
    muon_momentum: Annotated[float, Field(ge=0, lt=1)]
    label_smoothing: Annotated[float, Field(ge=0, lt=1)]
    warmup_fraction: Fraction
    final_lr_fraction: Fraction
    whiten_bias_epochs: Annotated[float, Field(ge=0)]
    lookahead: bool
    translate: Annotated[int, Field(ge=0, le=8)]
    flip: bool
    tta_level: Literal[0, 1, 2]
    precision: Literal["auto", "bf16", "fp32"]
    # torch.compile: false, or a mode ("default", "reduce-overhead" = with CUDA graphs, "max-autotune").
    compile: Literal[False, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
    cuda_graphs: bool
    cutout: Annotated[int, Field(ge=0, le=32)]
    widths: list[PositiveInt] = Field(min_length=3, max_length=3)
    extra_convs: Annotated[int, Field(ge=0, le=4)]
    adamw_lr: Annotated[float, Field(gt=0)]
    adamw_weight_decay: Annotated[float, Field(ge=0)]
    vit_dim: PositiveInt
    vit_depth: PositiveInt
    vit_heads: PositiveInt
    vit_mlp_ratio: Annotated[float, Field(gt=0)]
    finetune_image_size: PositiveInt

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        if self.cuda_graphs and self.compile in ("reduce-overhead", "max-autotune"):
            raise ValueError(
                f"cuda_graphs captures the whole step itself; combine it with compile: false, default or "
                f"max-autotune-no-cudagraphs, not {self.compile!r} (which makes CUDA graphs of its own)"
            )
        if self.filter_optimizer == "muon" and self.model != "cifar_convnet":
            raise ValueError(
                f"filter_optimizer: muon is part of the cifar_convnet recipe; {self.model!r} trains with "
                "AdamW (set filter_optimizer: sgd)"
            )
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim ({self.vit_dim}) must be a multiple of vit_heads ({self.vit_heads})")
        return self

    @property
    def is_builtin_model(self) -> bool:
        return self.model in BUILTIN_MODELS


class EvaluateParams(_Section):
    batch_size: PositiveInt
    robustness_images: PositiveInt
    calibration_bins: Annotated[int, Field(ge=2, le=100)]
    gallery_per_class: Annotated[int, Field(ge=1, le=16)]


class EmissionsParams(_Section):
    country_iso_code: str = Field(pattern=r"^[A-Z]{3}$")


class MlflowParams(_Section):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)


class Params(_Section):
    profile: str
    download: DownloadParams
    validate_: ValidateParams = Field(alias="validate")
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    emissions: EmissionsParams
    mlflow: MlflowParams
    profiles: dict[str, dict[str, dict[str, Any]]]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("profiles")
    @classmethod
    def _profiles_name_sections(cls, profiles: dict[str, dict[str, dict[str, Any]]]) -> dict:
        stages = {"download", "validate", "preprocess", "train", "evaluate", "emissions", "mlflow"}
        for name, overrides in profiles.items():
            unknown = set(overrides) - stages
            if unknown:
                raise ValueError(f"profile {name!r} overrides unknown section(s) {sorted(unknown)}")
        return profiles

    def as_flat_dict(self) -> dict[str, Any]:
        """Effective values as ``section.key`` pairs (for MLflow), profiles themselves left out."""
        flat: dict[str, Any] = {"profile": self.profile}
        for section in ("download", "validate", "preprocess", "train", "evaluate", "emissions"):
            for key, value in self.model_dump(by_alias=True)[section].items():
                flat[f"{section}.{key}"] = value
        return flat


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    """Apply the active profile's overrides to ``raw`` and validate the result."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    profile = raw.get("profile", "default")
    profiles = raw.get("profiles") or {}
    if profile not in profiles:
        raise ParamsError(
            f"{source}: profile {profile!r} is not defined; choose one of {sorted(profiles)} "
            f"(e.g. dvc exp run -S profile=quick)"
        )
    # Check every profile, not only the active one: a typo should not wait until someone switches to it.
    for name, profile_overrides in profiles.items():
        if not isinstance(profile_overrides or {}, dict):
            raise ParamsError(f"{source}: profiles.{name} must be a mapping of section -> keys")
        unknown_keys = [
            f"{section}.{key}"
            for section, keys in (profile_overrides or {}).items()
            if isinstance(keys, dict) and isinstance(raw.get(section), dict)
            for key in keys
            if key not in raw[section]
        ]
        if unknown_keys:
            unknown = ", ".join(unknown_keys)
            raise ParamsError(f"{source}: profiles.{name} overrides unknown key(s): {unknown}")
    overrides = profiles[profile] or {}
    effective = _merge({k: v for k, v in raw.items() if k != "profiles"}, overrides)
    effective["profiles"] = profiles
    try:
        return Params.model_validate(effective)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = ".".join(str(part) for part in error["loc"])
            problems.append(f"  {location}: {error['msg']} (got {error.get('input')!r})")
        raise ParamsError(
            f"{source} (profile {profile!r}) is invalid:\n" + "\n".join(problems) + "\n"
            "Fix the value(s) above; every key is documented in params.yaml."
        ) from None


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read, merge the active profile into, and validate ``params.yaml``."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the pipeline from the project root (where dvc.yaml is).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return resolve(raw, source=str(path))
