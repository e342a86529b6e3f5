"""The built-in CIFAR-10 network, as a transformers model, and the one way every stage loads a model.

The network follows the published descriptions of the fastest CIFAR-10 training runs (Page's "How to train
your ResNet", hlb-CIFAR10, Jordan 2024 "94% on CIFAR-10 in 3.29 seconds"): a frozen first layer that whitens
2x2 patches (initialised from the training data), three conv groups of conv-pool-BN-GELU-conv-BN-GELU with
no residuals, a global max-pool and a linear head whose logits are scaled down. Written from those
descriptions for this project.

Because it is a ``PreTrainedModel`` registered with the Auto classes, evaluation, serving and the model card
load it exactly like a Hub checkpoint: ``AutoModelForImageClassification.from_pretrained(path)``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.core.paths import saved_model_dir
from cifar10_pipeline.modeling.pooling import max_pool2x2

# Per-channel statistics of the CIFAR-10 training split (pixel/255), from the data card.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
# The import that registers this package's model types with transformers' Auto classes.
REGISTERING_IMPORT = "import cifar10_pipeline.modeling"


def loading_hint(model_type: str) -> str:
    """What config.json says, beside its ``model_type``, about how to load it.

    transformers 5 has no way to register a model type from an installed package without importing it (no
    entry points; ``auto_map`` runs a .py file shipped with the checkpoint, and only with
    ``trust_remote_code=True``, which load_model never passes). Without the import, transformers answers
    "model type `cifar_convnet` ... Transformers does not recognize this architecture ... update
    Transformers", which cannot help; this key, and the model card, say what does."""
    return (
        f"model_type {model_type} is defined by the cifar10-pipeline package, not by transformers: install "
        f"it and run `{REGISTERING_IMPORT}` before AutoModelForImageClassification.from_pretrained or "
        "transformers.pipeline (that import registers the type; updating transformers does not help)"
    )


@strict
class CifarConvNetConfig(PreTrainedConfig):
    model_type = "cifar_convnet"

    num_channels: int = 3
    image_size: int = 32
    widths: list[int] | tuple[int, ...] = (64, 256, 256)
    extra_convs: int = 0  # residual conv-BN-GELU layers added at the end of each group
    whiten_kernel_size: int = 2
    # Fixed architecture constants (saved in config.json with the weights; not params, never tuned here).
    batchnorm_momentum: float = 0.6  # weight of the old running statistics (0.6 = fast-moving)
    logit_scale: float = 1 / 9  # small logits early on act like a temperature and speed up training
    image_mean: list[float] | tuple[float, ...] = CIFAR10_MEAN
    image_std: list[float] | tuple[float, ...] = CIFAR10_STD
    tta_level: int = 0  # test-time augmentation every consumer applies (see inference.py)
    # Divides the logits; fitted on the validation split after training (inference.calibration_temperature).
    calibration_temperature: float = 1.0
    loading_hint: str = loading_hint(model_type)  # saved in config.json for readers without the import

    def __post_init__(self, **kwargs):
        read_legacy_temperature(self, kwargs)
        self.widths = list(self.widths)
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        super().__post_init__(**kwargs)


class ConvGroup(nn.Module):
    """conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU (+ residual conv-BN-GELU layers)."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, extra_convs: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding="same", bias=False)
        self.norm1 = FrozenScaleBatchNorm(out_channels, bn_momentum)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding="same", bias=False)
        self.norm2 = FrozenScaleBatchNorm(out_channels, bn_momentum)
        self.act = nn.GELU()
        self.extra = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(out_channels, out_channels, 3, padding="same", bias=False),
                FrozenScaleBatchNorm(out_channels, bn_momentum),
                nn.GELU(),
            )
            for _ in range(extra_convs)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(max_pool2x2(self.conv1(x))))
        x = self.act(self.norm2(self.conv2(x)))
        for layer in self.extra:
            x = x + layer(x)
        return x


def batchnorm_on_activations(device_type: str) -> bool:
    """Whether FrozenScaleBatchNorm normalises the activations in their own dtype (True) or an fp32 copy."""
    return device_type == "cuda"


def batchnorm_precision(model: nn.Module, device: torch.device, precision: str) -> str | None:
    """What FrozenScaleBatchNorm normalises when run on ``device`` under ``precision`` autocast: "bf16" (the
    bf16 activations as they are), "fp32 copy" (fp32 copies of bf16 activations) or "fp32"; None when
    ``model`` has no such layer. Recorded by the train stage for the model card."""
    if not any(isinstance(m, FrozenScaleBatchNorm) for m in model.modules()):
        return None
    if precision != "bf16":
        return "fp32"
    return "bf16" if batchnorm_on_activations(device.type) else "fp32 copy"


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """Batch norm with a learned shift only: the scale stays 1 (the next conv can absorb any scale)."""

    def __init__(self, num_features: int, momentum: float):
        # torch's momentum is the weight of the *new* batch statistics.
        super().__init__(num_features, eps=1e-12, momentum=1 - momentum)
        self.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if batchnorm_on_activations(x.device.type):
            # The CUDA kernels take bf16 activations with fp32 parameters and statistics as they are and
            # accumulate in fp32, so no fp32 copy is made (that copy and the cast back cost two extra
            # passes over every activation, forward and backward).
            return super().forward(x)
        # On the CPU the statistics come from an fp32 copy: the CPU recipe (dvc repro's 90.8%) was tuned
        # and measured that way.
        return super().forward(x.float()).to(x.dtype)


@torch.no_grad()
def init_whitening(layer: nn.Conv2d, pixel_values: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a k x k conv to ZCA-like whitening of the training images' k x k patches.

    Eigenvectors of the patch covariance, scaled by 1/sqrt(eigenvalue), and their negations (so the GELU
    after it passes both signs). The layer's weights stay frozen afterwards.
    """
    k = layer.kernel_size[0]
    # One row per patch, ordered (channel, row, col): the layout of a conv weight's (C, k, k). Tensor.unfold
    # makes it one copy; F.unfold gives the same rows but launches a kernel per image on CUDA.
    windows = pixel_values.float().unfold(2, k, 1).unfold(3, k, 1)  # (N, C, H', W', k, k)
    patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, pixel_values.shape[1] * k * k)
    patches = patches - patches.mean(dim=0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    filters = eigenvectors.T / torch.sqrt(eigenvalues + eps)[:, None]
    filters = filters.reshape(-1, pixel_values.shape[1], k, k)
    layer.weight.copy_(torch.cat([filters, -filters]).to(layer.weight.dtype))


def whitening_layer(num_channels: int, kernel_size: int) -> nn.Conv2d:
    """The frozen first layer: each eigen-filter of the patch covariance and its negation."""
    layer = nn.Conv2d(num_channels, 2 * num_channels * kernel_size**2, kernel_size, padding=0, bias=True)
    layer.weight.requires_grad_(False)
    return layer


def read_legacy_temperature(config: PreTrainedConfig, kwargs: dict) -> None:
    """A built-in config.json saved before the key was renamed holds ``temperature``: read it as
    ``calibration_temperature`` (else a registered model of that time would be served uncalibrated)."""
    if "temperature" in kwargs:
        config.calibration_temperature = float(kwargs.pop("temperature"))


def calibrated_logits(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The logits of the project's inference path for normalised images: test-time augmentation at the
    model's ``tta_level``, divided by its fitted temperature (what ``predict_logits`` returns).

    Reached through ``forward(calibrated=...)``, which the saved image processor sets, so
    ``transformers.pipeline`` reports the same probabilities as our CLI; training and ``predict_logits``
    call ``forward`` without it and get the raw logits.
    """
    # inference.py calls forward: import late
    from cifar10_pipeline.modeling.inference import calibration_temperature, tta_confidence, tta_logits

    logits = tta_logits(model, pixel_values, model.config.tta_level, tta_confidence(model.config))
    return logits / calibration_temperature(model.config)


def wants_calibrated(calibrated: torch.Tensor | bool | None) -> bool:
    """Whether ``forward``'s ``calibrated`` argument (a bool, or one flag per image) asks for it."""
    if calibrated is None:
        return False
    flags = torch.as_tensor(calibrated)
    if flags.any() and not flags.all():
        raise ValueError("calibrated must be the same for every image of a batch")
    return bool(flags.all())


class WhitenedImageClassifier:
    """What the project's own architectures share, mixed in before their ``PreTrainedModel`` base: a frozen
    whitening first layer (``whiten``) set from the training images, and ``forward``: the raw logits (and the
    loss, given labels) or, with ``calibrated``, the inference path's logits (:func:`calibrated_logits`).
    A subclass defines ``whiten`` and ``raw_logits``."""

    whiten: nn.Conv2d
    config: PreTrainedConfig

    def init_whitening(self, pixel_values: torch.Tensor) -> None:
        init_whitening(self.whiten, pixel_values)

    def raw_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        calibrated: torch.Tensor | bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        if wants_calibrated(calibrated):  # the saved image processor asks for it, for transformers.pipeline
            return ImageClassifierOutput(logits=calibrated_logits(self, pixel_values))
        logits = self.raw_logits(pixel_values)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


class CifarConvNetPreTrainedModel(PreTrainedModel):
    config_class = CifarConvNetConfig
    base_model_prefix = "cifar_convnet"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=5**0.5)  # torch's default for conv
            if module.bias is not None:
                init.zeros_(module.bias)
            if module.kernel_size == (3, 3):
                # Identity on the first in_channels filters: the group starts close to a pass-through,
                # which trains faster without residual connections.
                in_channels = module.weight.shape[1]
                init.dirac_(module.weight[:in_channels])
        elif isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=5**0.5)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


class CifarConvNetForImageClassification(WhitenedImageClassifier, CifarConvNetPreTrainedModel):
    def __init__(self, config: CifarConvNetConfig):
        super().__init__(config)
        w1, w2, w3 = config.widths
        self.whiten = whitening_layer(config.num_channels, config.whiten_kernel_size)
        whiten_width = self.whiten.out_channels
        self.act = nn.GELU()
        momentum, extra = config.batchnorm_momentum, config.extra_convs
        self.group1 = ConvGroup(whiten_width, w1, momentum, extra)
        self.group2 = ConvGroup(w1, w2, momentum, extra)
        self.group3 = ConvGroup(w2, w3, momentum, extra)
        self.classifier = nn.Linear(w3, config.num_labels, bias=False)
        self.post_init()

    def raw_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(pixel_values))
        x = self.group3(self.group2(self.group1(x)))
        # Global max-pool as a plain reduction: on CUDA, adaptive_max_pool2d's channels-last kernels took
        # 7% of a training step for this 3x3 map. max(dim) rather than amax: its gradient goes to one
        # element, while amax's divides by the count of ties, which compiled bf16 kernels can make 0 (NaN).
        features = x.flatten(2).max(dim=2).values
        return self.classifier(features) * self.config.logit_scale


def register_auto_classes() -> None:
    """Let AutoConfig, AutoModelForImageClassification and AutoImageProcessor (hence
    ``transformers.pipeline``) resolve this project's model types. Runs on
    ``import cifar10_pipeline.modeling``; calling it again is harmless."""
    from cifar10_pipeline.modeling.processor import CifarImageProcessor
    from cifar10_pipeline.modeling.vit import CifarViTConfig, CifarViTForImageClassification

    for config_class, model_class in (
        (CifarConvNetConfig, CifarConvNetForImageClassification),
        (CifarViTConfig, CifarViTForImageClassification),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageClassification.register(config_class, model_class, exist_ok=True)
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": CifarImageProcessor}, exist_ok=True
        )


def label_maps() -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(CLASS_NAMES))
    return id2label, {name: index for index, name in id2label.items()}


def build_cifar_convnet(
    widths: list[int], tta_level: int, extra_convs: int = 0
) -> CifarConvNetForImageClassification:
    id2label, label2id = label_maps()
    config = CifarConvNetConfig(
        widths=widths, extra_convs=extra_convs, tta_level=tta_level, id2label=id2label, label2id=label2id
    )
    return CifarConvNetForImageClassification(config)


class CheckpointError(PipelineError, OSError):
    """The checkpoint train.model names cannot be fine-tuned: not found, unloadable, or no normalisation."""


def checkpoint_normalisation(name_or_path: str) -> tuple[list[float], list[float]]:
    """The checkpoint's own image normalisation (``image_mean``, ``image_std``), from its image processor."""
    try:
        processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not load the image processor of train.model {name_or_path!r} ({type(exc).__name__}: "
            f"{exc}); fine-tuning needs the normalisation the checkpoint was trained with",
            hint="give a checkpoint that has a preprocessor_config.json, or write one next to its "
            "config.json, e.g. ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], "
            "image_std=[0.5, 0.5, 0.5]).save_pretrained(dir)",
        ) from None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        raise CheckpointError(
            f"the image processor of train.model {name_or_path!r} ({type(processor).__name__}) has no "
            "image_mean/image_std",
            hint="add image_mean and image_std to its preprocessor_config.json",
        )
    return list(mean), list(std)


def build_finetune_model(name_or_path: str, image_size: int, tta_level: int) -> PreTrainedModel:
    """Load any image-classification checkpoint with a fresh 10-class head (``id2label`` set).

    ``image_size`` must match what the checkpoint was trained at (position embeddings of a ViT are sized
    for it); images are resized to it on the device.
    """
    id2label, label2id = label_maps()
    try:
        model = AutoModelForImageClassification.from_pretrained(
            name_or_path,
            id2label=id2label,  # sets num_labels (10); passing both warns against the checkpoint's own map
            label2id=label2id,
            ignore_mismatched_sizes=True,  # the checkpoint's own head has another number of classes
            use_safetensors=True,  # as load_model: pickled weights can run code when loaded
            trust_remote_code=False,
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"could not load the checkpoint train.model {name_or_path!r}: {exc}",
            hint="give a Hugging Face Hub id (needs network access or a filled HF cache) or a local "
            "directory written by save_pretrained, with model.safetensors weights (pickled "
            "pytorch_model.bin files are refused), or set train.model: cifar_convnet to train the "
            "built-in network",
        ) from None
    mean, std = checkpoint_normalisation(name_or_path)
    model.config.image_mean = mean
    model.config.image_std = std
    model.config.image_size = image_size
    model.config.tta_level = tta_level
    return model


# The weights files load_model accepts: safetensors (one file, or shards named by an index) hold tensors only.
# A pickled pytorch_model.bin can run code when it is unpickled, so it is never loaded.
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def load_model(path: str | Path, device: torch.device | str = "cpu") -> PreTrainedModel:
    """Load a trained model for inference, whichever architecture it is: weights from safetensors only, the
    code from this package or transformers only (never a checkpoint's own, trust_remote_code=False)."""
    register_auto_classes()
    path = saved_model_dir(path)
    if not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"{path} holds no model.safetensors (it has {found}): models load from safetensors only, never "
            "from pickled weights such as pytorch_model.bin, which can run code when loaded. Re-save the "
            "model with save_pretrained (transformers 5 writes model.safetensors) or train it again "
            "(dvc repro train)."
        )
    model = AutoModelForImageClassification.from_pretrained(
        path, use_safetensors=True, trust_remote_code=False
    )
    return model.to(device).eval()
