"""Hostile or broken download sources: names that climb out of their folder, links, crafted archives,
malicious pickles, a mirror path that is a file, and no network at all. Nothing here touches the real
network: archives are served from a loopback HTTP server and "offline" is a closed loopback port."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from cifar10_pipeline.core.data import DataError, read_checksums
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.stages.download import download, load_cifar_batch

from ..conftest import PROJECT_ROOT, synthetic_images
from ..support.hubserver import HubRepo, serve_hub
from ..support.localserver import free_port


def _params(project: Path, **changes):
    return load_params(project / "params.yaml").download.model_copy(update=changes)


# --- names in SHA256SUMS and in a mirror ----------------------------------------------------------------


@pytest.mark.reliability(
    "SHA256SUMS lists a name with '..', a folder or an absolute path",
    "the name is refused with a message naming the file and line; nothing outside the mirror is read",
)
@pytest.mark.parametrize("name", ["../secret.parquet", "/etc/passwd", "sub/train-0.parquet", ".."])
def test_checksum_names_must_be_plain(
    project: Path, synthetic_mirror: Path, tmp_path: Path, name: str
) -> None:
    (tmp_path / "secret.parquet").write_bytes(b"outside the mirror")
    sums = synthetic_mirror / "SHA256SUMS"
    sums.write_text(sums.read_text() + f"{'0' * 64}  {name}\n")
    with pytest.raises(DataError, match=rf"SHA256SUMS:4: refusing the file name '{name}'"):
        read_checksums(sums)
    with pytest.raises(DataError, match=r"refusing the file name .*only plain file names"):
        download(_params(project, sources=["mirror", "url"], mirror_dir=str(synthetic_mirror)))
    assert not (project / "data/raw").exists()


def test_mirror_of_symlinks_to_regular_files_is_accepted(
    project: Path, synthetic_mirror: Path, tmp_path: Path
) -> None:
    """Large data often lives on another disk, the mirror folder holding links to it."""
    store = tmp_path / "store"
    store.mkdir()
    for shard in synthetic_mirror.glob("*.parquet"):
        shard.rename(store / shard.name)
        shard.symlink_to(store / shard.name)
    download(_params(project, sources=["mirror"], mirror_dir=str(synthetic_mirror)))
    for shard in synthetic_mirror.glob("*.parquet"):
        copied = project / "data/raw" / shard.name
        assert not copied.is_symlink() and copied.read_bytes() == (store / shard.name).read_bytes()


@pytest.mark.reliability(
    "a mirror shard is a symbolic link to a file whose bytes differ from SHA256SUMS",
    "refused as a checksum mismatch, like a regular file; nothing is copied",
)
def test_mirror_symlink_to_other_bytes_is_refused(
    project: Path, synthetic_mirror: Path, tmp_path: Path
) -> None:
    shard = synthetic_mirror / "test-00000-of-00001.parquet"
    other = tmp_path / "other.parquet"
    other.write_bytes((synthetic_mirror / "train-00000-of-00002.parquet").read_bytes())
    shard.unlink()
    shard.symlink_to(other)
    with pytest.raises(DataError, match=r"checksum mismatch for .*test-00000-of-00001\.parquet"):
        download(_params(project, sources=["mirror"], mirror_dir=str(synthetic_mirror)))
    assert not (project / "data/raw").exists()


@pytest.mark.reliability(
    "a mirror shard is a dangling symbolic link, or a link to a folder or to /dev/zero",
    "refused with a message naming the link and its target, before anything is read from it",
)
@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("gone.parquet", r"which does not exist \(a dangling link\)"),
        ("folder", "which is not a regular file"),
        ("/dev/zero", "which is not a regular file"),
    ],
)
def test_mirror_symlink_to_nothing_or_no_file_is_refused(
    project: Path, synthetic_mirror: Path, tmp_path: Path, target: str, message: str
) -> None:
    (tmp_path / "folder").mkdir()
    shard = synthetic_mirror / "test-00000-of-00001.parquet"
    shard.unlink()
    shard.symlink_to(tmp_path / target)
    with pytest.raises(DataError, match=rf"test-00000-of-00001\.parquet is a symbolic link to .*{message}"):
        download(_params(project, sources=["mirror"], mirror_dir=str(synthetic_mirror)))
    assert not (project / "data/raw").exists()


@pytest.mark.reliability(
    "download.mirror_dir names a file, not a folder",
    "reported as 'is a file, not a folder' (not 'does not exist'), and the next source is tried",
)
def test_mirror_path_that_is_a_file(project: Path, tmp_path: Path, serve_archive) -> None:
    not_a_folder = tmp_path / "cifar10.tar"
    not_a_folder.write_bytes(b"x")
    with pytest.raises(
        DataError, match=r"(?s)mirror: mirror .*cifar10\.tar is a file, not a folder"
    ) as error:
        download(_params(project, sources=["mirror"], mirror_dir=str(not_a_folder)))
    assert "does not exist" not in str(error.value)
    # ... and it hands over, as a missing mirror does.
    url, md5 = serve_archive(cifar_archive())
    info = download(
        _params(project, sources=["mirror", "url"], mirror_dir=str(not_a_folder), url=url, url_md5=md5)
    )
    assert info["source"] == "url"


# --- the original archive: crafted tarballs and pickles, served on loopback -------------------------------


def _batch_payload(images: np.ndarray, labels: np.ndarray) -> bytes:
    return pickle.dumps(
        {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": labels.tolist()}
    )


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def cifar_archive(
    extra: Callable[[tarfile.TarFile], None] | None = None, batch_payload: bytes | None = None
) -> bytes:
    """cifar-10-python.tar.gz in its real layout (10 images per batch); ``extra`` adds members,
    ``batch_payload`` replaces data_batch_1's pickle."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for i, name in enumerate([*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]):
            payload = _batch_payload(*synthetic_images(10, seed=i))
            if name == "data_batch_1" and batch_payload is not None:
                payload = batch_payload
            _add(tar, f"cifar-10-batches-py/{name}", payload)
        if extra is not None:
            extra(tar)
    return buffer.getvalue()


@pytest.fixture
def serve_archive(tmp_path: Path) -> Iterator[Callable[[bytes], tuple[str, str]]]:
    """Serve archives over loopback HTTP: ``serve(archive_bytes)`` -> (url, md5)."""
    folder = tmp_path / "www"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    count = iter(range(1000))

    def serve(archive: bytes) -> tuple[str, str]:
        name = f"cifar-10-python-{next(count)}.tar.gz"
        (folder / name).write_bytes(archive)
        return f"http://127.0.0.1:{server.server_address[1]}/{name}", hashlib.md5(archive).hexdigest()

    try:
        yield serve
    finally:
        server.shutdown()
        server.server_close()


def _symlink(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
    info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(info)


def _hardlink(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
    info.type, info.linkname = tarfile.LNKTYPE, "/etc/shadow"
    tar.addfile(info)


def _device(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("cifar-10-batches-py/null")
    info.type = tarfile.CHRTYPE
    tar.addfile(info)


HOSTILE_MEMBERS = {
    "symlink": (_symlink, r"'cifar-10-batches-py/readme\.html' is a link \(to '/etc/passwd'\)"),
    "hardlink": (_hardlink, r"'cifar-10-batches-py/batches\.meta' is a link \(to '/etc/shadow'\)"),
    "absolute": (
        lambda tar: _add(tar, "/tmp/cifar-evil.txt", b"x"),
        r"'/tmp/cifar-evil\.txt' has an absolute",
    ),
    "dotdot": (
        lambda tar: _add(tar, "cifar-10-batches-py/../../evil.txt", b"x"),
        r"'cifar-10-batches-py/\.\./\.\./evil\.txt' has an absolute path or '\.\.'",
    ),
    "device": (_device, r"'cifar-10-batches-py/null' is not a regular file"),
    "duplicate": (
        lambda tar: _add(tar, "other/data_batch_1", _batch_payload(*synthetic_images(10, seed=7))),
        r"'other/data_batch_1' repeats the file name data_batch_1",
    ),
}


@pytest.mark.reliability(
    "the original tarball holds a symlink, a hardlink, an absolute or '..' path, a device or a repeated name",
    "the whole archive is refused with the member named; nothing is extracted or written",
)
@pytest.mark.parametrize("kind", list(HOSTILE_MEMBERS))
def test_hostile_tar_members_are_refused(project: Path, serve_archive, kind: str) -> None:
    add, message = HOSTILE_MEMBERS[kind]
    url, md5 = serve_archive(cifar_archive(extra=add))
    with pytest.raises(
        DataError, match=rf"(?s)no CIFAR-10 source worked.*url: .*refusing the archive: member {message}"
    ):
        download(_params(project, sources=["url"], url=url, url_md5=md5))
    assert not (project / "data/raw").exists()
    assert not (project.parent.parent / "evil.txt").exists() and not Path("/tmp/cifar-evil.txt").exists()


class _Exploit:
    """Runs ``touch <marker>`` when unpickled by a plain pickle.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.reliability(
    "a CIFAR batch in the archive is a pickle whose __reduce__ calls os.system",
    "refused by the restricted unpickler before anything runs (the file it would create never appears)",
)
def test_malicious_pickle_is_refused_without_running(project: Path, serve_archive, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]})
    # A plain pickle.load would run it (shown on a copy, so the check below means something):
    pickle.loads(pickle.dumps(_Exploit(tmp_path / "control")))
    assert (tmp_path / "control").exists()

    url, md5 = serve_archive(cifar_archive(batch_payload=payload))
    with pytest.raises(DataError, match=r"data_batch_1: refused: UnpicklingError: refusing posix\.system"):
        download(_params(project, sources=["url"], url=url, url_md5=md5))
    assert not marker.exists()
    assert not (project / "data/raw").exists()


@pytest.mark.reliability(
    "a CIFAR batch pickle asks for builtins (eval, getattr) or a class outside numpy",
    "refused: only numpy's array reconstruction and dtype are looked up",
)
@pytest.mark.parametrize(
    ("module", "name"), [("builtins", "eval"), ("builtins", "getattr"), ("collections", "OrderedDict")]
)
def test_unpickler_allows_only_array_globals(module: str, name: str) -> None:
    # GLOBAL 'module name', EMPTY_TUPLE, REDUCE, STOP: the smallest pickle that calls a global.
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."
    with pytest.raises(Exception, match=rf"refusing {module}\.{name}"):
        load_cifar_batch(io.BytesIO(payload), "batch")


def _py2_batch(images: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled as Python 2 and numpy 1 wrote CIFAR-10 (protocol 2, str as BINSTRING, the array
    through numpy.core.multiarray._reconstruct): what the real archive holds, built opcode by opcode."""

    def string(value: bytes) -> bytes:  # SHORT_BINSTRING / BINSTRING: a Python 2 str
        return (
            b"U" + bytes([len(value)]) + value
            if len(value) < 256
            else b"T" + struct.pack("<I", len(value)) + value
        )

    def integer(value: int) -> bytes:
        return b"J" + struct.pack("<i", value)

    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    dtype = b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"  # dtype('u1', 0, 1)
    dtype += b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b")
    array += b"\x87R(" + integer(1) + integer(data.shape[0]) + integer(data.shape[1]) + b"\x86" + dtype
    array += b"\x89" + string(data.tobytes()) + b"tb"
    items = string(b"batch_label") + string(b"training batch 1 of 5") + string(b"data") + array
    items += string(b"labels") + b"](" + b"".join(integer(x) for x in labels) + b"e"
    return b"\x80\x02}(" + items + b"u."


def test_python2_numpy1_batches_load() -> None:
    """The globals the real archive's batches use (numpy 1 module names) are the ones allowed."""
    images, labels = synthetic_images(10, seed=3)
    loaded_images, loaded_labels = load_cifar_batch(io.BytesIO(_py2_batch(images, labels.tolist())), "b")
    np.testing.assert_array_equal(loaded_images, images)
    np.testing.assert_array_equal(loaded_labels, labels)
    assert loaded_labels.dtype == np.int64


@pytest.mark.reliability(
    "a CIFAR batch pickle holds the wrong shapes or types (data not uint8 (N, 3072), labels not ints)",
    "refused with the batch named",
)
@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, r"b'data' is not a uint8 array"),
        ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, r"b'data' is not a uint8 array"),
        ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, r"b'labels' is not a list of 2 ints"),
        ({b"data": np.zeros((1, 3072), np.uint8), b"labels": ["0"]}, r"b'labels' is not a list of 1 ints"),
        ([1, 2, 3], r"b'data' is not a uint8 array"),
    ],
    ids=["float-data", "short-rows", "label-count", "label-type", "not-a-dict"],
)
def test_batch_contents_are_checked(batch: object, message: str) -> None:
    with pytest.raises(Exception, match=message):
        load_cifar_batch(io.BytesIO(pickle.dumps(batch)), "batch")


# --- Hub listings with hostile paths ----------------------------------------------------------------------


@pytest.mark.reliability(
    "the Hub lists a shard with an absolute path or a '..' path",
    "the hub source refuses it before downloading anything and hands over",
)
@pytest.mark.parametrize("remote", ["../train-00000-of-00001.parquet", "/train-00000-of-00001.parquet"])
def test_hub_shard_paths_must_stay_inside(
    project: Path, synthetic_mirror: Path, remote: str, tmp_path: Path
) -> None:
    import importlib

    import huggingface_hub.constants

    files = {f"plain_text/{p.name}": p.read_bytes() for p in synthetic_mirror.glob("*.parquet")}
    files[remote] = files.pop("plain_text/train-00000-of-00002.parquet")
    repo = HubRepo("uoft-cs/cifar10", files)
    with serve_hub(repo) as endpoint, pytest.MonkeyPatch.context() as environment:
        environment.setenv("HF_ENDPOINT", endpoint)
        environment.setenv("HF_HOME", str(tmp_path / "hf-home"))
        importlib.reload(huggingface_hub.constants)
        try:
            with pytest.raises(DataError, match=rf"hub: .*refusing the shard path '{remote}'"):
                download(_params(project, sources=["hub"], hub_repo="uoft-cs/cifar10", hub_revision="main"))
        finally:
            environment.undo()
            importlib.reload(huggingface_hub.constants)
    assert not any("/resolve/" in path for _, path in repo.requests)


# --- no network, no mirror: the stage as a user runs it ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.reliability(
    "no network (every remote source on a closed loopback port) and no mirror at the configured path",
    "each source is tried in turn; the stage exits 1 with 'error: no CIFAR-10 source worked', one line per "
    "source and why, and a hint, without a traceback (--debug shows it)",
)
def test_offline_stage_lists_every_source_and_exits_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    closed = f"http://127.0.0.1:{free_port()}"
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["download"].update(
        sources=["mirror", "hub", "url"], mirror_dir=str(tmp_path / "no-mirror"), url=f"{closed}/c.tar.gz"
    )
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {
        **os.environ,
        "HF_ENDPOINT": closed,  # the Hub client's own setting, for this child process only
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "DVC_EXP_NAME"):
        env.pop(name, None)
    command = [sys.executable, "-m", "cifar10_pipeline.stages.download"]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    stderr = result.stderr.strip().splitlines()
    lines = stderr[next(n for n, line in enumerate(stderr) if line.startswith("error: ")) :]  # after MLflow's
    assert lines[0] == "error: no CIFAR-10 source worked (download.sources: ['mirror', 'hub', 'url']):"
    assert lines[1].startswith("  mirror: mirror folder ") and "no-mirror does not exist" in lines[1]
    assert lines[2].startswith(
        "  hub: Hugging Face Hub dataset uoft-cs/cifar10@main: listing its files failed: "
    )
    assert "Connection refused" in lines[2]
    assert lines[3].startswith(f"  url: could not download {closed}/c.tar.gz: ConnectionError: ")
    assert lines[4].startswith("hint: point download.mirror_dir at a local mirror")
    assert lines[5:] == ["(for the full traceback, run: python -m cifar10_pipeline.stages.download --debug)"]
    assert not (root / "data" / "raw").exists()

    debug = subprocess.run(
        [*command, "--debug"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert "DataError: no CIFAR-10 source worked" in debug.stderr
