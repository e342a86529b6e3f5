"""Stage 1, download: bring CIFAR-10 into ``data/raw/`` as Parquet shards with verified checksums.

Sources, tried in the order of ``download.sources`` (a param like any other: ``-S 'download.sources=[hub]'``):
  mirror  a local folder in the Hub's uoft-cs/cifar10 Parquet schema with a SHA256SUMS file
          (``download.mirror_dir``)
  hub     the Hugging Face Hub dataset ``download.hub_repo`` (sha256 checked against the Hub's LFS metadata)
  url     the original cifar-10-python.tar.gz (md5 checked), converted to the same Parquet schema

A source that is absent or unreachable hands over to the next; a checksum mismatch stops the stage (corrupt
data must be noticed, not routed around). Output appears all at once or not at all.
"""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import requests
from tqdm.auto import tqdm

from cifar10_pipeline.core.data import (
    CHECKSUM_FILE,
    SPLITS,
    DataError,
    atomic_output,
    file_digest,
    read_checksums,
    verify_checksums,
    write_checksums,
    write_json_atomic,
    write_parquet_split,
)
from cifar10_pipeline.core.params import DownloadParams, load_params
from cifar10_pipeline.core.paths import DATA_SOURCE, RAW_DIR
from cifar10_pipeline.tracking.runs import stage_run


class SourceUnavailable(RuntimeError):
    """This source cannot be used here (absent, offline); the next source may be tried."""


def _mirror_dir(params: DownloadParams) -> Path | None:
    return Path(params.mirror_dir) if params.mirror_dir else None


def fetch_mirror(params: DownloadParams, staging: Path) -> dict:
    mirror = _mirror_dir(params)
    if mirror is None or not mirror.is_dir():
        raise SourceUnavailable(
            f"mirror folder {mirror} does not exist (set download.mirror_dir, e.g. dvc exp run -S "
            "download.mirror_dir=/path/to/cifar10)"
        )
    if not (mirror / CHECKSUM_FILE).is_file():
        raise DataError(f"mirror {mirror} has no {CHECKSUM_FILE}; refusing to use unverifiable data")
    expected = read_checksums(mirror / CHECKSUM_FILE)
    shards = sorted(name for name in expected if name.endswith(".parquet"))
    for split in SPLITS:
        if not any(name.startswith(f"{split}-") for name in shards):
            raise DataError(f"mirror {mirror}: {CHECKSUM_FILE} lists no {split}-*.parquet shard")
    for name in tqdm(shards, desc="copy mirror", unit="file"):
        source = mirror / name
        if not source.is_file():
            raise DataError(f"mirror {mirror}: {name} is listed in {CHECKSUM_FILE} but missing")
        shutil.copyfile(source, staging / name)
        actual = file_digest(staging / name)
        if actual != expected[name]:
            raise DataError(
                f"checksum mismatch for {source}: expected sha256 {expected[name]}, got {actual}. "
                "The mirror is corrupt; restore it from its origin."
            )
    return {"source": "mirror", "location": str(mirror), "files": shards}


def fetch_hub(params: DownloadParams, staging: Path) -> dict:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        info = HfApi().dataset_info(params.hub_repo, revision=params.hub_revision, files_metadata=True)
    except (OfflineModeIsEnabled, HfHubHTTPError, requests.RequestException, OSError) as exc:
        raise SourceUnavailable(f"Hugging Face Hub unreachable for {params.hub_repo}: {exc}") from None
    shards = {
        sibling.rfilename: sibling.lfs.sha256 if sibling.lfs else None
        for sibling in info.siblings or []
        if sibling.rfilename.endswith(".parquet") and Path(sibling.rfilename).name.split("-")[0] in SPLITS
    }
    if not shards:
        raise DataError(f"{params.hub_repo}@{params.hub_revision} holds no train/test Parquet shards")
    names = []
    for remote_name, sha256 in tqdm(sorted(shards.items()), desc="download hub", unit="file"):
        local = Path(hf_hub_download(params.hub_repo, remote_name, repo_type="dataset", revision=info.sha))
        name = Path(remote_name).name
        shutil.copyfile(local, staging / name)
        actual = file_digest(staging / name)
        if sha256 is not None and actual != sha256:
            raise DataError(f"checksum mismatch for {remote_name}: the Hub says {sha256}, got {actual}")
        names.append(name)
    return {"source": "hub", "location": f"{params.hub_repo}@{info.sha}", "files": names}


def _download_url(url: str, target: Path) -> None:
    try:
        with requests.get(url, stream=True, timeout=30) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with (
                open(target, "wb") as handle,
                tqdm(total=total, unit="B", unit_scale=True, desc="download") as bar,
            ):
                for chunk in response.iter_content(chunk_size=1 << 20):
                    handle.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as exc:
        raise SourceUnavailable(f"could not download {url}: {exc}") from None


def fetch_url(params: DownloadParams, staging: Path) -> dict:
    archive = staging / "cifar-10-python.tar.gz"
    _download_url(params.url, archive)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    if md5 != params.url_md5:
        raise DataError(f"checksum mismatch for {params.url}: expected md5 {params.url_md5}, got {md5}")
    batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            arrays = {}
            for split, names in batches.items():
                images, labels = [], []
                for name in names:
                    if name not in members:
                        raise DataError(f"{params.url}: archive lacks {name}")
                    batch = pickle.load(tar.extractfile(members[name]), encoding="bytes")
                    images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
                arrays[split] = (np.concatenate(images).transpose(0, 2, 3, 1), np.concatenate(labels))
    except (tarfile.TarError, EOFError, pickle.UnpicklingError, KeyError) as exc:
        raise DataError(f"{params.url}: archive is not the CIFAR-10 python version ({exc})") from None
    archive.unlink()
    names = []
    for split, (images, labels) in arrays.items():
        name = f"{split}-00000-of-00001.parquet"
        write_parquet_split(staging / name, images, labels)
        names.append(name)
    return {"source": "url", "location": params.url, "md5": md5, "files": names}


FETCHERS: dict[str, Callable[[DownloadParams, Path], dict]] = {
    "mirror": fetch_mirror,
    "hub": fetch_hub,
    "url": fetch_url,
}


def download(params: DownloadParams, out_dir: Path = RAW_DIR, source_file: Path = DATA_SOURCE) -> dict:
    """Fetch CIFAR-10 from the first source that works into ``out_dir``; return what was fetched.

    ``source_file`` (a small JSON, kept in git) records which source and files the data came from; it
    lives outside ``out_dir`` so the data's own hash does not depend on where it was fetched from.
    """
    failures = []
    for source in params.sources:
        try:
            with atomic_output(Path(out_dir)) as staging:
                staging.mkdir()
                info = FETCHERS[source](params, staging)
                write_checksums(staging, info["files"])
                verify_checksums(staging)
                info["sha256"] = read_checksums(staging / CHECKSUM_FILE)
            write_json_atomic(source_file, info)
            print(f"download: CIFAR-10 from {source} ({info['location']}) -> {out_dir}")
            return info
        except SourceUnavailable as exc:
            print(f"download: {source} unavailable: {exc}")
            failures.append(f"  {source}: {exc}")
    raise DataError(
        "no CIFAR-10 source worked:\n" + "\n".join(failures) + "\n"
        "Point download.mirror_dir at a local mirror (-S download.mirror_dir=PATH), or run where the Hub or "
        "the original URL is reachable."
    )


def data_fingerprint(raw_dir: Path = RAW_DIR) -> str:
    """One hash that names the exact raw data (hash of its SHA256SUMS)."""
    return hashlib.sha256((Path(raw_dir) / CHECKSUM_FILE).read_bytes()).hexdigest()[:16]


def main() -> None:
    params = load_params()
    with stage_run("download", params, outputs=(RAW_DIR, DATA_SOURCE)) as run:
        info = download(params.download)
        run.log_params({"data.source": info["source"], "data.location": info["location"]})
        run.set_tags({"data.sha256sums": data_fingerprint()})


if __name__ == "__main__":
    main()
