"""A model published to a Hub and used from it, end to end against the loopback Hub
(tests/support/hubserver.py) with the real huggingface_hub client: ``cifar10 publish`` (create_repo,
preupload, LFS upload, commit, tag), then ``cifar10 predict --model owner/name@revision`` in a fresh process,
``transformers.pipeline`` through ``saved_model_dir`` and ``cifar10 serve``'s app, each giving the local
folder's probabilities.

Every client runs with its own HF_HOME (its cache and token file in the test's folder) and HF_ENDPOINT at the
loopback Hub; HF_HUB_DISABLE_XET=1 because the loopback Hub speaks the LFS protocol, not Xet storage (see
tests/support/hubserver.py). The in-process client reads its settings when ``huggingface_hub.constants`` is
imported: the ``consumer`` fixture sets them and re-reads that module, and puts it back afterwards.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from PIL import Image

from cifar10_pipeline.core.images import image_to_array
from cifar10_pipeline.core.paths import saved_model_dir
from cifar10_pipeline.modeling.architectures import save_model
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import load_model
from cifar10_pipeline.serving import cli
from cifar10_pipeline.serving.serve import create_app
from cifar10_pipeline.serving.settings import ServeSettings

from ..conftest import synthetic_images
from ..support.helpers import run_checked, tiny_convnet
from ..support.hubserver import LoopbackHub, serve_hub

TOKEN = "hf_loopback_write_token"
REPO = "loopback-user/cifar10-tiny"
# Subprocess against in-process (and the pipeline's one image per pass against a batch): fp32 sums in
# another order, so probabilities agree to rounding (~1e-8), not bit for bit; 1e-6 is far below any change
# a different model or preprocessing makes.
PROBABILITY_ATOL = 1e-6


def client_env(home: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a huggingface_hub client of its own (HF_HOME) talking to ``endpoint``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return env | {
        "HF_HOME": str(home),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **extra,
    }


def cifar10(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_checked([sys.executable, "-m", "cifar10_pipeline.serving.cli", *args], cwd, env, timeout=120)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A tiny conv net with test-time augmentation, saved as the train stage saves it (with its processor)."""
    directory = tmp_path / "model"
    save_model(tiny_convnet(tta_level=2), directory, "cifar_convnet")
    return directory


@pytest.fixture
def card(tmp_path: Path) -> Path:
    """A card with a model-index, as the model_card stage writes it (huggingface_hub's ModelCardData)."""
    data = ModelCardData(
        model_name="cifar10-tiny",
        library_name="transformers",
        pipeline_tag="image-classification",
        eval_results=[EvalResult(task_type="image-classification", dataset_type="uoft-cs/cifar10",
                                 dataset_name="CIFAR-10", metric_type="accuracy", metric_value=0.1)],
    )  # fmt: skip
    path = tmp_path / "model_card.md"
    path.write_text(f"---\n{data.to_yaml()}\n---\n\n# cifar10-tiny\n")
    return path


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    pixels, _ = synthetic_images(6, seed=3)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, array in enumerate(pixels):
        Image.fromarray(array).resize((48, 40)).save(folder / f"{i}.png")
    return sorted(str(p) for p in folder.glob("*.png"))


@pytest.fixture
def hub() -> Iterator[tuple[LoopbackHub, str]]:
    loopback = LoopbackHub(token=TOKEN)
    with serve_hub(loopback) as endpoint:
        yield loopback, endpoint


@pytest.fixture
def consumer(tmp_path: Path, hub: tuple[LoopbackHub, str]) -> Iterator[Path]:
    """This process's client pointed at the loopback Hub, with a cache of its own; yields its HF_HOME."""
    import huggingface_hub.constants

    home = tmp_path / "hf-consumer"
    with pytest.MonkeyPatch.context() as environment:
        for name in [k for k in os.environ if k.startswith("HF_")]:
            environment.delenv(name)
        for name, value in client_env(home, hub[1]).items():
            environment.setenv(name, value)
        importlib.reload(huggingface_hub.constants)
        yield home
    importlib.reload(huggingface_hub.constants)  # the settings of the session again


def publish(model_dir: Path, card: Path, endpoint: str, tmp_path: Path, *args: str) -> str:
    """``cifar10 publish`` in its own process; returns the pinned id it prints."""
    env = client_env(tmp_path / "hf-publisher", endpoint, HF_TOKEN=TOKEN)
    arguments = ["publish", REPO, "--model", str(model_dir), "--card", str(card), *args]
    done = cifar10(*arguments, env=env, cwd=tmp_path)
    return done.stdout.split("cifar10 predict --model ")[1].split()[0]


def local_probabilities(model_dir: Path, images: list[str], capsys: pytest.CaptureFixture[str]) -> np.ndarray:
    assert cli.main(["predict", "--json", "--model", str(model_dir), *images]) == 0
    return probabilities_of(capsys.readouterr().out)


def probabilities_of(predict_json: str) -> np.ndarray:
    document = json.loads(predict_json)
    assert document["errors"] == 0
    return np.array([list(r["probabilities"].values()) for r in document["results"]])


@pytest.mark.reliability(
    "a model published to the (loopback) Hub and loaded by its pinned id in a fresh process",
    "the Hub repository holds the folder and the card with its model-index; predict gives the folder's "
    "probabilities",
)
def test_published_model_predicts_like_the_folder_in_a_fresh_process(
    model_dir: Path,
    card: Path,
    images: list[str],
    hub: tuple[LoopbackHub, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    loopback, endpoint = hub
    pinned = publish(model_dir, card, endpoint, tmp_path)
    repo = loopback.repo(REPO)
    assert pinned == f"{REPO}@{repo.commit}"
    on_disk = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    created = {".gitattributes": repo.files[".gitattributes"]}  # by create_repo, as on the Hub
    assert repo.files == on_disk | {"README.md": card.read_bytes()} | created
    assert repo.lfs_paths == {"model.safetensors"}  # the weights went through the LFS upload, JSON as blobs
    assert ModelCard(repo.files["README.md"].decode()).data.eval_results[0].metric_value == 0.1

    env = client_env(tmp_path / "hf-fresh", endpoint)  # no token: reading needs none
    done = cifar10("predict", "--json", "--model", pinned, *images, env=env, cwd=tmp_path)
    from_hub = probabilities_of(done.stdout)
    np.testing.assert_allclose(from_hub, local_probabilities(model_dir, images, capsys), rtol=0,
                               atol=PROBABILITY_ATOL)  # fmt: skip
    # It listed the pinned commit's tree and fetched each file at that commit, then verified the checksums.
    fetched = {path for method, path in loopback.requests if method == "GET" and "/resolve/" in path}
    assert fetched == {f"/{REPO}/resolve/{repo.commit}/{name}" for name in repo.files}


def test_pipeline_and_serve_load_a_tagged_hub_model_from_the_cache(
    model_dir: Path,
    card: Path,
    images: list[str],
    hub: tuple[LoopbackHub, str],
    consumer: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from transformers import pipeline

    loopback, endpoint = hub
    assert publish(model_dir, card, endpoint, tmp_path, "--tag", "v1") == f"{REPO}@v1"
    commit = loopback.repo(REPO).tags["v1"]
    folder = saved_model_dir(f"{REPO}@v1")
    assert folder.parent.name == "snapshots" and folder.name == commit and consumer in folder.parents

    classifier = pipeline("image-classification", model=folder, device="cpu")
    results = classifier([Image.open(path) for path in images], top_k=10)
    label_order = classifier.model.config.label2id
    piped = np.zeros((len(images), len(label_order)))
    for row, result in zip(piped, results, strict=True):
        for entry in result:
            row[label_order[entry["label"]]] = entry["score"]
    # The pipeline runs fp32; predict's "auto" precision may take bf16 (an AMX CPU): compare with fp32.
    arrays = np.stack([image_to_array(path) for path in images])
    ours = predict_logits(load_model(model_dir), arrays, precision="fp32").softmax(1).numpy()
    np.testing.assert_allclose(piped, ours, rtol=0, atol=PROBABILITY_ATOL)

    def downloads() -> int:
        return sum(1 for method, path in loopback.requests if method == "GET" and "/resolve/" in path)

    before = downloads()
    settings = ServeSettings(model=f"{REPO}@{commit}", git_commit="0" * 12)
    with TestClient(create_app(settings)) as client:
        health = client.get("/health").json()
    assert health["model"]["name"] == f"{REPO}@{commit}" and health["model"]["source"] == settings.model
    # The commit's files came from the cache: nothing was downloaded again.
    assert downloads() == before


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (f"{REPO}@v9", rf"cifar10 predict: error: the Hub model {REPO} has no revision 'v9' \(http://"),
        ("loopback-user/unknown@v1", "cifar10 predict: error: no model repository loopback-user/unknown on "),
        (
            "loopback-user/unknown",
            "cifar10 predict: error: no folder loopback-user/unknown here, and no model repository ",
        ),
        (f"{REPO}@{'f' * 40}", rf"cifar10 predict: error: the Hub model {REPO} has no revision 'f{{40}}'"),
    ],
    ids=["unknown-tag", "unknown-repo", "unknown-repo-or-folder", "unknown-commit"],
)
def test_unknown_revision_or_repo_is_one_line_with_a_hint(
    model: str,
    message: str,
    model_dir: Path,
    card: Path,
    images: list[str],
    hub: tuple[LoopbackHub, str],
    consumer: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    publish(model_dir, card, hub[1], tmp_path, "--tag", "v1")
    capsys.readouterr()
    assert cli.main(["predict", "--model", model, *images]) == cli.EXIT_USAGE
    error, hint = capsys.readouterr().err.splitlines()
    assert re.match(message, error), error
    assert hint.startswith("cifar10 predict: hint: ")


@pytest.mark.reliability(
    "the Hub serves weights whose bytes do not match the sha256 it lists",
    "the model is refused in one line naming the file; nothing is loaded",
)
def test_hub_files_that_do_not_match_their_checksums_are_refused(
    model_dir: Path,
    card: Path,
    images: list[str],
    hub: tuple[LoopbackHub, str],
    consumer: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    loopback, endpoint = hub
    pinned = publish(model_dir, card, endpoint, tmp_path)
    capsys.readouterr()
    # The Hub lists (and sends as the ETag) another sha256 than the bytes' own: the client's download checks
    # sizes only, so only the verification against the listed checksums can tell.
    loopback.repo(REPO).advertised_sha256["model.safetensors"] = "ab" * 32
    assert cli.main(["predict", "--model", pinned, *images]) == cli.EXIT_USAGE
    error, hint = capsys.readouterr().err.splitlines()
    assert error.startswith(f"cifar10 predict: error: {pinned}@")
    assert "do not match the Hub's checksums" in error
    assert "model.safetensors (sha256" in error and "the Hub lists abababababab" in error
    assert hint.startswith("cifar10 predict: hint: delete the cached copy")


def test_publish_without_a_token_or_card_says_what_to_do(
    model_dir: Path, card: Path, hub: tuple[LoopbackHub, str], tmp_path: Path
) -> None:
    endpoint = hub[1]
    env = client_env(tmp_path / "hf-anonymous", endpoint)
    base = [sys.executable, "-m", "cifar10_pipeline.serving.cli", "publish", REPO, "--model", str(model_dir)]
    done = subprocess.run([*base, "--card", str(card)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_USAGE
    error, hint = done.stderr.splitlines()
    assert error.startswith(f"cifar10 publish: error: the Hub at {endpoint} refused the upload: ")
    assert hint.startswith("cifar10 publish: hint: set HF_TOKEN")

    card.write_text("# a card without metadata\n")
    done = subprocess.run([*base, "--card", str(card)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == cli.EXIT_USAGE
    assert done.stderr.splitlines() == [
        f"cifar10 publish: error: {card} has no model-index in its metadata (the eval results the Hub shows)",
        "cifar10 publish: hint: regenerate the card: dvc repro model_card",
    ]
    assert hub[0].repos == []  # nothing was created


@pytest.mark.reliability(
    "the Hub cannot be reached (HF_HUB_OFFLINE=1) after a pinned model was downloaded once",
    "the cached snapshot loads without a request (logged as not re-verified); an uncached one is refused "
    "in one line",
)
def test_offline_a_cached_model_loads_and_an_uncached_one_says_why(
    model_dir: Path,
    card: Path,
    hub: tuple[LoopbackHub, str],
    consumer: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import huggingface_hub.constants

    from cifar10_pipeline.core import hub as hub_module
    from cifar10_pipeline.core.hub import HubModelError

    loopback, endpoint = hub
    pinned = publish(model_dir, card, endpoint, tmp_path, "--tag", "v1")
    online = saved_model_dir(f"{REPO}@v1")  # by its tag: the cache records what v1 named (refs/v1)
    hub_module._download_model.cache_clear()  # a new process, as far as the memo goes
    seen = len(loopback.requests)
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("HF_HUB_OFFLINE", "1")
        importlib.reload(huggingface_hub.constants)
        with caplog.at_level("WARNING", logger="cifar10_pipeline.core.hub"):
            assert saved_model_dir(pinned) == online
            assert saved_model_dir(f"{REPO}@v1") == online
        with pytest.raises(HubModelError, match=r"^cannot reach the Hub at .* and loopback-user/other@v1 "):
            saved_model_dir("loopback-user/other@v1")
    importlib.reload(huggingface_hub.constants)
    assert len(loopback.requests) == seen  # not one request reached the Hub
    assert "offline, the cached snapshot" in caplog.text and "is not re-verified" in caplog.text
