"""The one way every stage loads a model, and how the project's model types become known to transformers.

``load_model`` loads any saved model (safetensors only, the code from this package or transformers, never a
checkpoint's own); ``register_auto_classes`` (run by ``import cifar10_pipeline.modeling``) lets the Auto
classes, hence ``transformers.pipeline``, resolve ``cifar_convnet`` (convnet.py) and ``cifar_vit``
(vit.py); ``build_finetune_model`` loads a Hub or local checkpoint with a fresh 10-class head.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
)

from cifar10_pipeline.core.errors import PipelineError
from cifar10_pipeline.core.paths import saved_model_dir
from cifar10_pipeline.modeling.base import label_maps
from cifar10_pipeline.modeling.convnet import CifarConvNetConfig, CifarConvNetForImageClassification
from cifar10_pipeline.modeling.processor import CifarImageProcessor
from cifar10_pipeline.modeling.vit import CifarViTConfig, CifarViTForImageClassification


def register_auto_classes() -> None:
    """Let AutoConfig, AutoModelForImageClassification and AutoImageProcessor (hence
    ``transformers.pipeline``) resolve this project's model types. Runs on
    ``import cifar10_pipeline.modeling``; calling it again is harmless."""
    for config_class, model_class in (
        (CifarConvNetConfig, CifarConvNetForImageClassification),
        (CifarViTConfig, CifarViTForImageClassification),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForImageClassification.register(config_class, model_class, exist_ok=True)
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": CifarImageProcessor}, exist_ok=True
        )


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
