"""The download stage: mirror, original-URL fallback (served from loopback), checksums, no partial output."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cifar10_pipeline.core.data import DataError, decode_split, read_raw_split, verify_checksums
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.stages.download import download

from ..conftest import synthetic_images


def _params(project: Path, **changes):
    params = load_params(project / "params.yaml").download
    return params.model_copy(update=changes)


def test_mirror_copy_is_verified(project: Path, synthetic_mirror: Path) -> None:
    info = download(_params(project, sources=["mirror"], mirror_dir=str(synthetic_mirror)))
    assert info["source"] == "mirror"
    assert verify_checksums(project / "data/raw")
    assert json.loads((project / "metrics/data_source.json").read_text())["source"] == "mirror"


def test_checksum_mismatch_stops_and_leaves_nothing(project: Path, synthetic_mirror: Path) -> None:
    shard = synthetic_mirror / "train-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(DataError, match="checksum mismatch"):
        download(_params(project, sources=["mirror", "url"], mirror_dir=str(synthetic_mirror)))
    assert not (project / "data/raw").exists()
    assert not (project / "metrics/data_source.json").exists()
    assert not any((project / "data").iterdir())  # no staging folder left behind


def test_missing_mirror_is_a_clear_error(project: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"mirror folder .*does not exist"):
        download(_params(project, sources=["mirror"], mirror_dir=str(tmp_path / "nowhere")))
    assert not (project / "data/raw").exists()


def test_sources_are_tried_in_the_params_order(
    project: Path, synthetic_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The data source is a param, nothing else: the environment variables of older versions change nothing.
    monkeypatch.setenv("CIFAR10_MIRROR", "/nonexistent")
    monkeypatch.setenv("CIFAR10_SOURCES", "url")
    info = download(_params(project, sources=["mirror", "url"], mirror_dir=str(synthetic_mirror)))
    assert info["source"] == "mirror"
    with pytest.raises(DataError, match=r"(?s)mirror folder .*does not exist.*download.mirror_dir"):
        download(_params(project, sources=["mirror"], mirror_dir="/nonexistent"))


# --- the original archive, built in the real format and served over loopback HTTP ------------------------


def _cifar_archive(train_n: int = 50, test_n: int = 20) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        batches = {f"data_batch_{i}": synthetic_images(train_n // 5, seed=i) for i in range(1, 6)}
        batches["test_batch"] = synthetic_images(test_n, seed=9)
        for name, (images, labels) in batches.items():
            payload = pickle.dumps(
                {b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), b"labels": labels.tolist()}
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.fixture
def served_archive(tmp_path: Path) -> Iterator[tuple[str, str]]:
    folder = tmp_path / "www"
    folder.mkdir()
    archive = _cifar_archive()
    (folder / "cifar-10-python.tar.gz").write_bytes(archive)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
        yield url, hashlib.md5(archive).hexdigest()
    finally:
        server.shutdown()


def test_falls_back_to_the_original_archive(project: Path, tmp_path: Path, served_archive) -> None:
    url, md5 = served_archive
    info = download(
        _params(project, sources=["mirror", "url"], mirror_dir=str(tmp_path / "none"), url=url, url_md5=md5)
    )
    assert info["source"] == "url"
    images, labels = decode_split(read_raw_split(project / "data/raw", "train"), "train")
    expected_first, _ = synthetic_images(10, seed=1)
    assert images.shape == (50, 32, 32, 3)
    np.testing.assert_array_equal(images[:10], expected_first)  # batch order and pixel layout kept
    assert read_raw_split(project / "data/raw", "test").num_rows == 20
    assert labels.dtype == np.int64


def test_archive_md5_mismatch(project: Path, served_archive) -> None:
    url, _ = served_archive
    with pytest.raises(DataError, match="expected md5"):
        download(_params(project, sources=["url"], url=url, url_md5="0" * 32))
    assert not (project / "data/raw").exists()


def test_no_source_reachable(project: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no CIFAR-10 source worked"):
        download(_params(project, sources=["url"], url="http://127.0.0.1:9/none.tar.gz"))
    assert not (project / "data/raw").exists()
