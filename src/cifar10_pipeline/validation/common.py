"""What the raw-split suites (validation/raw.py) and the processed-array checks (validation/processed.py)
share: the error and the report they produce, the listing of offending items in a failure line, and the
pixel hash by which both recognise an image. Every failed check becomes one line,
``<stage>: <split>: <check>: observed <x>, expected <y>``, collected in a ``DataValidationError``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifar10_pipeline.core.data import DataError

MAX_LISTED = 5  # offending items named in one failure line; the rest are counted


class DataValidationError(DataError):
    """One or more expectations failed; ``failures`` holds one line per failed expectation."""

    def __init__(self, failures: Sequence[str], summary: dict[str, Any] | None = None):
        self.failures = list(failures)
        self.summary = summary
        super().__init__("\n".join(self.failures))


@dataclass
class CheckReport:
    failures: list[str] = field(default_factory=list)
    # split -> {"evaluated": n, "failed": n}
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        return not self.failures

    def summary(self) -> dict[str, Any]:
        """{"success", "evaluated", "failed"} overall, plus the same for each split."""
        out: dict[str, Any] = {
            "success": self.success,
            "evaluated": sum(c["evaluated"] for c in self.counts.values()),
            "failed": sum(c["failed"] for c in self.counts.values()),
        }
        for split, counts in self.counts.items():
            out[split] = {"success": counts["failed"] == 0, **counts}
        return out


def listed(items: list[str], total: int) -> str:
    """The first MAX_LISTED of ``items``, and how many of ``total`` are left out."""
    more = f", ... ({total - MAX_LISTED} more)" if total > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def content_hash(image: np.ndarray) -> str:
    """sha256 of the decoded pixels, dtype and shape included (equal bytes in another shape differ)."""
    digest = hashlib.sha256(f"{image.dtype.str}{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()
