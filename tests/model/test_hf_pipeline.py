"""Saved models load with standard transformers tools: Auto classes, AutoImageProcessor, pipeline()."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTForImageClassification,
    pipeline,
)

from cifar10_pipeline.core.data import ArraySplit
from cifar10_pipeline.modeling.architectures import build_model, save_model
from cifar10_pipeline.modeling.inference import (
    calibration_temperature,
    fit_temperature,
    normalize,
    predict_logits,
    set_calibration_temperature,
)
from cifar10_pipeline.modeling.processor import CifarImageProcessor
from cifar10_pipeline.training.loop import train_classifier

from ..conftest import synthetic_images
from ..support.helpers import save_tiny_vit_checkpoint, train_params, write_train_val

TEST_SHARD = "test-00000-of-00001.parquet"
TRAIN_SHARD = "train-00000-of-00002.parquet"
# Ours at fp32 throughout: transformers' forward is fp32, while predict_logits' default ("auto") takes bf16 on
# a CPU with native bf16 (an AMX Xeon), which moves probabilities by ~1e-3.
# The pipeline runs one image per forward pass, predict_logits a batch: fp32 kernels sum in a
# batch-size-dependent order, so logits agree to fp32 rounding (~1e-7), not bit for bit; the softmax is
# numpy's in the pipeline, torch's in ours. 1e-6 on probabilities is ~10x the observed difference (2e-8).
PROBABILITY_ATOL = 1e-6

# Runs in a fresh interpreter: only the import of cifar10_pipeline.modeling may register the model types.
PIPELINE_SCRIPT = """
import io, json, sys
import pyarrow.parquet as pq
from PIL import Image
from transformers import pipeline
import cifar10_pipeline.modeling  # registers the Auto classes

model_dir, shard, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = pq.read_table(shard, columns=["img"]).slice(0, n).to_pylist()
images = [Image.open(io.BytesIO(row["img"]["bytes"])) for row in rows]
classifier = pipeline("image-classification", model=model_dir, device="cpu")
print(json.dumps(classifier(images, top_k=10, batch_size=8)))
"""


def read_images(shard: Path, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rows = pq.read_table(shard, columns=["img", "label"]).slice(start, n).to_pylist()
    images = np.stack([np.asarray(Image.open(io.BytesIO(r["img"]["bytes"])).convert("RGB")) for r in rows])
    return images, np.array([r["label"] for r in rows], dtype=np.int64)


def scores_by_label(results: list[list[dict]], label2id: dict[str, int]) -> np.ndarray:
    """The pipeline's top_k lists (sorted by score) back in class-index order."""
    out = np.zeros((len(results), len(label2id)))
    for i, result in enumerate(results):
        for entry in result:
            out[i, label2id[entry["label"]]] = entry["score"]
    return out


@pytest.fixture(scope="module")
def trained_on_real_images(real_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small conv net trained for three epochs on 1000 real training images, temperature fitted on 500
    more, test-time augmentation level 2, saved the way the train stage saves it."""
    images, labels = read_images(real_mirror / TRAIN_SHARD, 0, 1500)
    hp = train_params(
        widths=[16, 32, 32], batch_size=100, epochs=3, whiten_bias_epochs=1, tta_level=2, precision="fp32"
    )
    model = build_model(hp)
    train_classifier(
        model, ArraySplit(images[:1000], labels[:1000], np.arange(1000)), None, hp, torch.device("cpu"),
        progress=False,
    )  # fmt: skip
    logits = predict_logits(model, images[1000:], calibrated=False, precision="fp32")
    set_calibration_temperature(model, fit_temperature(logits, torch.as_tensor(labels[1000:])))
    directory = tmp_path_factory.mktemp("real") / "model"
    save_model(model, directory, hp.model)
    return directory


@pytest.mark.slow  # ~60 s on a busy 2-core machine: training, and a fresh interpreter for the pipeline
def test_pipeline_gives_our_calibrated_probabilities_on_real_images(
    trained_on_real_images: Path, real_mirror: Path
) -> None:
    n = 64
    run = subprocess.run(
        [sys.executable, "-c", PIPELINE_SCRIPT, str(trained_on_real_images), str(real_mirror / TEST_SHARD),
         str(n)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    model = AutoModelForImageClassification.from_pretrained(trained_on_real_images).eval()
    # both are exercised
    assert model.config.tta_level == 2 and abs(calibration_temperature(model.config) - 1.0) > 0.05
    piped = scores_by_label(json.loads(run.stdout.splitlines()[-1]), model.config.label2id)
    images, labels = read_images(real_mirror / TEST_SHARD, 0, n)
    ours = predict_logits(model, images, precision="fp32").softmax(1).numpy()
    np.testing.assert_allclose(piped, ours, rtol=0, atol=PROBABILITY_ATOL)
    assert (piped.argmax(1) == ours.argmax(1)).all()
    assert (ours.argmax(1) == labels).mean() > 0.2  # it learned something (chance: 0.1)
    # The tolerance can tell: without TTA and temperature the probabilities are off by far more.
    plain = predict_logits(model, images, tta_level=0, calibrated=False, precision="fp32").softmax(1).numpy()
    assert np.abs(plain - ours).max() > 100 * PROBABILITY_ATOL


@pytest.mark.parametrize("name", ["cifar_convnet", "cifar_vit"])
def test_tiny_checkpoint_round_trips_through_the_auto_classes(name: str, tmp_path: Path) -> None:
    hp = train_params(model=name, widths=[8, 16, 16], vit_dim=16, vit_depth=1, vit_heads=2, tta_level=1)
    model = build_model(hp)
    model.init_whitening(torch.randn(32, 3, 32, 32))
    model.eval()
    save_model(model, tmp_path, name)
    assert AutoConfig.from_pretrained(tmp_path).model_type == name
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, CifarImageProcessor) and processor.calibrated_output
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    inputs = processor([Image.fromarray(image) for image in images], return_tensors="pt")
    # The processor's pixel_values are exactly what predict_logits feeds the network.
    expected = normalize(torch.from_numpy(images), model.config.image_mean, model.config.image_std)
    torch.testing.assert_close(inputs["pixel_values"], expected, rtol=0, atol=0)
    with torch.no_grad():
        raw = loaded(pixel_values=inputs["pixel_values"]).logits
        calibrated = loaded(**inputs).logits
        torch.testing.assert_close(raw, model(pixel_values=expected).logits)
    torch.testing.assert_close(calibrated, predict_logits(model, images, precision="fp32"))


# Runs in a fresh interpreter that has not imported the package: what a plain transformers user meets.
WITHOUT_IMPORT_SCRIPT = """
import json, sys
from PIL import Image
from transformers import AutoModelForImageClassification, pipeline

model_dir = sys.argv[1]
assert not [name for name in sys.modules if name.startswith("cifar10_pipeline")]
try:
    AutoModelForImageClassification.from_pretrained(model_dir)
    error = None
except ValueError as exc:
    error = str(exc).splitlines()[0]
hint = json.load(open(f"{model_dir}/config.json"))["loading_hint"]
statement = hint.split("`")[1]  # the import the hint names, run as the reader would
exec(statement)
classifier = pipeline("image-classification", model=model_dir, device="cpu")
print(json.dumps({"error": error, "hint": hint, "import": statement,
                  "labels": [r["label"] for r in classifier(Image.new("RGB", (32, 32)), top_k=10)]}))
"""


@pytest.mark.parametrize("name", ["cifar_convnet", "cifar_vit"])
def test_without_the_import_config_json_says_which_import_loads_the_model(name: str, tmp_path: Path) -> None:
    """transformers 5 registers no model type from an installed package by itself (no entry points; auto_map
    needs code shipped in the checkpoint and trust_remote_code), so its error stays "does not recognize this
    architecture"; config.json's loading_hint names the import, and that import is what makes it load."""
    hp = train_params(model=name, widths=[8, 16, 16], vit_dim=16, vit_depth=1, vit_heads=2)
    model = build_model(hp)
    model.init_whitening(torch.randn(32, 3, 32, 32))
    save_model(model.eval(), tmp_path, name)
    script = [sys.executable, "-c", WITHOUT_IMPORT_SCRIPT, str(tmp_path)]
    run = subprocess.run(script, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.splitlines()[-1])
    assert f"model type `{name}`" in seen["error"] and "does not recognize this architecture" in seen["error"]
    assert f"model_type {name} is defined by the cifar10-pipeline package" in seen["hint"]
    assert seen["import"] == "import cifar10_pipeline.modeling"
    assert sorted(seen["labels"]) == sorted(model.config.id2label.values())


def test_fine_tuned_checkpoint_gets_our_preprocessing_but_its_own_forward(tmp_path: Path) -> None:
    """A fine-tuned Hub architecture keeps transformers' forward: the pipeline resizes and normalises like
    our inference path, but applies neither TTA nor the temperature (documented in the README)."""
    checkpoint = save_tiny_vit_checkpoint(tmp_path / "tiny-vit", image_size=48)
    hp = train_params(model=str(checkpoint), finetune_image_size=48, tta_level=1)
    model = build_model(hp).eval()
    save_model(model, tmp_path / "finetuned", hp.model)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "finetuned")
    assert isinstance(processor, CifarImageProcessor) and not processor.calibrated_output
    images, _ = synthetic_images(4, seed=0)
    classifier = pipeline("image-classification", model=str(tmp_path / "finetuned"), device="cpu")
    piped = scores_by_label(classifier([Image.fromarray(i) for i in images], top_k=10), model.config.label2id)
    plain = predict_logits(model, images, tta_level=0, calibrated=False, precision="fp32").softmax(1).numpy()
    np.testing.assert_allclose(piped, plain, rtol=0, atol=PROBABILITY_ATOL)
    with_tta = (
        predict_logits(model, images, precision="fp32").softmax(1).numpy()
    )  # what our CLI reports (tta_level 1)
    assert np.abs(with_tta - piped).max() > 10 * PROBABILITY_ATOL  # random tiny ViT: near-uniform scores


def test_the_train_stage_saves_a_directory_the_pipeline_loads(tmp_path: Path) -> None:
    from cifar10_pipeline.stages.train import train, write_outputs

    images, labels = synthetic_images(150, seed=5)
    processed = write_train_val(tmp_path / "processed", images, labels, train_size=100)
    hp = train_params(
        widths=[8, 16, 16], epochs=1, batch_size=50, device="cpu", tta_level=1, precision="fp32"
    )
    trained = train(hp, processed)
    write_outputs(
        trained, tmp_path / "model", tmp_path / "history.csv", tmp_path / "train.json", tmp_path / "c.png"
    )
    model = trained.model
    assert (tmp_path / "model" / "preprocessor_config.json").is_file()
    classifier = pipeline("image-classification", model=str(tmp_path / "model"), device="cpu")
    piped = scores_by_label(
        classifier([Image.fromarray(i) for i in images[:4]], top_k=10), model.config.label2id
    )
    np.testing.assert_allclose(
        piped,
        predict_logits(model, images[:4], precision="fp32").softmax(1).numpy(),
        rtol=0,
        atol=PROBABILITY_ATOL,
    )


# A fresh interpreter: the saved folder loads with standard tools after importing the package.
FINETUNED_PIPELINE_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from transformers import pipeline
import cifar10_pipeline.modeling  # registers the project's image processor with AutoImageProcessor

images = np.load(sys.argv[2])
classifier = pipeline("image-classification", model=sys.argv[1], device="cpu")
print(json.dumps(classifier([Image.fromarray(image) for image in images], top_k=10)))
"""


@pytest.mark.slow  # ~15 s: a fine-tune epoch, the save, and a fresh interpreter for the pipeline
def test_fine_tuning_a_checkpoint_with_a_validation_split_saves_its_temperature(tmp_path: Path) -> None:
    """The train stage's path for a Hub/local checkpoint: fine-tune, fit the temperature on the validation
    split, save; the folder reloads with the Auto classes and pipeline(), the temperature kept."""
    from cifar10_pipeline.modeling.model import load_model
    from cifar10_pipeline.stages.train import train, write_outputs

    checkpoint = save_tiny_vit_checkpoint(tmp_path / "tiny-vit")
    images, labels = synthetic_images(150, seed=7)
    processed = write_train_val(tmp_path / "processed", images, labels, train_size=100)
    hp = train_params(
        model=str(checkpoint), finetune_image_size=32, epochs=1, batch_size=50, device="cpu", tta_level=0,
        precision="fp32",
    )  # fmt: skip
    trained = train(hp, processed)
    fitted = trained.summary["temperature"]
    assert fitted is not None and abs(fitted - 1.0) > 1e-3  # a real fit on the 50 validation images
    out = tmp_path / "model"
    write_outputs(trained, out, tmp_path / "history.csv", tmp_path / "train.json", tmp_path / "curves.png")

    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "vit" and calibration_temperature(config) == pytest.approx(fitted)
    loaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert type(loaded) is ViTForImageClassification
    assert calibration_temperature(load_model(out).config) == pytest.approx(fitted)
    # Evaluation and serving read it back: the calibrated logits are the raw ones over the fitted temperature.
    sample = images[:4]
    raw = predict_logits(load_model(out), sample, calibrated=False, precision="fp32")
    torch.testing.assert_close(predict_logits(load_model(out), sample, precision="fp32"), raw / fitted)
    torch.testing.assert_close(predict_logits(trained.model, sample, precision="fp32"), raw / fitted)

    np.save(tmp_path / "images.npy", sample)
    run = subprocess.run(
        [sys.executable, "-c", FINETUNED_PIPELINE_SCRIPT, str(out), str(tmp_path / "images.npy")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    piped = scores_by_label(json.loads(run.stdout.splitlines()[-1]), loaded.config.label2id)
    # transformers' ViT forward knows nothing of the temperature: the pipeline gives the plain softmax
    # (documented in the README), on our preprocessing.
    np.testing.assert_allclose(piped, raw.softmax(1).numpy(), rtol=0, atol=PROBABILITY_ATOL)
