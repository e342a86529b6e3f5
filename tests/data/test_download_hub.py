"""The Hub source (``download.sources: [hub]``, what the GitHub workflow uses) against a loopback Hub.

The real huggingface_hub client talks to tests/support/hubserver.py through its own setting, HF_ENDPOINT (with
HF_HOME in the test's folder, so its cache and token file are the test's). The client reads its settings
when ``huggingface_hub.constants`` is imported; the fixture sets them and re-reads that module, and puts
it back afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cifar10_pipeline.core.data import DataError, read_checksums, verify_checksums
from cifar10_pipeline.core.params import load_params
from cifar10_pipeline.stages.download import download

from ..support.hubserver import HubRepo, serve_hub
from ..support.localserver import free_port

REPO = "uoft-cs/cifar10"


def _params(project: Path, **changes):
    params = load_params(project / "params.yaml").download
    return params.model_copy(update={"hub_repo": REPO, "hub_revision": "main", **changes})


@pytest.fixture
def hub_files(synthetic_mirror: Path) -> dict[str, bytes]:
    """The mirror's shards laid out as on the Hub (plain_text/...), with a README (a plain git file)."""
    files = {f"plain_text/{p.name}": p.read_bytes() for p in sorted(synthetic_mirror.glob("*.parquet"))}
    files["README.md"] = b"# CIFAR-10 (loopback copy)\n"
    return files


@pytest.fixture
def hub_client(tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """The client's environment for this test (its home in the test's folder: ``hub_home``); call
    ``point_at(hub_client, url)`` before downloading."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("HF_HOME", str(tmp_path / "hf-home"))
        environment.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT"):
            environment.delenv(name, raising=False)
        yield environment
    importlib.reload(huggingface_hub.constants)  # the settings of the session again


@pytest.fixture
def hub_home(tmp_path: Path) -> Path:
    return tmp_path / "hf-home"


def point_at(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    importlib.reload(huggingface_hub.constants)


@pytest.mark.reliability(
    "Hub source served with its LFS metadata (loopback Hub, real huggingface_hub client)",
    "every shard's sha256 matches the Hub's LFS metadata; data/raw holds exactly those files",
)
def test_hub_download_is_verified_against_lfs_metadata(
    project: Path, hub_files: dict[str, bytes], hub_client: pytest.MonkeyPatch
) -> None:
    repo = HubRepo(REPO, hub_files)
    with serve_hub(repo) as endpoint:
        point_at(hub_client, endpoint)
        info = download(_params(project, sources=["hub"]))
    assert info["source"] == "hub"
    assert info["location"] == f"{REPO}@{repo.commit}"  # pinned to the commit the listing named
    raw = project / "data/raw"
    sums = verify_checksums(raw)
    expected = {
        path.split("/")[-1]: hashlib.sha256(content).hexdigest()
        for path, content in hub_files.items()
        if path.endswith(".parquet")
    }
    assert sums == expected == read_checksums(raw / "SHA256SUMS")
    assert sorted(p.name for p in raw.iterdir()) == sorted([*expected, "SHA256SUMS"])
    assert json.loads((project / "metrics/data_source.json").read_text())["sha256"] == expected
    # The client asked for the listing with blobs (LFS metadata), then each shard at the listed commit.
    assert ("GET", f"/api/datasets/{REPO}/revision/main") in repo.requests
    downloads = {path for method, path in repo.requests if method == "GET" and "/resolve/" in path}
    assert downloads == {
        f"/datasets/{REPO}/resolve/{repo.commit}/{p}" for p in hub_files if p.endswith("parquet")
    }


@pytest.mark.reliability(
    "Hub lists a Parquet shard without a sha256 (no LFS metadata)",
    "the shard is refused as unverifiable, nothing is written, and the summary says why",
)
def test_hub_file_without_checksum_is_an_error(
    project: Path, hub_files: dict[str, bytes], hub_client: pytest.MonkeyPatch
) -> None:
    repo = HubRepo(REPO, hub_files, no_lfs={"plain_text/test-00000-of-00001.parquet"})
    with serve_hub(repo) as endpoint:
        point_at(hub_client, endpoint)
        with pytest.raises(DataError, match=r"(?s)hub: .*test-00000-of-00001\.parquet has no sha256"):
            download(_params(project, sources=["hub"]))
    assert not (project / "data/raw").exists()
    assert not (project / "metrics/data_source.json").exists()
    assert not any(method == "GET" and "/resolve/" in path for method, path in repo.requests)


@pytest.mark.reliability(
    "Hub serves a shard whose bytes do not match its LFS sha256",
    "the hub source fails with 'checksum mismatch', the next source (a mirror) is used, the bad cached copy "
    "is deleted",
)
def test_hub_checksum_mismatch_hands_over_to_the_next_source(
    project: Path,
    hub_files: dict[str, bytes],
    synthetic_mirror: Path,
    hub_client: pytest.MonkeyPatch,
    hub_home: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shard = "plain_text/train-00001-of-00002.parquet"
    repo = HubRepo(REPO, hub_files, advertised_sha256={shard: "ab" * 32})
    with serve_hub(repo) as endpoint:
        point_at(hub_client, endpoint)
        info = download(_params(project, sources=["hub", "mirror"], mirror_dir=str(synthetic_mirror)))
    assert info["source"] == "mirror"
    out = capsys.readouterr().out
    assert f"hub failed: Hugging Face Hub dataset {REPO}@main: checksum mismatch for {shard}" in out
    # The client caches a blob under the sha256 it was told; the bad one is deleted (with its snapshot
    # link), so a retry downloads it again instead of reusing it. The shards verified before it stay.
    blobs = {p.name for p in hub_home.rglob("blobs/*")}
    good = {hashlib.sha256(hub_files[p]).hexdigest() for p in sorted(hub_files)[1:3]}  # test, train-0
    assert blobs == good
    assert not [p for p in hub_home.rglob(Path(shard).name)]


@pytest.mark.reliability(
    "Hub answers HTTP 500 (to the listing, to a file's metadata, or to its download)",
    "the hub source fails with the status in its message and the next source (a mirror) is used",
)
@pytest.mark.parametrize(
    "fault",
    [
        ("GET", "/api/"),
        # The client retries a failing metadata request 5 times with backoff (about 23 s of sleep, skipped
        # here: the test counts the waits instead) before giving up.
        ("HEAD", "/datasets/"),
        ("GET", "/datasets/"),
    ],
    ids=["listing", "file-metadata", "file-download"],
)
def test_hub_server_error_hands_over(
    project: Path,
    hub_files: dict[str, bytes],
    synthetic_mirror: Path,
    hub_client: pytest.MonkeyPatch,
    fault: tuple[str, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub.utils._http as hub_http

    waits: list[float] = []
    monkeypatch.setattr(hub_http, "time", NoSleep(waits))
    repo = HubRepo(REPO, hub_files, fail={fault: 500})
    with serve_hub(repo) as endpoint:
        point_at(hub_client, endpoint)
        info = download(_params(project, sources=["hub", "mirror"], mirror_dir=str(synthetic_mirror)))
    assert info["source"] == "mirror"
    (failure,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("download: hub")]
    assert re.search(
        r"^download: hub failed: Hugging Face Hub dataset uoft-cs/cifar10@main.*\b500\b", failure
    )
    assert any(method == fault[0] and path.startswith(fault[1]) for method, path in repo.requests)
    if fault[0] == "HEAD":  # the client's own backoff ran (its waits recorded, not slept)
        assert len(waits) == 5 and waits == sorted(waits), waits


class NoSleep:
    """The time module as the Hub client sees it, with ``sleep`` recorded instead of slept."""

    def __init__(self, waits: list[float]) -> None:
        self.waits = waits

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


@pytest.mark.reliability(
    "Hub endpoint down (nothing listening on its loopback port)",
    "the hub source fails with the connection error in the summary and the next source is tried",
)
def test_hub_down_hands_over(project: Path, synthetic_mirror: Path, hub_client: pytest.MonkeyPatch) -> None:
    point_at(hub_client, f"http://127.0.0.1:{free_port()}")
    info = download(_params(project, sources=["hub", "mirror"], mirror_dir=str(synthetic_mirror)))
    assert info["source"] == "mirror"
    with pytest.raises(
        DataError, match=r"(?s)hub: Hugging Face Hub dataset .*: listing its files failed: ConnectError"
    ):
        download(_params(project, sources=["hub"]))
