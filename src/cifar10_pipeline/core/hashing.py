"""File hashes: the one file hasher of the package (data checksums, the trainer's resume fingerprint, the
web service's weights digest) and the fingerprint that names the exact raw data. Standard library only."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHECKSUM_FILE = "SHA256SUMS"  # sha256sum's format: "<hex digest>  <file name>" per line


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of a file's bytes, read in chunks (a Parquet shard need not fit in memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def raw_data_fingerprint(raw_dir: Path) -> str:
    """One hash that names the exact raw data: of its SHA256SUMS, which lists every file's sha256."""
    return file_digest(Path(raw_dir) / CHECKSUM_FILE)[:16]
