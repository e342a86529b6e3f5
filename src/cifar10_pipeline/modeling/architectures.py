"""The one table of architectures: what ``train.model`` names, how it is built, trained, saved and described.

``train.model`` is ``cifar_convnet`` or ``cifar_vit`` (built here and trained from scratch) or anything else:
a Hub id or a local ``save_pretrained`` directory, fine-tuned with a fresh 10-class head. Each entry of
``ARCHITECTURES`` (and ``FINETUNE`` for the rest) holds the builder, the training recipe the loop follows,
the parts of the network the recipe treats specially, and the one-line description the model card prints.
No other module looks at the model's type or at ``train.model``'s value: they ask ``architecture(name)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedConfig, PreTrainedModel

from cifar10_pipeline.core.params import ParamsError, TrainParams
from cifar10_pipeline.modeling.convnet import build_cifar_convnet
from cifar10_pipeline.modeling.model import build_finetune_model, register_auto_classes
from cifar10_pipeline.modeling.processor import CifarImageProcessor
from cifar10_pipeline.modeling.vit import build_cifar_vit, flops_split


@dataclass(frozen=True)
class Recipe:
    """How training.loop trains an architecture.

    ``speed_run``: Nesterov SGD on the summed loss, per-role learning rates (norm biases, head, the
    data-initialised bias), optional lookahead, and Muon for the conv filters with ``filter_optimizer: muon``.
    ``adamw``: AdamW on the mean loss, no weight decay on 1-D parameters.
    """

    name: Literal["speed_run", "adamw"]
    summed_loss: bool
    lookahead: bool  # whether train.lookahead applies
    muon: bool  # whether train.filter_optimizer: muon is allowed


SPEED_RUN = Recipe("speed_run", summed_loss=True, lookahead=True, muon=True)
ADAMW = Recipe("adamw", summed_loss=False, lookahead=False, muon=False)


def _no_parameters(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    return []


def _whiten_bias(model: PreTrainedModel) -> list[torch.nn.Parameter]:
    return [model.whiten.bias]


def _init_whitening(model: PreTrainedModel, pixel_values: torch.Tensor) -> None:
    model.init_whitening(pixel_values)


@dataclass(frozen=True)
class Architecture:
    name: str  # the train.model value (FINETUNE: a placeholder, any checkpoint)
    build: Callable[[TrainParams], PreTrainedModel]
    recipe: Recipe
    describe: Callable[[Mapping[str, Any], str], str]  # (config.json as a dict, train.model) -> card text
    from_scratch: bool
    # Set from the training images before the first step (the frozen whitening layer); None: nothing.
    init_from_data: Callable[[PreTrainedModel, torch.Tensor], None] | None = None
    # The bias of that data-initialised layer: own group, frozen after train.whiten_bias_epochs (speed_run).
    data_initialised_bias: Callable[[PreTrainedModel], list[torch.nn.Parameter]] = _no_parameters
    # The classifier head's parameters (speed_run: learning rate x train.head_lr_scale).
    head: Callable[[PreTrainedModel], list[torch.nn.Parameter]] = _no_parameters
    # Whether forward(calibrated=True) gives the inference path's logits (TTA, temperature): the saved image
    # processor then asks for them, so transformers.pipeline matches predict_logits.
    calibrated_forward: bool = False
    # Size/compute figures the benchmark records for this architecture (None: nothing extra).
    facts: Callable[[PreTrainedModel], dict[str, Any]] | None = None

    def check_model(self, model: PreTrainedModel) -> None:
        """Refuse a model this entry does not describe (its recipe would silently train the wrong parts)."""
        if self.from_scratch and model.config.model_type != self.name:
            raise ValueError(
                f"train.model is {self.name!r} but the model given is a {model.config.model_type!r}; "
                "build it with cifar10_pipeline.modeling.architectures.build_model(hp)"
            )

    def check_params(self, hp: TrainParams) -> None:
        if hp.filter_optimizer == "muon" and not self.recipe.muon:
            raise ParamsError(
                f"train.filter_optimizer: muon is part of the cifar_convnet recipe; train.model {hp.model!r} "
                f"trains with {self.recipe.name}",
                hint="set train.filter_optimizer: sgd (or train.model: cifar_convnet)",
            )


def _describe_convnet(config: Mapping[str, Any], name: str) -> str:
    extra = config.get("extra_convs", 0)
    residual = f"plus {extra} residual conv layer(s) per group" if extra else "no residual connections"
    return (
        "convolutional network for 32x32 images trained from scratch (`cifar_convnet`: a frozen "
        f"patch-whitening layer, three conv groups of widths {config['widths']}, batch norm, GELU, "
        f"{residual}, global max-pool, linear head)"
    )


def _describe_vit(config: Mapping[str, Any], name: str) -> str:
    grid = (config["image_size"] - config["whiten_kernel_size"] + 1) // 4  # as in vit.py
    return (
        "vision transformer for 32x32 images trained from scratch (`cifar_vit`: a convolutional "
        f"tokenizer of two conv groups, widths {config['tokenizer_widths']}, makes a {grid}x{grid} grid "
        f"of tokens; {config['num_hidden_layers']} pre-norm encoder layers of width "
        f"{config['hidden_size']} with {config['num_attention_heads']} heads; mean-pooled tokens, "
        "linear head)"
    )


def _describe_finetune(config: Mapping[str, Any], name: str) -> str:
    return f"`{config.get('model_type')}` image classifier fine-tuned from `{name}`"


def _vit_facts(model: PreTrainedModel) -> dict[str, Any]:
    return {
        "forward_macs_per_image": flops_split(model.config),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


ARCHITECTURES: dict[str, Architecture] = {
    entry.name: entry
    for entry in (
        Architecture(
            name="cifar_convnet",
            build=lambda hp: build_cifar_convnet(hp.widths, hp.tta_level, hp.extra_convs),
            recipe=SPEED_RUN,
            describe=_describe_convnet,
            from_scratch=True,
            init_from_data=_init_whitening,
            data_initialised_bias=_whiten_bias,
            head=lambda model: list(model.classifier.parameters()),
            calibrated_forward=True,
        ),
        Architecture(
            name="cifar_vit",
            build=lambda hp: build_cifar_vit(
                hp.widths[:2], hp.vit_dim, hp.vit_depth, hp.vit_heads, hp.vit_mlp_ratio, hp.tta_level
            ),
            recipe=ADAMW,
            describe=_describe_vit,
            from_scratch=True,
            init_from_data=_init_whitening,
            data_initialised_bias=_whiten_bias,  # under AdamW: with the undecayed parameters, never frozen
            calibrated_forward=True,
            facts=_vit_facts,
        ),
    )
}
# Any other train.model: a Hub id or local checkpoint directory. Its forward is the checkpoint's own (e.g.
# transformers' ViT), which knows nothing of our TTA or temperature: the pipeline gives its plain softmax.
FINETUNE = Architecture(
    name="<checkpoint>",
    build=lambda hp: build_finetune_model(hp.model, hp.finetune_image_size, hp.tta_level),
    recipe=ADAMW,
    describe=_describe_finetune,
    from_scratch=False,
)


def architecture(name: str) -> Architecture:
    """The entry for a ``train.model`` value: a built-in architecture, else the fine-tune entry."""
    return ARCHITECTURES.get(name, FINETUNE)


def build_model(hp: TrainParams) -> PreTrainedModel:
    """A fresh built-in network, or a pre-trained checkpoint with a new 10-class head; seeded."""
    spec = architecture(hp.model)
    spec.check_params(hp)
    torch.manual_seed(hp.seed)
    register_auto_classes()
    return spec.build(hp)


def describe_architecture(name: str, config: Mapping[str, Any] | PreTrainedConfig) -> str:
    """One line for the model card: what ``train.model`` = ``name`` is, given the saved model's config."""
    as_dict = config.to_dict() if isinstance(config, PreTrainedConfig) else config
    return architecture(name).describe(as_dict, name)


def save_model(model: PreTrainedModel, directory: str | Path, name: str) -> None:
    """``save_pretrained`` plus the image processor (preprocessor_config.json) standard tools load with it;
    the folder readable by every user (see :func:`make_world_readable`)."""
    model.save_pretrained(directory)
    processor = CifarImageProcessor.for_config(model.config, architecture(name).calibrated_forward)
    processor.save_pretrained(directory)
    make_world_readable(Path(directory))


def make_world_readable(directory: Path) -> None:
    """Folders 0755 and files 0644 under ``directory`` (itself included). save_pretrained writes
    model.safetensors 0600, and the container image copies the folder as root with its modes and serves it
    as a non-root user (Dockerfile), which then could not read its own model."""
    for path in [directory, *directory.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
