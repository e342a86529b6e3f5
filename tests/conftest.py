"""Shared fixtures: small synthetic CIFAR-shaped data, a scratch project root, the real mirror if present."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from cifar10_pipeline import NUM_CLASSES
from cifar10_pipeline.core.data import ArraySplit, write_checksums, write_parquet_split
from cifar10_pipeline.core.params import load_params


def _registry_uri_setting() -> tuple[str | None, str | None]:
    """MLFLOW_REGISTRY_URI and MLflow's own module setting (None while mlflow is not imported)."""
    module = sys.modules.get("mlflow.tracking._model_registry.utils")
    return os.environ.get("MLFLOW_REGISTRY_URI"), getattr(module, "_registry_uri", None)


@pytest.fixture(autouse=True)
def no_leaked_registry_uri() -> Iterator[None]:
    """A test (or a stage called in-process) that points MLflow's registry somewhere must put it back: the
    setting outlives the test in its xdist worker, and later tests then register into that store."""
    before = _registry_uri_setting()
    yield
    after = _registry_uri_setting()
    assert after == before, f"the test left MLflow's registry URI set: {after} (was {before})"


PROJECT_ROOT = Path(__file__).resolve().parents[1]
# --reliability-report: the results of the tests marked reliability(case, outcome), for reports/reliability.md
pytest_plugins = ("tests.support.reliability",)


def mirror_dir() -> Path | None:
    """The real CIFAR-10 mirror (params.yaml's download.mirror_dir, from the project root), or None."""
    candidate = PROJECT_ROOT / load_params(PROJECT_ROOT / "params.yaml").download.mirror_dir
    return candidate if (candidate / "SHA256SUMS").is_file() else None


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and images whose colour depends on the class, so a model can learn them quickly."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NUM_CLASSES
    base = np.stack([np.full((32, 32, 3), 0, np.uint8)] * n)
    palette = rng.integers(0, 255, size=(NUM_CLASSES, 3))
    noise = rng.integers(-40, 40, size=(n, 32, 32, 3))
    images = np.clip(base + palette[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def write_mirror(directory: Path, train_size: int = 200, test_size: int = 100) -> Path:
    """A mirror folder in the uoft-cs/cifar10 Parquet schema (two train shards, one test shard)."""
    directory.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_images(train_size, seed=1)
    test_images, test_labels = synthetic_images(test_size, seed=2)
    half = train_size // 2
    write_parquet_split(directory / "train-00000-of-00002.parquet", train_images[:half], train_labels[:half])
    write_parquet_split(directory / "train-00001-of-00002.parquet", train_images[half:], train_labels[half:])
    write_parquet_split(directory / "test-00000-of-00001.parquet", test_images, test_labels)
    write_checksums(directory, [p.name for p in directory.glob("*.parquet")])
    return directory


@pytest.fixture
def synthetic_mirror(tmp_path: Path) -> Path:
    return write_mirror(tmp_path / "mirror")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A scratch project root holding a copy of params.yaml; the test runs inside it."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "params.yaml", root / "params.yaml")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return root


@pytest.fixture(scope="session")
def real_mirror() -> Path:
    path = mirror_dir()
    if path is None:
        pytest.skip("the CIFAR-10 mirror is not available (download.mirror_dir in conf/config.yaml)")
    return path


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A folder of this test session that every xdist worker shares (each worker's own base folder is one
    level below it), for what is prepared once per session under a file lock."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if hasattr(request.config, "workerinput") else base


@pytest.fixture(scope="session")
def small_mirror(real_mirror: Path, session_dir: Path) -> Path:
    """2,000 train and 500 test real images in the mirror's format (tests/support/mirrors.py); runs on it
    set support.mirrors.SMALL_MIRROR_PARAMS."""
    from .support.mirrors import shared_small_mirror

    with shared_small_mirror(real_mirror, session_dir) as path:
        return path


@dataclass(frozen=True)
class RealQuickModel:
    """A small conv net trained on real CIFAR-10 images, saved the way the train stage saves a model."""

    model_dir: Path
    train: ArraySplit  # the images it was fitted on
    test: ArraySplit  # held-out images from the test split
    train_seconds: float


# 2,000 training images (the first rows of the mirror's first shard: 200 per class) for 4 epochs of a
# [32, 64, 64] net: ~35-40 % test accuracy in ~30 s of 2 uncontended cores (~55 s of CPU time).
QUICK_TRAIN_IMAGES = 2000
QUICK_TEST_IMAGES = 500


@pytest.fixture(scope="session")
def real_quick_model(real_mirror: Path, tmp_path_factory: pytest.TempPathFactory) -> RealQuickModel:
    """Trained once per session with the project's loop and recipe (flip and translate augmentation on)."""
    import torch

    from cifar10_pipeline.core.data import decode_split, read_raw_split
    from cifar10_pipeline.modeling.architectures import build_model
    from cifar10_pipeline.training.loop import train_classifier

    from .support.helpers import train_params  # helpers imports this module: import it late

    train_images, train_labels = decode_split(
        read_raw_split(real_mirror, "train").slice(0, QUICK_TRAIN_IMAGES), "train"
    )
    test_images, test_labels = decode_split(
        read_raw_split(real_mirror, "test").slice(0, QUICK_TEST_IMAGES), "test"
    )
    train = ArraySplit(train_images, train_labels, np.arange(len(train_labels)))
    test = ArraySplit(test_images, test_labels, np.arange(len(test_labels)))
    hp = train_params(
        widths=[32, 64, 64], epochs=4, batch_size=200, whiten_bias_epochs=1, device="cpu", precision="fp32"
    )
    assert hp.flip and hp.translate > 0  # the invariance tests rely on the committed augmentation
    model = build_model(hp)
    result = train_classifier(model, train, None, hp, torch.device("cpu"), progress=False)
    model_dir = tmp_path_factory.mktemp("real-quick-model") / "model"
    model.save_pretrained(model_dir)
    return RealQuickModel(model_dir, train, test, result.train_seconds)


# Tiers by folder: each test gets the marker of the folder it lives in (tests/unit/... -> unit), so a tier is
# selectable with -m and the folder alone says which tier a test is in.
TIERS = ("unit", "data", "model", "integration", "browser", "release")


# Side by side (`make test`: xdist's loadscope): a module's tests, or a class's, share one worker, so a module
# fixture (a sweep, a team server) is built once. Longest first: the tiers that start processes go first, so
# the unit tests fill the gaps at the end instead of a long module starting last.
SCHEDULE_ORDER = ("integration", "browser", "model", "data", "unit")
# The longest units (minutes on 2 cores: module fixtures running sweeps, servers, whole pipelines) go first of
# all, so none of them starts last and holds one worker alone at the end. A unit is a module's functions
# (named by the module) or one class (`module::Class`); a class not named here ranks with the other units.
LONGEST_FIRST = (
    "integration/test_experiments.py",
    "integration/test_team_server.py",
    "integration/test_team_auth.py",
    "integration/test_faults.py::TestKillModelStages",
    "integration/test_team_faults.py",  # one team stack, restarted after each of its kills
    "integration/test_pipeline.py",
    "integration/test_faults.py::TestKillDataAndReportStages",
    "integration/test_team_concurrency.py",
    "integration/test_team_backup.py",
    "integration/test_faults.py",
    "integration/test_distributed.py",
    "integration/test_service_flood.py",
)


def pytest_configure(config: pytest.Config) -> None:
    # xdist 3.8's loadscope re-sorts the units by their number of tests unless told not to, which throws the
    # order below away (the minutes-long modules have few tests, so they started last): refuse that run.
    if config.getoption("dist", "no") == "loadscope" and config.getoption("loadscopereorder", False):
        raise pytest.UsageError(
            "--dist loadscope without --no-loadscope-reorder: xdist would reorder the units by their number "
            "of tests and start the longest modules last; add --no-loadscope-reorder (as `make test` does)"
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_dir = Path(__file__).resolve().parent
    tier_of: dict[int, str] = {}
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(tests_dir).parts
        tier_of[id(item)] = parts[0] if len(parts) > 1 and parts[0] in TIERS else ""
        if tier_of[id(item)]:
            item.add_marker(getattr(pytest.mark, tier_of[id(item)]))
    rank = {tier: i for i, tier in enumerate(SCHEDULE_ORDER)}
    first = {unit: i for i, unit in enumerate(LONGEST_FIRST)}

    def order(item: pytest.Item) -> tuple[int, int]:
        module = Path(str(item.path)).resolve().relative_to(tests_dir).as_posix()
        unit = f"{module}::{item.cls.__name__}" if item.cls is not None else module
        return (first.get(unit, len(first)), rank.get(tier_of[id(item)], len(rank)))

    items.sort(key=order)  # stable within a unit
