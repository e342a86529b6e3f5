"""The saved model folder as it travels: readable by any user (the container serves it as a non-root user),
loaded from safetensors only and never with a checkpoint's own code."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar10_pipeline.modeling.architectures import save_model
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import build_finetune_model, load_model

from ..support.helpers import save_tiny_vit_checkpoint, tiny_convnet

UNPRIVILEGED_USER = "nobody"  # present on every Debian/Ubuntu image; the Dockerfile's user is uid 10001


@contextlib.contextmanager
def acting_as(user: str) -> Iterator[int]:
    """File access as ``user`` (effective uid and gid, no supplementary groups) inside the block, root again
    after it. In this process rather than a fresh interpreter: this machine's Python may live where the user
    cannot go (under /root); whatever the block imports must be imported before it."""
    entry = pwd.getpwnam(user)
    groups = os.getgroups()
    os.setgroups([entry.pw_gid])
    os.setegid(entry.pw_gid)
    os.seteuid(entry.pw_uid)
    try:
        yield entry.pw_uid
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


def saved_model(directory: Path) -> Path:
    save_model(tiny_convnet(tta_level=1), directory, "cifar_convnet")
    return directory


def copy_like_docker_copy(source: Path, target: Path) -> None:
    """``COPY models/cifar10 /models/cifar10``: files and folders keep their modes, root owns them, and the
    folders above the target are created 0755."""
    for parent in reversed(target.parents):
        if not parent.exists():
            parent.mkdir(mode=0o755)
    shutil.copytree(source, target, copy_function=shutil.copy2)  # copy2/copystat keep the mode bits


def modes(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)) or ".": stat.S_IMODE(p.stat().st_mode)
        for p in [folder, *folder.rglob("*")]
    }


def test_a_saved_model_folder_is_world_readable(tmp_path: Path) -> None:
    folder = saved_model(tmp_path / "model")
    found = modes(folder)
    assert found.pop(".") == 0o755
    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= set(found)
    assert set(found.values()) == {0o644}, found  # save_pretrained alone writes model.safetensors 0600


@pytest.mark.reliability(
    "model folder copied into the container image and read by a non-root user",
    "every file readable, model loads",
)
def test_the_container_user_reads_the_copied_model_folder(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to act as an unprivileged user")
    try:
        pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        pytest.skip(f"no user {UNPRIVILEGED_USER!r} on this machine")
    folder = saved_model(tmp_path / "model")
    predict_logits(load_model(folder), np.zeros((2, 32, 32, 3), dtype=np.uint8))  # imports all it needs
    # Under /tmp, not tmp_path: pytest's temporary folders are 0700, closed to other users at any mode.
    image_root = Path(tempfile.mkdtemp(prefix="image-root-"))
    try:
        image_root.chmod(0o755)
        target = image_root / "models" / "cifar10"
        copy_like_docker_copy(folder, target)
        with acting_as(UNPRIVILEGED_USER) as uid:
            assert os.geteuid() == uid != 0
            files = sorted(p.name for p in target.rglob("*") if p.is_file())
            size = sum(len((target / name).read_bytes()) for name in files)
            logits = predict_logits(load_model(target), np.zeros((2, 32, 32, 3), dtype=np.uint8))
    finally:
        shutil.rmtree(image_root)
    assert os.geteuid() == 0
    assert files == sorted(p.name for p in folder.iterdir())
    assert size == sum(p.stat().st_size for p in folder.iterdir())
    assert logits.shape == (2, 10)


def only_pickled_weights(folder: Path) -> Path:
    """``folder`` with its safetensors weights replaced by a pickled pytorch_model.bin of the same tensors."""
    from safetensors.torch import load_file

    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.mark.reliability(
    "a model folder holding only pickled weights (pytorch_model.bin)",
    "refused before anything is unpickled, with a message naming model.safetensors",
)
def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    folder = only_pickled_weights(saved_model(tmp_path / "model"))
    with pytest.raises(
        FileNotFoundError, match=r"no model\.safetensors.*pytorch_model\.bin.*save_pretrained"
    ):
        load_model(folder)


@pytest.mark.reliability(
    "a checkpoint to fine-tune holding only pickled weights (pytorch_model.bin)",
    "refused, with a message naming model.safetensors",
)
def test_pickled_weights_are_refused_for_fine_tuning_too(tmp_path: Path) -> None:
    checkpoint = save_tiny_vit_checkpoint(tmp_path / "tiny-vit")
    only_pickled_weights(checkpoint)
    with pytest.raises(OSError, match=r"model\.safetensors"):
        build_finetune_model(str(checkpoint), image_size=32, tta_level=0)


# transformers copies remote code into its modules cache before importing it: the marker's path is absolute.
EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("the checkpoint's own code ran")
"""


@pytest.mark.reliability(
    "a model folder whose config.json points at its own Python code (auto_map)",
    "refused; the code never runs",
)
def test_a_checkpoints_own_code_never_runs(tmp_path: Path) -> None:
    folder = saved_model(tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "evil_net",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForImageClassification": "evil.EvilModel"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(folder)
    assert not marker.exists()
