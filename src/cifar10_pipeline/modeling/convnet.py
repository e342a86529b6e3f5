"""The built-in CIFAR-10 network, ``cifar_convnet``, as a transformers model.

The network follows the published descriptions of the fastest CIFAR-10 training runs (Page's "How to train
your ResNet", hlb-CIFAR10, Jordan 2024 "94% on CIFAR-10 in 3.29 seconds"): a frozen first layer that whitens
2x2 patches (initialised from the training data), three conv groups of conv-pool-BN-GELU-conv-BN-GELU with
no residuals, a global max-pool and a linear head whose logits are scaled down. Written from those
descriptions for this project.

Because it is a ``PreTrainedModel`` registered with the Auto classes (model.py), evaluation, serving and the
model card load it exactly like a Hub checkpoint: ``AutoModelForImageClassification.from_pretrained(path)``.
"""

from __future__ import annotations

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init

from cifar10_pipeline.modeling.base import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ConvGroup,
    WhitenedImageClassifier,
    label_maps,
    loading_hint,
    whitening_layer,
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
        self.widths = list(self.widths)
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        super().__post_init__(**kwargs)


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


def build_cifar_convnet(
    widths: list[int], tta_level: int, extra_convs: int = 0
) -> CifarConvNetForImageClassification:
    id2label, label2id = label_maps()
    config = CifarConvNetConfig(
        widths=widths, extra_convs=extra_convs, tta_level=tta_level, id2label=id2label, label2id=label2id
    )
    return CifarConvNetForImageClassification(config)
