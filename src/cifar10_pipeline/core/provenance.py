"""The commit a process runs from, read from its tree, never typed by hand.

In a git checkout: ``git rev-parse HEAD`` and whether ``git status --porcelain`` lists anything (dirty).
In a copy of the tree made for another machine (``scripts/device_job.sh start``), the copy's root holds
``DEVICE_COMMIT``, written by the command that made the copy from this module's output on the source side:
the commit on its first line, ``dirty`` or ``clean`` on its second. That file wins over the copy's own
``.git`` (the device job makes one snapshot commit there for dvc; it is not in the project's history).

    python -m cifar10_pipeline.core.provenance > .devrun/COMMIT   # what device_job.sh copies to DEVICE_COMMIT

Every record writer puts ``fields()`` into its record; tests/unit/test_records_commits.py checks that each
named commit is in the history. ``pinned_requirement`` gives the versions pyproject.toml pins (for the
registered model's requirements and the docs' torch labels), so no module types a version by hand.
"""

from __future__ import annotations

import functools
import re
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

DEVICE_COMMIT = "DEVICE_COMMIT"
DISTRIBUTION = "cifar10-pipeline"  # this project's name in pyproject.toml


@functools.cache
def pinned_requirement(package: str) -> str:
    """The requirement pyproject.toml's ``[project] dependencies`` pin for ``package`` (``torch==2.13.0``),
    read from this project's installed metadata. pyproject.toml is where a version is pinned; the Makefile
    and CI only repeat torch's pin to install it first from a CPU wheel index."""
    for requirement in metadata.requires(DISTRIBUTION) or []:
        name, _, marker = requirement.partition(";")
        if re.split(r"[\s=<>!~\[]", name, maxsplit=1)[0].lower() == package.lower() and "extra" not in marker:
            return name.strip()
    raise LookupError(f"{DISTRIBUTION}'s metadata pins no {package!r} (is the project installed? make setup)")


@dataclass(frozen=True)
class TreeProvenance:
    commit: str | None  # full sha; None when it cannot be read (then ``unknown_reason`` says why)
    dirty: bool | None  # uncommitted changes in the tree it ran from; None when not known
    source: str  # how the commit was read
    unknown_reason: str | None = None

    def fields(self) -> dict[str, object]:
        """The keys a record carries: git_commit, git_dirty, commit_source (and commit_unknown_reason)."""
        out: dict[str, object] = {
            "git_commit": self.commit,
            "git_dirty": self.dirty,
            "commit_source": self.source,
        }
        if self.commit is None:
            out["commit_unknown_reason"] = self.unknown_reason
        return out


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
    ).stdout


def read_device_commit(path: Path) -> TreeProvenance:
    lines = path.read_text().split()
    if not lines:
        return TreeProvenance(None, None, f"{DEVICE_COMMIT} file", f"{path} is empty")
    dirty = {"dirty": True, "clean": False}.get(lines[1]) if len(lines) > 1 else None
    return TreeProvenance(
        lines[0], dirty, f"{DEVICE_COMMIT} file (written by the command that copied the tree)"
    )


def tree_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the working directory) holding .git or
    DEVICE_COMMIT."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / DEVICE_COMMIT).is_file() or (folder / ".git").exists():
            return folder
    return None


def tree_provenance(start: Path | None = None) -> TreeProvenance:
    """The commit and dirty flag of the tree at or above ``start`` (default: the working directory)."""
    root = tree_root(start)
    if root is None:
        return TreeProvenance(
            None, None, "none", f"no .git and no {DEVICE_COMMIT} at or above {start or '.'}"
        )
    if (root / DEVICE_COMMIT).is_file():
        return read_device_commit(root / DEVICE_COMMIT)
    try:
        commit = _git(root, "rev-parse", "HEAD").strip()
        dirty = bool(_git(root, "status", "--porcelain").strip())
    except (OSError, subprocess.SubprocessError) as error:
        return TreeProvenance(None, None, "git", f"git failed in {root}: {error}")
    return TreeProvenance(commit, dirty, "git (rev-parse HEAD, status --porcelain)")


def head_commit(start: Path | None = None) -> str:
    """Just the commit, "unknown" where it cannot be read (a wheel in a container)."""
    return tree_provenance(start).commit or "unknown"


def main() -> None:
    """Print DEVICE_COMMIT's content for this tree: the commit, then dirty or clean."""
    found = tree_provenance()
    if found.commit is None:
        raise SystemExit(f"error: {found.unknown_reason}")
    print(found.commit)
    print("dirty" if found.dirty else "clean")


if __name__ == "__main__":
    main()
