"""What the project's own architectures share (the conv net, convnet.py, and the ViT, vit.py): the frozen
whitening first layer and its initialisation from the training images, batch norm with a frozen scale, the
conv group, the CIFAR-10 normalisation and labels, and ``forward``'s calibrated path for
``transformers.pipeline``. Nothing here is registered with transformers; model.py does that.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.modeling.inference import calibration_temperature, tta_confidence, tta_logits
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


def label_maps() -> tuple[dict[int, str], dict[str, int]]:
    id2label = dict(enumerate(CLASS_NAMES))
    return id2label, {name: index for index, name in id2label.items()}


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


def calibrated_logits(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The logits of the project's inference path for normalised images: test-time augmentation at the
    model's ``tta_level``, divided by its fitted temperature (what ``predict_logits`` returns).

    Reached through ``forward(calibrated=...)``, which the saved image processor sets, so
    ``transformers.pipeline`` reports the same probabilities as our CLI; training and ``predict_logits``
    call ``forward`` without it and get the raw logits.
    """
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
