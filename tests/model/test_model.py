"""The model interface: transformers save/load through the Auto classes, whitening, ViT fine-tune path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForImageClassification,
)

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.data import ArraySplit
from cifar10_pipeline.core.params import ParamsError
from cifar10_pipeline.modeling.architectures import (
    ARCHITECTURES,
    FINETUNE,
    architecture,
    build_model,
    describe_architecture,
)
from cifar10_pipeline.modeling.base import FrozenScaleBatchNorm, batchnorm_precision
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import (
    CheckpointError,
    build_finetune_model,
    load_model,
    register_auto_classes,
)
from cifar10_pipeline.training.loop import train_classifier
from cifar10_pipeline.training.optim import make_optimizers

from ..conftest import synthetic_images
from ..support.helpers import save_tiny_vit_checkpoint, tiny_convnet, train_params


def test_save_and_load_through_auto_classes(tmp_path: Path) -> None:
    model = tiny_convnet(tta_level=2)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cifar_convnet"
    assert config["id2label"] == {str(i): name for i, name in enumerate(CLASS_NAMES)}
    assert (tmp_path / "model.safetensors").is_file()
    register_auto_classes()
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
    assert loaded.config.tta_level == 2


def test_load_model_explains_a_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no trained model at .*dvc exp run -S profile=quick"):
        load_model(tmp_path / "nothing")


def test_whitening_layer_decorrelates_patches() -> None:
    model = tiny_convnet()
    rng = np.random.default_rng(0)
    # Correlated channels, like real images.
    base = torch.from_numpy(rng.normal(size=(256, 1, 32, 32))).float()
    images = torch.cat([base, 0.8 * base + 0.2 * torch.randn_like(base), torch.randn_like(base)], dim=1)
    model.init_whitening(images)
    out = F.conv2d(images, model.whiten.weight[:12])  # the positive half of the filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = torch.cov(flat.T)
    torch.testing.assert_close(covariance, torch.eye(12), atol=0.05, rtol=0)
    assert not model.whiten.weight.requires_grad


@pytest.fixture
def tiny_vit_checkpoint(tmp_path: Path) -> Path:
    return save_tiny_vit_checkpoint(tmp_path / "tiny-vit", 48, (0.4, 0.5, 0.6), (0.3, 0.5, 0.7))


@pytest.mark.slow
def test_vit_fine_tune_path(tiny_vit_checkpoint: Path, tmp_path: Path) -> None:
    model = build_finetune_model(str(tiny_vit_checkpoint), image_size=48, tta_level=1)
    assert model.config.num_labels == 10
    assert model.config.id2label[9] == "truck"
    assert model.config.image_mean == [0.4, 0.5, 0.6]  # read through AutoImageProcessor
    assert model.config.image_std == [0.3, 0.5, 0.7]
    before = model.classifier.weight.detach().clone()
    images, labels = synthetic_images(64, seed=3)
    split = ArraySplit(images, labels, np.arange(64))
    hp = train_params(model=str(tiny_vit_checkpoint), epochs=1, batch_size=32, finetune_image_size=48)
    result = train_classifier(model, split, split.head(16), hp, torch.device("cpu"), progress=False)
    assert result.steps == 2
    assert not torch.equal(before, model.classifier.weight.detach())  # the new head was trained
    model.save_pretrained(tmp_path / "finetuned")
    reloaded = load_model(tmp_path / "finetuned")
    logits = predict_logits(reloaded, images[:4])  # 32x32 uint8 in, resized to 48 on the device
    assert logits.shape == (4, 10)
    assert reloaded.config.tta_level == 1


def test_unloadable_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"could not load the checkpoint train\.model") as error:
        build_finetune_model(str(tmp_path / "empty"), image_size=224, tta_level=0)
    assert "train.model: cifar_convnet" in str(error.value.hint)


def test_batchnorm_precision_is_what_the_forward_pass_does() -> None:
    model = tiny_convnet()
    assert batchnorm_precision(model, torch.device("cpu"), "bf16") == "fp32 copy"
    assert batchnorm_precision(model, torch.device("cuda"), "bf16") == "bf16"
    assert batchnorm_precision(model, torch.device("cuda"), "fp32") == "fp32"
    assert batchnorm_precision(torch.nn.Linear(2, 2), torch.device("cuda"), "bf16") is None
    # On the CPU a bf16 activation is normalised as its fp32 copy and cast back.
    norm = FrozenScaleBatchNorm(4, momentum=0.6).train()
    x = torch.randn(8, 4, 3, 3).to(torch.bfloat16)
    expected = F.batch_norm(x.float(), None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)


def test_checkpoint_without_image_processor_says_what_to_do(tiny_vit_checkpoint: Path) -> None:
    (tiny_vit_checkpoint / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"image processor of train\.model") as error:
        build_finetune_model(str(tiny_vit_checkpoint), image_size=48, tta_level=0)
    assert "preprocessor_config.json" in str(error.value.hint) and "save_pretrained" in str(error.value.hint)


def test_names_outside_the_table_are_checkpoints_to_fine_tune() -> None:
    assert {name for name, spec in ARCHITECTURES.items() if spec.from_scratch} == {
        "cifar_convnet",
        "cifar_vit",
    }
    assert architecture("google/vit-base-patch16-224-in21k") is FINETUNE
    assert architecture("models/cifar10") is FINETUNE and not FINETUNE.from_scratch


def test_each_architecture_trains_with_its_own_recipe() -> None:
    assert architecture("cifar_convnet").recipe.summed_loss and architecture("cifar_convnet").recipe.muon
    for name in ("cifar_vit", "some/hub-checkpoint"):
        recipe = architecture(name).recipe
        assert recipe.name == "adamw" and not recipe.summed_loss and not recipe.lookahead


def test_muon_outside_the_conv_net_recipe_is_refused_before_building() -> None:
    hp = train_params(model="cifar_vit", filter_optimizer="muon", vit_dim=16, vit_heads=2)
    with pytest.raises(ParamsError, match="muon is part of the cifar_convnet recipe") as error:
        build_model(hp)
    assert "train.filter_optimizer: sgd" in str(error.value.hint)


def test_a_model_that_is_not_what_train_model_names_is_refused() -> None:
    """The recipe comes from train.model; a model of another architecture would be trained wrongly."""
    hp = train_params(model="cifar_vit", widths=[8, 16, 16], vit_dim=16, vit_heads=2)
    with pytest.raises(ValueError, match="'cifar_vit' but the model given is a 'cifar_convnet'"):
        make_optimizers(tiny_convnet(), hp)


def test_card_descriptions_follow_the_config() -> None:
    conv = tiny_convnet().config
    assert "widths [16, 32, 32]" in describe_architecture("cifar_convnet", conv)
    assert "no residual connections" in describe_architecture("cifar_convnet", conv.to_dict())
    hp = train_params(model="cifar_vit", widths=[8, 16, 16], vit_dim=16, vit_depth=3, vit_heads=2)
    vit = build_model(hp).config
    assert "7x7 grid" in describe_architecture("cifar_vit", vit) and "3 pre-norm" in describe_architecture(
        "cifar_vit", vit
    )
    assert describe_architecture("org/vit", {"model_type": "vit"}) == (
        "`vit` image classifier fine-tuned from `org/vit`"
    )


def test_registry_descriptions_name_what_the_saved_config_holds() -> None:
    """The model card's "Model type" line (describe_architecture) reads the saved config of each entry."""
    vit_hp = train_params(model="cifar_vit", widths=[8, 16, 16], vit_dim=16, vit_depth=3, vit_heads=2)
    conv_hp = train_params(widths=[8, 16, 16], extra_convs=1)
    conv = describe_architecture("cifar_convnet", build_model(conv_hp).config.to_dict())
    assert "widths [8, 16, 16]" in conv and "plus 1 residual conv layer(s) per group" in conv
    vit = describe_architecture("cifar_vit", build_model(vit_hp).config.to_dict())
    assert "3 pre-norm encoder layers of width 16 with 2 heads" in vit and "widths [8, 16]" in vit
    assert describe_architecture("org/vit", {"model_type": "vit"}) == (
        "`vit` image classifier fine-tuned from `org/vit`"
    )
