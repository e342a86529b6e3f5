"""Small builders shared by tests (kept out of conftest so they can be imported explicitly)."""

from __future__ import annotations

import contextlib
import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from cifar10_pipeline.core.data import ArraySplit, save_split
from cifar10_pipeline.core.params import TrainParams, validate_params
from cifar10_pipeline.modeling.convnet import build_cifar_convnet

from ..conftest import PROJECT_ROOT


def default_raw_params() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())


def train_params(**changes) -> TrainParams:
    """The committed train section with ``changes`` applied (validated like params.yaml)."""
    raw = copy.deepcopy(default_raw_params())
    raw["train"].update(changes)
    return validate_params(raw).train


def tiny_convnet(tta_level: int = 0, seed: int = 0):
    torch.manual_seed(seed)
    model = build_cifar_convnet([16, 32, 32], tta_level=tta_level)
    model.init_whitening(torch.randn(64, 3, 32, 32))
    return model.eval()


def save_tiny_convnet(directory: Path, tta_level: int = 0, seed: int = 0) -> Path:
    tiny_convnet(tta_level, seed).save_pretrained(directory)
    return directory


def save_tiny_vit_checkpoint(
    directory: Path,
    image_size: int = 32,
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
) -> Path:
    """A random transformers ViT written by save_pretrained with its image processor beside it, as a Hub
    download looks (5 labels of its own): the fine-tuning path's stand-in for a real checkpoint."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=image_size, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=5)  # fmt: skip
    ViTForImageClassification(config).save_pretrained(directory)
    processor = ViTImageProcessor(
        image_mean=list(image_mean),
        image_std=list(image_std),
        size={"height": image_size, "width": image_size},
    )
    processor.save_pretrained(directory)
    return directory


def write_train_val(folder: Path, images: np.ndarray, labels: np.ndarray, train_size: int) -> Path:
    """A processed folder as the preprocess stage writes it: the first ``train_size`` images in train.npz,
    the rest in val.npz (source rows numbered in order)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = np.arange(len(labels))
    for name, part in (("train", slice(0, train_size)), ("val", slice(train_size, None))):
        save_split(folder / f"{name}.npz", ArraySplit(images[part], labels[part], rows[part]))
    return folder


def run_checked(
    args: list[str], cwd: Path, env: dict[str, str], timeout: float, log: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; fail with its output's tail if it fails or overruns (``log`` gets all of it)."""
    try:
        done = subprocess.run(
            args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} ran past {timeout}s:\n{str(exc.output)[-3000:]}") from None
    output = done.stdout + done.stderr
    if log is not None:
        log.write_text(output)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{output[-4000:]}"
    return done


def write_params(root: Path, **sections: dict) -> None:
    """Rewrite ``root/params.yaml`` with per-section overrides."""
    raw = default_raw_params()
    for section, values in sections.items():
        if isinstance(values, dict):
            raw[section].update(values)
        else:
            raw[section] = values
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


CHROME_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
)


@contextlib.contextmanager
def headless_chrome(window_size: str = "1200,900") -> Iterator[Any]:
    """Debian's Chromium driven by selenium; skips the test when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    chromedriver = shutil.which("chromedriver")
    if binary is None or chromedriver is None:
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROME_FLAGS, f"--window-size={window_size}"):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    chrome = webdriver.Chrome(service=Service(chromedriver), options=options)
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def register_history(tmp_path: Path, versions: int, name: str = "cifar10-classifier") -> None:
    """``versions`` promoted registrations of ``name`` in the store that MLFLOW_TRACKING_URI names."""
    from mlflow.tracking import MlflowClient

    from cifar10_pipeline.tracking import model_registry

    from ..conftest import synthetic_images

    client = MlflowClient()
    experiment_id = client.create_experiment("history", artifact_location=(tmp_path / "art").as_uri())
    model_dir = save_tiny_convnet(tmp_path / "old-model")
    images, _ = synthetic_images(4, seed=0)
    for accuracy in np.linspace(0.5, 0.7, versions):
        model_registry.log_and_register(
            client.create_run(experiment_id).info.run_id,
            model_dir,
            name,
            example_images=images,
            example_probabilities=np.full((4, 10), 0.1),
            accuracy=float(accuracy),
            test_set="earlier",
            evaluate_champion=lambda uri: 0.0,
        )
    champion = client.get_model_version_by_alias(name, model_registry.CHAMPION)
    versions_found = {v.version: v.tags for v in client.search_model_versions(f"name='{name}'")}
    assert str(champion.version) == str(versions), (champion.version, versions_found)


def fresh_and_history_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, earlier: int = 3
) -> Iterator[str]:
    """MLflow pointed at a fresh store, then at one holding ``earlier`` promoted registrations (what a stage
    writes must not depend on the store's history); yields "fresh", then "history"."""
    import mlflow

    for name, versions in (("fresh", 0), ("history", earlier)):
        uri = f"sqlite:///{tmp_path / f'{name}.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        if versions:
            register_history(tmp_path / name, versions)
        yield name
