"""The from-scratch vision transformer (``train.model: cifar_vit``): shapes, save/load, compute split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar10_pipeline.core.params import ParamsError
from cifar10_pipeline.modeling.architectures import build_model
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import load_model
from cifar10_pipeline.modeling.vit import CifarViTForImageClassification, flops_split

from ..support.helpers import train_params


def tiny_vit(**changes) -> CifarViTForImageClassification:
    sizes = {"widths": [8, 16, 16], "vit_dim": 32, "vit_depth": 2, "vit_heads": 4}
    hp = train_params(model="cifar_vit", **{**sizes, **changes})
    model = build_model(hp)
    model.init_whitening(torch.randn(32, 3, 32, 32))
    return model.eval()


def test_tokens_come_from_the_conv_tokenizer() -> None:
    model = tiny_vit()
    assert isinstance(model, CifarViTForImageClassification)
    assert model.position_embeddings.shape == (1, 49, 32)  # 7x7 grid after whitening and two pools
    logits = model(pixel_values=torch.randn(3, 3, 32, 32)).logits
    assert logits.shape == (3, 10)
    assert not model.whiten.weight.requires_grad


def test_save_and_load_like_any_checkpoint(tmp_path: Path) -> None:
    model = tiny_vit(tta_level=1)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "cifar_vit" and config["num_hidden_layers"] == 2
    loaded = load_model(tmp_path)
    assert type(loaded) is CifarViTForImageClassification
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(predict_logits(loaded, images), predict_logits(model, images))


def test_compute_split_counts_both_parts() -> None:
    split = flops_split(tiny_vit().config)
    assert split["tokenizer"] > 0 and split["transformer"] > 0
    assert split["tokenizer"] + split["transformer"] <= split["total"]
    # Doubling the depth doubles the transformer's share and leaves the tokenizer alone.
    deeper = flops_split(tiny_vit(vit_depth=4).config)
    assert deeper["tokenizer"] == split["tokenizer"]
    assert deeper["transformer"] == pytest.approx(2 * split["transformer"])


def test_width_must_split_into_heads() -> None:
    with pytest.raises(ParamsError, match="multiple of vit_heads"):
        train_params(model="cifar_vit", vit_dim=30, vit_heads=4)


def test_cuda_graphs_refuse_a_compile_mode_with_its_own_graphs() -> None:
    with pytest.raises(ParamsError, match="cuda_graphs"):
        train_params(cuda_graphs=True, compile="reduce-overhead")
