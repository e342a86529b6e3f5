"""Typed, validated view of ``params.yaml``, which Hydra composes from ``conf/`` (DVC's Hydra composition).

Each stage asks for its own section (``load_params().train``) of params.yaml as it is on disk: profiles are
resolved before any stage runs, when ``dvc exp run -S profile=NAME`` (or :func:`compose`, for the benchmark)
composes conf/, so a stage depends only on the values it reads. Every key is validated, so a typo or a bad
value fails before any work is done, with a message that names the key and the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cifar10_pipeline.core.paths import CONF_DIR, CONFIG_NAME, PARAMS_FILE

SourceName = Literal["mirror", "hub", "url"]
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
        # Whether filter_optimizer: muon fits train.model is the architecture's recipe's business: checked
        # by modeling/architectures.py when the model is built.
        if self.vit_dim % self.vit_heads:
            raise ValueError(f"vit_dim ({self.vit_dim}) must be a multiple of vit_heads ({self.vit_heads})")
        return self


class EvaluateParams(_Section):
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "bf16", "fp32"]
    batch_size: PositiveInt
    robustness_images: PositiveInt
    calibration_bins: Annotated[int, Field(ge=2, le=100)]
    gallery_per_class: Annotated[int, Field(ge=1, le=16)]


class EmissionsParams(_Section):
    country_iso_code: str = Field(pattern=r"^[A-Z]{3}$")


class MlflowParams(_Section):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)


class TrackingParams(_Section):
    # true: a stage whose MLflow server (MLFLOW_TRACKING_URI) does not answer stops before any compute;
    # false: it logs to the local store instead and says how to copy the runs to the server later.
    required: bool = Field(strict=True)


class Params(_Section):
    profile: str
    download: DownloadParams
    validate_: ValidateParams = Field(alias="validate")
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    emissions: EmissionsParams
    mlflow: MlflowParams
    tracking: TrackingParams

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def as_flat_dict(self) -> dict[str, Any]:
        """Values as ``section.key`` pairs (for MLflow)."""
        flat: dict[str, Any] = {"profile": self.profile}
        for section in ("download", "validate", "preprocess", "train", "evaluate", "emissions"):
            for key, value in self.model_dump(by_alias=True)[section].items():
                flat[f"{section}.{key}"] = value
        return flat


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Check every key and value of a params mapping; the error names each bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = ".".join(str(part) for part in error["loc"])
            problems.append(f"  {location}: {error['msg']} (got {error.get('input')!r})")
        raise ParamsError(
            f"{source} (profile {raw.get('profile')!r}) is invalid:\n" + "\n".join(problems) + "\n"
            f"Fix the value(s) above; every key is documented in {CONF_DIR / CONFIG_NAME}.yaml."
        ) from None


def compose(overrides: Sequence[str] = (), conf_dir: str | Path = CONF_DIR) -> dict[str, Any]:
    """conf/ composed by Hydra with ``overrides`` (``profile=quick``, ``train.epochs=12``), exactly as
    ``dvc exp run -S ...`` composes params.yaml (dvc.utils.hydra.compose_and_dump): the benchmark and the
    pipeline resolve params through this one code path, so an explicit override always wins over a profile."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    conf_dir = Path(conf_dir).resolve()
    if not (conf_dir / f"{CONFIG_NAME}.yaml").is_file():
        raise ParamsError(
            f"{conf_dir / CONFIG_NAME}.yaml not found: run from the project root (where dvc.yaml is)."
        )
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
            config = hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
        OmegaConf.resolve(config)
    except (HydraException, OmegaConfBaseException) as exc:
        profiles = sorted(path.stem for path in (conf_dir / "profile").glob("*.yaml"))
        raise ParamsError(
            f"cannot compose {conf_dir.name}/ with overrides {list(overrides)}: {exc}\n"
            "Overrides look like section.key=value (train.epochs=12) or profile=NAME, "
            f"NAME one of {profiles}."
        ) from None
    return OmegaConf.to_container(config)  # type: ignore[return-value]


def composed_yaml(overrides: Sequence[str] = (), conf_dir: str | Path = CONF_DIR) -> str:
    """params.yaml's text for ``overrides``, byte for byte what DVC's Hydra composition writes."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.create(compose(overrides, conf_dir)))


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml`` (each stage's only source of configuration)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path} not found: run the pipeline from the project root (where dvc.yaml is).")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return validate_params(raw, source=str(path))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cifar10_pipeline.core.params [OVERRIDE ...] [--check]``: write (or check) params.yaml as
    conf/ composes it, for plain ``dvc repro`` after editing conf/ by hand (``dvc exp run`` does this
    itself)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cifar10_pipeline.core.params", description=main.__doc__)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=quick train.epochs=12")
    parser.add_argument("--check", action="store_true", help="exit 1 if params.yaml differs; write nothing")
    args = parser.parse_args(argv)
    text = composed_yaml(args.overrides)
    validate_params(yaml.safe_load(text), source=f"{CONF_DIR}/ composed with {args.overrides}")
    if args.check:
        current = PARAMS_FILE.read_text() if PARAMS_FILE.is_file() else ""
        if current != text:
            print(
                f"{PARAMS_FILE} is not what {CONF_DIR}/ composes: "
                "run `python -m cifar10_pipeline.core.params`"
            )
            return 1
        print(f"{PARAMS_FILE} matches {CONF_DIR}/")
        return 0
    from cifar10_pipeline.core.data import atomic_output

    with atomic_output(PARAMS_FILE) as staged:  # a killed rewrite leaves the old params.yaml whole
        staged.write_text(text)
    print(f"wrote {PARAMS_FILE} from {CONF_DIR}/ with {args.overrides or 'no overrides'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
