"""Every commit a record names is in the history (issue 27, item 5): records/ and metrics/ name the commit
read from the tree they ran in (core/provenance.py), or say why there is none (commit_unknown_reason); the
docs and reports quote commits only that exist. A hand-typed hash that is not in the history fails here."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cifar10_pipeline.core.provenance import DEVICE_COMMIT, tree_provenance
from cifar10_pipeline.reporting import docs

from ..conftest import PROJECT_ROOT

RECORDS = PROJECT_ROOT / "records"
FULL_SHA = re.compile(r"[0-9a-f]{40}")
# "commit 06d24a3b", "commits d186cea4", "commit `84a1fcb`" in prose and rendered blocks
QUOTED_COMMIT = re.compile(r"\bcommits? `?([0-9a-f]{7,40})\b")


def in_history(sha: str) -> bool:
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=PROJECT_ROOT, capture_output=True, timeout=30
    )
    return found.returncode == 0


def provenance_blocks(value: object, path: str) -> Iterator[tuple[str, dict]]:
    """Every dict in a record that carries provenance (a git_commit or a commit_unknown_reason)."""
    if isinstance(value, dict):
        if "git_commit" in value or "commit_unknown_reason" in value:
            yield path, value
        for key, item in value.items():
            yield from provenance_blocks(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from provenance_blocks(item, f"{path}[{index}]")


def record_units(relative: str, payload: dict) -> Iterator[tuple[str, object]]:
    """What must name a commit: each benchmark entry, or the record as a whole."""
    if relative == "records/benchmark.json":
        yield from ((f"{relative}:{key}", entry) for key, entry in payload.items())
    else:
        yield relative, payload


def commit_problems(relative: str, payload: dict) -> list[str]:
    problems = []
    for unit, value in record_units(relative, payload):
        blocks = list(provenance_blocks(value, unit))
        if not blocks:
            problems.append(f"{unit}: names no commit and gives no commit_unknown_reason")
        for where, block in blocks:
            commit = block.get("git_commit")
            if commit is None:
                if not block.get("commit_unknown_reason"):
                    problems.append(f"{where}: no git_commit and no commit_unknown_reason")
            elif not (isinstance(commit, str) and FULL_SHA.fullmatch(commit) and in_history(commit)):
                problems.append(f"{where}: git_commit {commit!r} is not a commit in the history")
            elif "git_dirty" not in block and "uncommitted_code_changes" not in block:
                problems.append(f"{where}: commit {commit[:8]} without a dirty marker (git_dirty)")
    return problems


def record_files() -> list[str]:
    files = [*RECORDS.rglob("*.json"), *(PROJECT_ROOT / "metrics").rglob("*.json")]
    return sorted(str(p.relative_to(PROJECT_ROOT)) for p in files)


def names_commit(relative: str) -> bool:
    return relative.startswith("records/") or "git_commit" in (PROJECT_ROOT / relative).read_text()


@pytest.mark.parametrize("relative", [f for f in record_files() if names_commit(f)])
def test_every_record_names_a_commit_in_the_history(relative: str) -> None:
    payload = json.loads((PROJECT_ROOT / relative).read_text())
    problems = commit_problems(relative, payload)
    assert not problems, "\n".join(problems)


def quoted_commits(text: str) -> set[str]:
    return set(QUOTED_COMMIT.findall(text))


def documents() -> list[Path]:
    reports = [docs.BENCHMARK_REPORT, Path("reports/reliability.md"), Path("reports/serving_benchmark.md")]
    pages = sorted(p.relative_to(PROJECT_ROOT) for p in (PROJECT_ROOT / "docs").glob("*.md"))
    return [*docs.DOCUMENTS, *pages, *reports, Path("records/README.md")]


@pytest.mark.parametrize("relative", sorted({str(p) for p in documents()}))
def test_docs_quote_only_commits_in_the_history(relative: str) -> None:
    path = PROJECT_ROOT / relative
    if not path.is_file():
        pytest.skip(f"{relative} absent")
    missing = sorted(sha for sha in quoted_commits(path.read_text()) if not in_history(sha))
    assert not missing, f"{relative} quotes commits that are not in the history: {missing}"


def test_a_hand_typed_commit_is_caught() -> None:
    head = tree_provenance(PROJECT_ROOT)
    assert head.commit is not None and in_history(head.commit)
    good = {"git_commit": head.commit, "git_dirty": False}
    assert commit_problems("records/x.json", good) == []
    typo = head.commit[:7] + ("0" if head.commit[7] != "0" else "1")  # one character off, as 06d24a3a was
    assert commit_problems("records/x.json", {"git_commit": typo, "git_dirty": None}) == [
        f"records/x.json: git_commit {typo!r} is not a commit in the history"
    ]
    assert commit_problems("records/x.json", {"torch": "2.13.0"}) == [
        "records/x.json: names no commit and gives no commit_unknown_reason"
    ]
    assert commit_problems("records/x.json", {"git_commit": None, "commit_unknown_reason": "no .git"}) == []
    assert quoted_commits(f"measured at commit {typo} on") == {typo} and not in_history(typo)


def test_a_copy_without_git_reads_the_commit_its_maker_wrote(tmp_path: Path) -> None:
    head = tree_provenance(PROJECT_ROOT)
    (tmp_path / "sub").mkdir()
    assert tree_provenance(tmp_path / "sub").commit is None  # tmp_path is outside any checkout
    (tmp_path / DEVICE_COMMIT).write_text(f"{head.commit}\ndirty\n")
    copy = tree_provenance(tmp_path / "sub")
    assert (copy.commit, copy.dirty) == (head.commit, True) and DEVICE_COMMIT in copy.source
    # DEVICE_COMMIT wins over the copy's own snapshot repository (device_job.sh makes one for dvc)
    (tmp_path / ".git").mkdir()
    assert tree_provenance(tmp_path).commit == head.commit


def test_the_cold_start_benchmark_writes_a_record_that_passes_these_checks() -> None:
    """benchmarks/cold_start.py runs on the GPU machine only: its record, from made-up runs, names the tree's
    commit and holds only keys it can write."""
    from benchmarks import cold_start

    from .test_metrics_written_by_code import COMMAND_WRITERS, unwritten_keys

    run = {"exit_code": 0, "process_start_to_exit_seconds": 28.4}
    run |= {"process_start_to_model_saved_seconds": 24.9, "training_seconds": 1.36, "device": "NVIDIA H200"}
    importtime = (
        "import time: 12 | 12450000 | cifar10_pipeline.stages.train\nimport time: 5 | 3500000 |   torch"
    )
    found = {"gpu": "NVIDIA H200", "cpu": "Intel(R) Xeon(R) Processor", "torch": "2.11.0+cu130"}
    payload = cold_start.record(
        {"cold": run, "warm": run}, importtime, "python benchmarks/cold_start.py", False, found
    )
    assert payload["import_stage_module_seconds"] == 12.45 and payload["largest_imports"][1]["depth"] == 1
    assert commit_problems("records/cold_start.json", payload) == []
    assert unwritten_keys(payload, COMMAND_WRITERS["records/cold_start.json"]) == []
