"""A vision transformer for 32x32 images, trained from scratch, with a convolutional tokenizer.

A plain ViT cuts the image into patches with one strided convolution; on 50,000 small images that leaves the
transformer to learn locality from too little data. Following the published compact-transformer line of work
(Hassani et al. 2021, "Escaping the Big Data Paradigm with Compact Transformers"; Xiao et al. 2021, "Early
Convolutions Help Transformers See Better"), the tokens here come from a short convolutional stem instead:
the same frozen patch-whitening layer and two conv groups of the built-in conv net take the image to a
7x7 grid of tokens projected to ``vit_dim``, and a stack of pre-norm transformer encoder layers (torch's,
with fused scaled-dot-product attention) mixes them globally. Mean of the final tokens -> linear head.

``flops_split`` reports how the compute divides between the tokenizer and the transformer for a config.
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
class CifarViTConfig(PreTrainedConfig):
    model_type = "cifar_vit"

    num_channels: int = 3
    image_size: int = 32
    tokenizer_widths: list[int] | tuple[int, ...] = (64, 256)  # the two conv groups; the last is projected
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    mlp_ratio: float = 2.0
    layer_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    whiten_kernel_size: int = 2
    batchnorm_momentum: float = 0.6
    image_mean: list[float] | tuple[float, ...] = CIFAR10_MEAN
    image_std: list[float] | tuple[float, ...] = CIFAR10_STD
    tta_level: int = 0
    calibration_temperature: float = 1.0  # see inference.calibration_temperature
    loading_hint: str = loading_hint(model_type)  # saved in config.json for readers without the import

    def __post_init__(self, **kwargs):
        self.tokenizer_widths = list(self.tokenizer_widths)
        self.image_mean = list(self.image_mean)
        self.image_std = list(self.image_std)
        super().__post_init__(**kwargs)


class CifarViTPreTrainedModel(PreTrainedModel):
    config_class = CifarViTConfig
    base_model_prefix = "cifar_vit"
    main_input_name = "pixel_values"

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.MultiheadAttention):
            init.trunc_normal_(module.in_proj_weight, std=std)
            init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CifarViTForImageClassification):
            init.trunc_normal_(module.position_embeddings, std=std)


class CifarViTForImageClassification(WhitenedImageClassifier, CifarViTPreTrainedModel):
    def __init__(self, config: CifarViTConfig):
        super().__init__(config)
        w1, w2 = config.tokenizer_widths
        self.whiten = whitening_layer(config.num_channels, config.whiten_kernel_size)
        self.act = nn.GELU()
        self.tokenizer = nn.Sequential(
            ConvGroup(self.whiten.out_channels, w1, config.batchnorm_momentum),
            ConvGroup(w1, w2, config.batchnorm_momentum),
        )
        self.projection = nn.Linear(w2, config.hidden_size)
        # The whitening conv has no padding: 31x31 -> 15x15 -> 7x7 after the two pools.
        grid = (config.image_size - config.whiten_kernel_size + 1) // 4
        self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid, config.hidden_size))
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.hidden_size,
                config.num_attention_heads,
                dim_feedforward=round(config.mlp_ratio * config.hidden_size),
                dropout=0.0,
                activation="gelu",
                layer_norm_eps=config.layer_norm_eps,
                batch_first=True,
                norm_first=True,  # pre-norm: trains stably without a long warm-up
            )
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def raw_logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.tokenizer(self.act(self.whiten(pixel_values)))  # (N, C, 7, 7)
        tokens = self.projection(features.flatten(2).transpose(1, 2)) + self.position_embeddings
        for layer in self.encoder:
            tokens = layer(tokens)
        return self.classifier(self.norm(tokens).mean(dim=1))


def flops_split(config: CifarViTConfig) -> dict[str, float]:
    """Forward multiply-accumulates per image: convolutional tokenizer, transformer encoder and in total."""
    from torch.utils.flop_counter import FlopCounterMode

    # Training mode: in eval mode torch's encoder layers take a fused path the counter does not see.
    model = CifarViTForImageClassification(config).train()
    x = torch.zeros(2, config.num_channels, config.image_size, config.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=x)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def macs(name: str) -> float:
        return sum(counts.get(name, {}).values()) / 2 / len(x)

    return {
        "tokenizer": macs(f"{root}.whiten") + macs(f"{root}.tokenizer"),
        "transformer": sum(macs(f"{root}.encoder.{i}") for i in range(config.num_hidden_layers)),
        "total": macs(root),
    }


def build_cifar_vit(
    tokenizer_widths: list[int], dim: int, depth: int, heads: int, mlp_ratio: float, tta_level: int
) -> CifarViTForImageClassification:
    id2label, label2id = label_maps()
    config = CifarViTConfig(
        tokenizer_widths=tokenizer_widths,
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=mlp_ratio,
        tta_level=tta_level,
        id2label=id2label,
        label2id=label2id,
    )
    return CifarViTForImageClassification(config)
