"""Typed, validated view of ``params.yaml``, which Hydra composes from ``conf/`` (DVC's Hydra composition).

Each stage asks for its own section (``load_params().train``) of params.yaml as it is on disk: profiles are
resolved before any stage runs, when ``dvc exp run -S profile=NAME`` (or :func:`compose`, for the benchmark)
composes conf/, so a stage depends only on the values it reads. Every key is validated, so a typo or a bad
value fails before any work is done, with a message that names the key and the file.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cifar10_pipeline import NUM_CLASSES
from cifar10_pipeline.core.errors import PipelineError, add_debug_flag, user_errors
from cifar10_pipeline.core.paths import CONF_DIR, CONFIG_NAME, PARAMS_FILE

SourceName = Literal["mirror", "hub", "url"]
PositiveInt = Annotated[int, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]

# Every split the preprocess stage makes (train; val when val_size > 0; test) keeps at least this many images
# of each class. Fixed, not a param: at 10 per class (100 images) a stratified split's rounding moves a
# class's share of the split by under 1/100, inside validate.class_share_tolerance's 0.02, and per-class
# metrics still rest on more than one or two images. Smaller splits are refused with the keys to change.
MIN_IMAGES_PER_CLASS = 10
MIN_SPLIT_IMAGES = MIN_IMAGES_PER_CLASS * NUM_CLASSES


class ParamsError(PipelineError, ValueError):
    """params.yaml is missing, malformed, or holds an unknown key or an invalid value."""


# extra="forbid": an unknown key is a typo until proven otherwise. strict: no silent coercion (``epochs:
# true`` is not 1 epoch, ``"3"`` is not 3); allow_inf_nan=False: ``.inf`` and ``.nan`` are not numbers here.
_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _Section(BaseModel):
    model_config = _STRICT


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
    # The raw splits' exact row counts (CIFAR-10: 50,000 and 10,000), each a multiple of the 10 classes:
    # validate checks the data against them, so a smaller real mirror (tests, a trial) states its own.
    train_images: PositiveInt
    test_images: PositiveInt

    @model_validator(mode="after")
    def _whole_classes(self) -> ValidateParams:
        for split, size in self.split_sizes().items():
            if size % NUM_CLASSES:
                raise ValueError(
                    f"validate.{split}_images ({size}) must be a multiple of the {NUM_CLASSES} classes "
                    "(every class the same number of images)"
                )
        return self

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.train_images, "test": self.test_images}


class PreprocessParams(_Section):
    seed: int
    val_size: Annotated[int, Field(ge=0)]
    max_train_images: PositiveInt | None
    max_test_images: PositiveInt | None


def planned_split_sizes(
    params: PreprocessParams, train_available: int, test_available: int
) -> dict[str, int]:
    """How many images each processed split gets from raw splits of the given sizes."""
    kept_train = min(params.max_train_images or train_available, train_available)
    return {
        "train": kept_train - params.val_size,
        "val": params.val_size,
        "test": min(params.max_test_images or test_available, test_available),
    }


def split_size_problems(params: PreprocessParams, train_available: int, test_available: int) -> list[str]:
    """What is wrong with the preprocess section for raw splits of these sizes: one sentence per problem,
    naming the keys (empty when every split keeps at least MIN_IMAGES_PER_CLASS images of each class)."""
    sizes = planned_split_sizes(params, train_available, test_available)
    kept_train = sizes["train"] + sizes["val"]
    cap = params.max_train_images if params.max_train_images is not None else "null, the whole split"
    kept = f"{kept_train} training images kept (preprocess.max_train_images: {cap})"
    least = f"at least {MIN_SPLIT_IMAGES} ({MIN_IMAGES_PER_CLASS} per class)"
    problems = []
    if params.val_size >= kept_train:
        problems.append(f"preprocess.val_size ({params.val_size}) must be smaller than the {kept}")
    elif sizes["train"] < MIN_SPLIT_IMAGES:
        problems.append(
            f"the train split would keep {sizes['train']} images: the {kept} minus preprocess.val_size "
            f"({params.val_size}); it needs {least}: raise preprocess.max_train_images or lower "
            "preprocess.val_size"
        )
    if 0 < params.val_size < MIN_SPLIT_IMAGES:
        problems.append(
            f"preprocess.val_size ({params.val_size}) holds out too few images: use 0 (no validation "
            f"split) or {least}"
        )
    if sizes["test"] < MIN_SPLIT_IMAGES:
        problems.append(
            f"the test split would keep {sizes['test']} images (preprocess.max_test_images: "
            f"{params.max_test_images if params.max_test_images is not None else 'null'}, of "
            f"{test_available}); it needs {least}: raise "
            "preprocess.max_test_images or set it to null (the whole split)"
        )
    return problems


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
    tta_level: Annotated[int, Field(ge=0, le=2)]  # 0, 1 or 2 (an int field: strict refuses true)
    # Selective TTA: the least confident fraction of held-out images sets the confidence below which an
    # image gets the TTA views (modeling/inference.py, fit_selective_tta); 1: every image gets them.
    tta_fraction: Annotated[float, Field(gt=0.0, le=1.0)]
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
    # Processes on this machine (torchrun, DDP; training/distributed.py); 1: a plain single process.
    nproc: PositiveInt
    checkpoint_every: Annotated[int, Field(ge=0)]  # epochs between resumable checkpoints; 0: none
    resume: bool  # continue from a checkpoint of this same run setup when one is there

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
    # params.yaml's `validate` section; not the attribute name: BaseModel.validate is a (deprecated) method.
    validation: ValidateParams = Field(alias="validate")
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    emissions: EmissionsParams
    mlflow: MlflowParams
    tracking: TrackingParams

    model_config = ConfigDict(**_STRICT, populate_by_name=True)

    @model_validator(mode="after")
    def _splits_fit(self) -> Params:
        # Against the raw split sizes validate expects; the preprocess stage checks again against the data.
        sizes = self.validation.split_sizes()
        problems = split_size_problems(self.preprocess, sizes["train"], sizes["test"])
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def as_flat_dict(self) -> dict[str, Any]:
        """Values as ``section.key`` pairs (for MLflow)."""
        flat: dict[str, Any] = {"profile": self.profile}
        for section in ("download", "validate", "preprocess", "train", "evaluate", "emissions"):
            for key, value in self.model_dump(by_alias=True)[section].items():
                flat[f"{section}.{key}"] = value
        return flat


def known_keys() -> dict[str, list[str]]:
    """Every params.yaml key: {section: [keys]}, top-level scalars (``profile``) under ``""``."""
    keys: dict[str, list[str]] = {"": []}
    for name, field in Params.model_fields.items():
        section = field.alias or name
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys[section] = list(annotation.model_fields)
        else:
            keys[""].append(section)
    return keys


def did_you_mean(dotted: str) -> str | None:
    """The known key closest to ``dotted`` (``train.epoch`` -> ``train.epochs``), or None."""
    keys = known_keys()
    section, _, key = dotted.rpartition(".")
    if section in keys and section:
        match = difflib.get_close_matches(key, keys[section], n=1, cutoff=0.6)
        return f"{section}.{match[0]}" if match else None
    candidates = [*keys[""], *(name for name in keys if name)]
    first = dotted.split(".", 1)[0]
    match = difflib.get_close_matches(first, candidates, n=1, cutoff=0.6)
    return match[0] + dotted[len(first) :] if match else None


def _describe(error: Mapping[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        guess = did_you_mean(location)
        hint = f" (did you mean {guess}?)" if guess else ""
        return f"  {location}: unknown key{hint}"
    if error["type"] == "value_error":  # a cross-field check of ours: its sentences name the keys
        return f"  {error['ctx']['error']}"
    return f"  {location}: {error['msg']} (got {error.get('input')!r})"


def validate_params(raw: Any, source: str = "params.yaml") -> Params:
    """Check every key and value of a params mapping; the error names each bad key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        # A missing key's "input" is its whole section (about 1,000 characters for train): name the keys.
        missing: dict[str, list[str]] = {}
        for error in errors:
            if error["type"] == "missing":
                *section, key = (str(part) for part in error["loc"])
                missing.setdefault(".".join(section), []).append(key)
        problems = [
            f"  {section}: missing required key(s) {', '.join(keys)}"
            if section
            else f"  missing required section(s) {', '.join(keys)}"
            for section, keys in missing.items()
        ]
        problems += [_describe(error) for error in errors if error["type"] != "missing"]
        raise ParamsError(
            f"{source} is invalid:\n" + "\n".join(problems),
            hint=f"fix the key(s) above; every key is documented in {CONF_DIR / CONFIG_NAME}.yaml",
        ) from None


_OVERRIDE_KEY = re.compile(r"Could not override '([^']+)'")


def compose(overrides: Sequence[str] = (), conf_dir: str | Path = CONF_DIR) -> dict[str, Any]:
    """conf/ composed by Hydra with ``overrides`` (``profile=quick``, ``train.epochs=12``), exactly as
    ``dvc exp run -S ...`` composes params.yaml (dvc.utils.hydra.compose_and_dump): the benchmark and the
    pipeline resolve params through this one code path, so an explicit override always wins over a profile."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    shown = Path(conf_dir)  # as given (conf/), for messages
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
        unknown = _OVERRIDE_KEY.search(str(exc))
        if unknown:  # a key that conf/ does not have: a typo, whatever the profile sets
            key = unknown.group(1)
            guess = did_you_mean(key)
            raise ParamsError(
                f"unknown key {key} in the overrides {list(overrides)}"
                + (f" (did you mean {guess}?)" if guess else "")
                + f" [Hydra: {str(exc).splitlines()[0]}]",
                hint=f"every key is documented in {shown / CONFIG_NAME}.yaml",
            ) from None
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
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with user_errors(args.debug):
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
    from cifar10_pipeline.core.io import atomic_output

    with atomic_output(PARAMS_FILE) as staged:  # a killed rewrite leaves the old params.yaml whole
        staged.write_text(text)
    print(f"wrote {PARAMS_FILE} from {CONF_DIR}/ with {args.overrides or 'no overrides'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
