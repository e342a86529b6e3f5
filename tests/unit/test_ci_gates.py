"""Every CI gate of scripts/ci_gates.py fails when what it guards breaks, and passes when it holds.

Synthetic stage outputs and metrics in tmp_path, plus one real (tiny) DVC project for the two `dvc status`
gates: edited after `dvc repro`, they must fail. No network, a few seconds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from cifar10_pipeline.core.params import compose

from ..conftest import PROJECT_ROOT


def _load_gates() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ci_gates", PROJECT_ROOT / "scripts" / "ci_gates.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ci_gates"] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gates = _load_gates()


# ---------------------------------------------------------------------------------------------------------
# Outputs read from dvc.yaml
# ---------------------------------------------------------------------------------------------------------


def test_outputs_come_from_dvc_yaml() -> None:
    outputs = {o.path: o for o in gates.declared_outputs(PROJECT_ROOT)}
    # outs, metrics and plots of every stage, with where they are kept
    assert outputs["data/raw"].cached and outputs["models/cifar10"].cached
    assert not outputs["metrics/eval.json"].cached and outputs["metrics/eval.json"].stage == "evaluate"
    assert "metrics/train_history.csv" in outputs and "reports/data_docs" in outputs
    assert "records/ci_quick_baseline.json" not in outputs  # committed input of the gates, not an output
    stages = gates.load_stages(PROJECT_ROOT)
    assert {o.stage for o in outputs.values()} == set(stages)
    # The quick profile overrides nothing download and validate read: their results stay as committed.
    committed = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    quick = compose(["profile=quick"], PROJECT_ROOT / "conf")
    assert set(stages) - gates.stages_changed_by(stages, committed, quick) == {"download", "validate"}
    assert gates.stages_changed_by(stages, committed, committed) == set()


# ---------------------------------------------------------------------------------------------------------
# fingerprint / check-fresh
# ---------------------------------------------------------------------------------------------------------

MINI_PARAMS = {
    "profile": "default",
    "fetch": {"url": "mirror"},
    "fit": {"epochs": 13},
}
MINI_DVC_YAML = {
    "stages": {
        "fetch": {
            "cmd": "true",
            "params": ["fetch"],
            "outs": ["data/raw", {"metrics/source.json": {"cache": False}}],
        },
        "fit": {
            "cmd": "true",
            "deps": ["data/raw"],
            "params": ["fit"],
            "outs": ["models/m"],
            "metrics": [{"metrics/fit.json": {"cache": False}}],
            "plots": [{"metrics/history.csv": {"cache": False, "x": "epoch"}}],
        },
        "card": {"cmd": "true", "deps": ["metrics/fit.json"], "outs": [{"card.md": {"cache": False}}]},
    }
}
MINI_OUTPUTS = [
    "data/raw",
    "metrics/source.json",
    "models/m",
    "metrics/fit.json",
    "metrics/history.csv",
    "card.md",
]


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _committed(root: Path) -> None:
    """A project whose outputs are all present (committed), written an hour ago."""
    _write(root / "dvc.yaml", yaml.safe_dump(MINI_DVC_YAML, sort_keys=False))
    _write(root / "params.yaml", yaml.safe_dump(MINI_PARAMS, sort_keys=False))
    for relative in MINI_OUTPUTS:
        target = root / relative
        if relative in ("data/raw", "models/m"):
            target = target / "part-0"
        _write(target, f"committed {relative}\n")
        hour_ago = time.time() - 3600
        os.utime(target, (hour_ago, hour_ago))


def _run(root: Path, skip: tuple[str, ...] = (), same: tuple[str, ...] = ()) -> None:
    """What a quick run does: switch the profile, write every output but ``skip``; ``same`` ones unchanged."""
    quick = MINI_PARAMS | {"profile": "quick", "fit": {"epochs": 4}}
    _write(root / "params.yaml", yaml.safe_dump(quick, sort_keys=False))
    for relative in MINI_OUTPUTS:
        if relative in skip:
            continue
        target = root / relative / "part-0" if relative in ("data/raw", "models/m") else root / relative
        _write(target, f"committed {relative}\n" if relative in same else f"new {relative}\n")


def _check(root: Path, before: dict[str, Any]) -> list[str]:
    may_match = gates.outputs_that_may_match(root, before)
    problems, _ = gates.check_fresh(root, before, MINI_OUTPUTS, may_match)
    return problems


def test_mini_project_stages(tmp_path: Path) -> None:
    _committed(tmp_path)
    assert [o.path for o in gates.declared_outputs(tmp_path)] == MINI_OUTPUTS
    stages = gates.load_stages(tmp_path)
    quick = MINI_PARAMS | {"profile": "quick", "fit": {"epochs": 4}}
    # fit's epochs change; card reads no param but fit's result; fetch's section is the same in both
    assert gates.stages_changed_by(stages, MINI_PARAMS, quick) == {"fit", "card"}
    # the profile's name alone is read by no stage here: it changes nothing
    assert gates.stages_changed_by(stages, MINI_PARAMS, MINI_PARAMS | {"profile": "quick"}) == set()
    # a profile that sets what fetch reads changes fetch, and so everything downstream
    both = quick | {"fetch": {"url": "hub"}}
    assert gates.stages_changed_by(stages, MINI_PARAMS, both) == {"fetch", "fit", "card"}
    # a -S override outside the profile counts too
    assert gates.stages_changed_by(stages, MINI_PARAMS, MINI_PARAMS | {"fit": {"epochs": 12}}) == {
        "fit",
        "card",
    }


def test_check_fresh_passes_when_the_run_wrote_everything(tmp_path: Path) -> None:
    _committed(tmp_path)
    before = gates.fingerprint(tmp_path, MINI_OUTPUTS, delete=True)
    assert sorted(before["deleted"]) == sorted(MINI_OUTPUTS)
    assert not (tmp_path / "data/raw").exists() and not (tmp_path / "card.md").exists()
    # fetch's outputs come back byte-identical (the quick profile changes nothing it reads): fine once
    # deleted and rewritten
    _run(tmp_path, same=("data/raw", "metrics/source.json"))
    assert _check(tmp_path, before) == []
    # without the params it was taken with, the fingerprint cannot tell: every output must then change
    problems = _check(tmp_path, {k: v for k, v in before.items() if k != "params"})
    assert [p.split(":")[0] for p in problems] == ["data/raw", "metrics/source.json"]


def test_check_fresh_fails_on_a_committed_output_the_run_left_untouched(tmp_path: Path) -> None:
    _committed(tmp_path)
    before = gates.fingerprint(tmp_path, MINI_OUTPUTS)  # no deletion: the committed files stay
    _run(tmp_path, skip=("metrics/fit.json", "metrics/source.json"))
    problems = _check(tmp_path, before)
    assert len(problems) == 2
    assert any(p.startswith("metrics/fit.json") and "older than the run" in p for p in problems)
    # a stage that ignores the profile is no exception: untouched is untouched
    assert any(p.startswith("metrics/source.json") and "older than the run" in p for p in problems)


def test_check_fresh_fails_on_a_deleted_output_the_run_did_not_write(tmp_path: Path) -> None:
    _committed(tmp_path)
    before = gates.fingerprint(tmp_path, MINI_OUTPUTS, delete=True)
    _run(tmp_path, skip=("models/m",))
    assert _check(tmp_path, before) == [
        "models/m: missing or empty after the run: its stage did not write it"
    ]


def test_check_fresh_fails_on_a_committed_result_put_back(tmp_path: Path) -> None:
    """New mtime, old bytes (e.g. `git checkout metrics/fit.json` after the run): not the run's result."""
    _committed(tmp_path)
    before = gates.fingerprint(tmp_path, MINI_OUTPUTS, delete=True)
    _run(tmp_path, same=("metrics/fit.json",))
    problems = _check(tmp_path, before)
    assert problems == ["metrics/fit.json: same content as before the run: not this run's result"]


def test_check_fresh_fails_on_an_output_missing_from_the_fingerprint(tmp_path: Path) -> None:
    _committed(tmp_path)
    before = gates.fingerprint(tmp_path, MINI_OUTPUTS[:-1], delete=True)
    _run(tmp_path)
    assert _check(tmp_path, before) == ["card.md: not fingerprinted before the run (run `fingerprint` first)"]


def test_fingerprint_and_check_fresh_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The CLI reads the outputs from dvc.yaml; exit status 1 on failure, 0 on success."""
    _committed(tmp_path)
    record = tmp_path.parent / f"{tmp_path.name}-fingerprint.json"
    root = ["--root", str(tmp_path)]
    assert gates.main([*root, "fingerprint", "--out", str(record), "--delete"]) == 0
    assert set(json.loads(record.read_text())["outputs"]) == set(MINI_OUTPUTS)
    _run(tmp_path, skip=("card.md",))
    assert gates.main([*root, "check-fresh", "--before", str(record)]) == 1
    assert "FAIL: card.md: missing" in capsys.readouterr().out
    _run(tmp_path)
    assert gates.main([*root, "check-fresh", "--before", str(record)]) == 0


def test_fingerprint_refuses_paths_outside_the_project(tmp_path: Path) -> None:
    with pytest.raises(gates.GateError, match="outside the project"):
        gates.fingerprint(tmp_path / "project", ["../elsewhere"], delete=True)


# ---------------------------------------------------------------------------------------------------------
# check-quick
# ---------------------------------------------------------------------------------------------------------


def _quick_params() -> dict[str, Any]:
    # what `dvc exp run -S profile=quick` leaves in params.yaml
    return compose(["profile=quick"], PROJECT_ROOT / "conf")


def _quick_run(raw: dict[str, Any], accuracy: float = 0.62) -> dict[str, dict[str, Any]]:
    """metrics of a run that did what ``raw``'s quick profile asks."""
    want = gates.expected_quick(raw)
    images = want["images"]
    return {
        "evaluation": {"accuracy": accuracy, "f1_macro": accuracy, "test_images": images["test"]},
        "train": {"train_images": images["train"], "epochs": want["epochs"]},
        "processed": {"images": dict(images)},
    }


def _baseline(raw: dict[str, Any], accuracy: float = 0.62) -> dict[str, Any]:
    want = gates.expected_quick(raw)
    return {"profile": "quick", "accuracy": accuracy, "images": want["images"], "epochs": want["epochs"]}


def _quick_problems(
    raw: dict[str, Any], run: dict[str, dict[str, Any]], baseline: dict[str, Any]
) -> list[str]:
    problems, _ = gates.check_quick(raw, run["evaluation"], run["train"], run["processed"], baseline)
    return problems


def test_expected_counts_are_read_from_the_quick_profile() -> None:
    raw = _quick_params()
    quick = yaml.safe_load((PROJECT_ROOT / "conf" / "profile" / "quick.yaml").read_text())
    want = gates.expected_quick(raw)
    pre = quick["preprocess"]
    assert want["images"] == {
        "train": pre["max_train_images"] - pre["val_size"],  # 5000 - 500 = 4500 today
        "val": pre["val_size"],
        "test": pre["max_test_images"],  # 2000 today
    }
    assert want["epochs"] == quick["train"]["epochs"]
    changed = copy.deepcopy(raw)
    changed["preprocess"]["max_test_images"] = 1500
    assert gates.expected_quick(changed)["images"]["test"] == 1500


def test_check_quick_passes_on_a_quick_run_at_the_baseline() -> None:
    raw = _quick_params()
    run = _quick_run(raw)
    problems, notes = gates.check_quick(
        raw, run["evaluation"], run["train"], run["processed"], _baseline(raw)
    )
    assert problems == [] and any("threshold" in n for n in notes)


def test_check_quick_fails_on_a_test_count_of_1999() -> None:
    raw = _quick_params()
    run = _quick_run(raw)
    run["evaluation"]["test_images"] = 1999
    assert _quick_problems(raw, run, _baseline(raw)) == [
        "eval test_images = 1999, the quick profile asks for 2000"
    ]


@pytest.mark.parametrize(
    ("part", "key", "value", "name"),
    [
        ("train", "train_images", 48000, "train train_images"),  # the default profile's count
        ("train", "epochs", 13.0, "train epochs"),
        ("processed", "images", {"train": 4500, "val": 500, "test": 10000}, "preprocess test"),
    ],
)
def test_check_quick_fails_on_counts_of_another_profile(part: str, key: str, value: Any, name: str) -> None:
    raw = _quick_params()
    run = _quick_run(raw)
    run[part][key] = value
    problems = _quick_problems(raw, run, _baseline(raw))
    assert len(problems) == 1 and problems[0].startswith(name)


def test_check_quick_fails_when_params_yaml_is_not_the_quick_profile() -> None:
    raw = _quick_params()
    run = _quick_run(raw)
    raw["profile"] = "default"
    assert "params.yaml says profile 'default', not 'quick'" in _quick_problems(
        raw, run, _baseline(_quick_params())
    )


def test_check_quick_fails_below_baseline_minus_margin() -> None:
    raw = _quick_params()
    margin = gates.ACCURACY_MARGIN
    at_threshold = _quick_run(raw, accuracy=0.62 - margin + 1e-9)
    assert _quick_problems(raw, at_threshold, _baseline(raw, 0.62)) == []
    below = _quick_run(raw, accuracy=0.62 - margin - 0.001)
    problems = _quick_problems(raw, below, _baseline(raw, 0.62))
    assert len(problems) == 1 and problems[0].startswith("accuracy 0.5690 vs quick baseline 0.6200")
    # the old gate's 0.40 is far below: that would pass no longer
    assert _quick_problems(raw, _quick_run(raw, accuracy=0.41), _baseline(raw, 0.62))


def test_check_quick_fails_on_a_baseline_of_other_counts() -> None:
    """Like with like: a baseline measured on another profile's images cannot gate a quick run."""
    raw = _quick_params()
    stale = _baseline(raw) | {"images": {"train": 48000, "val": 2000, "test": 10000}}
    problems = _quick_problems(raw, _quick_run(raw), stale)
    assert len(problems) == 1 and "re-record it" in problems[0]
    assert _quick_problems(raw, _quick_run(raw), _baseline(raw) | {"profile": "default"})


def test_committed_baseline_is_the_quick_profiles() -> None:
    baseline = json.loads((PROJECT_ROOT / gates.BASELINE_FILE).read_text())
    want = gates.expected_quick(_quick_params())
    assert baseline["profile"] == "quick"
    assert baseline["images"] == want["images"] and baseline["epochs"] == want["epochs"]
    assert 0.1 < baseline["accuracy"] < 1.0
    provenance = baseline["provenance"]
    for key in ("machine", "torch", "git_commit", "date", "command"):
        assert provenance[key]
    assert baseline["metrics"]["metrics/eval.json"]["test_images"] == want["images"]["test"]


# ---------------------------------------------------------------------------------------------------------
# dvc-status-clean / lock-consistent on synthetic `dvc status --json`
# ---------------------------------------------------------------------------------------------------------

# What dvc 3.67 prints in a fresh clone of this project (no DVC cache yet), before any run.
FRESH_CLONE_STATUS: dict[str, Any] = {
    "download": [{"changed outs": {"data/raw": "not in cache"}}],
    "validate": [{"changed deps": {"data/raw": "deleted"}}],
    "preprocess": [
        {"changed deps": {"data/raw": "deleted"}},
        {"changed outs": {"data/processed": "not in cache"}},
    ],
    "train": [
        {"changed deps": {"data/processed": "deleted"}},
        {"changed outs": {"models/cifar10": "not in cache"}},
    ],
    "evaluate": [{"changed deps": {"data/processed": "deleted", "models/cifar10": "deleted"}}],
    "model_card": [{"changed deps": {"models/cifar10": "deleted"}}],
}


def test_dvc_status_clean_fails_on_any_change() -> None:
    assert gates.status_problems({}) == []
    assert gates.status_problems({"train": [{"changed deps": {"src/x.py": "modified"}}]}) == [
        "train: changed deps: src/x.py: modified"
    ]
    assert gates.status_problems({"emissions": ["changed command"]}) == ["emissions: changed command"]
    assert len(gates.status_problems(FRESH_CLONE_STATUS)) == 9


def test_dvc_status_clean_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(
        gates, "dvc_status", lambda root: {"evaluate": [{"changed outs": {"m.json": "modified"}}]}
    )
    assert gates.main(["dvc-status-clean"]) == 1
    assert "FAIL: evaluate: changed outs: m.json: modified" in capsys.readouterr().out
    monkeypatch.setattr(gates, "dvc_status", lambda root: {})
    assert gates.main(["dvc-status-clean"]) == 0


@pytest.mark.parametrize(
    ("stage", "entry"),
    [
        ("validate", {"changed deps": {"src/cifar10_pipeline/stages/validate.py": "modified"}}),
        ("train", {"changed deps": {"params.yaml": {"train": "modified"}}}),
        ("validate", {"changed outs": {"metrics/validation.json": "modified"}}),  # git-tracked out
        ("evaluate", {"changed outs": {"metrics/eval.json": "deleted"}}),  # git-tracked: never "in no cache"
        ("download", {"changed outs": {"data/raw": "modified"}}),  # cached, but present and different
        ("emissions", "changed command"),
    ],
)
def test_lock_consistent_fails_on_what_a_fresh_clone_cannot_explain(stage: str, entry: Any) -> None:
    outputs = gates.declared_outputs(PROJECT_ROOT)
    assert gates.lock_problems(FRESH_CLONE_STATUS, outputs) == []
    status = copy.deepcopy(FRESH_CLONE_STATUS)
    status.setdefault(stage, []).append(entry)
    assert len(gates.lock_problems(status, outputs)) == 1


# ---------------------------------------------------------------------------------------------------------
# Both `dvc status` gates on a real DVC project
# ---------------------------------------------------------------------------------------------------------

TINY_DVC_YAML = {
    "stages": {
        "make": {
            "cmd": "python make.py",
            "deps": ["make.py", "input.txt"],
            "params": ["scale"],
            "outs": ["data", {"summary.json": {"cache": False}}],
        },
        "use": {"cmd": "python use.py", "deps": ["use.py", "data"], "outs": [{"used.txt": {"cache": False}}]},
    }
}
MAKE_PY = """import json, pathlib, yaml
scale = yaml.safe_load(open("params.yaml"))["scale"]
text = pathlib.Path("input.txt").read_text()
pathlib.Path("data").mkdir(exist_ok=True)
pathlib.Path("data/part.txt").write_text(text * scale)
pathlib.Path("summary.json").write_text(json.dumps({"chars": len(text) * scale}))
"""
USE_PY = """import pathlib
pathlib.Path("used.txt").write_text(pathlib.Path("data/part.txt").read_text().upper())
"""


def _dvc_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` = this one
    env["DVC_NO_ANALYTICS"] = "1"
    env["DVC_SITE_CACHE_DIR"] = str(tmp / "dvc-site-cache")
    return env


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny DVC project (no git) after `dvc repro`: dvc.lock matches its code and params."""
    from dvc.repo import Repo  # in-process: two interpreter starts fewer than the CLI

    root = tmp_path_factory.mktemp("tiny-dvc") / "project"
    root.mkdir()
    (root / "dvc.yaml").write_text(yaml.safe_dump(TINY_DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text("scale: 2\n")
    (root / "input.txt").write_text("cifar\n")
    (root / "make.py").write_text(MAKE_PY)
    (root / "use.py").write_text(USE_PY)
    # dvc's own DeprecationWarnings (pygtrie) are not this project's
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for key, value in _dvc_env(root.parent).items():
            patch.setenv(key, value)
        patch.chdir(root)  # dvc resolves its default target, dvc.yaml, from the working directory
        Repo.init(str(root), no_scm=True).close()
        with Repo(str(root)) as repo:
            repo.reproduce()
    assert (root / "used.txt").read_text() == "CIFAR\nCIFAR\n"
    return root


@pytest.fixture
def project(reproduced: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the reproduced project, to edit."""
    root = tmp_path / "project"
    shutil.copytree(reproduced, root, symlinks=True)
    for key, value in _dvc_env(reproduced.parent).items():
        monkeypatch.setenv(key, value)
    return root


def _gates_on(root: Path) -> tuple[list[str], list[str]]:
    """(dvc-status-clean problems, lock-consistent problems) from one real `dvc status --json`."""
    status = gates.dvc_status(root)
    return gates.status_problems(status), gates.lock_problems(status, gates.declared_outputs(root))


@pytest.mark.slow
def test_real_dvc_repo_clean_after_repro(project: Path) -> None:
    assert _gates_on(project) == ([], [])


def test_lock_consistent_command_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(gates, "dvc_status", lambda root: FRESH_CLONE_STATUS)
    assert gates.main(["--root", str(PROJECT_ROOT), "lock-consistent"]) == 0
    broken = FRESH_CLONE_STATUS | {"emissions": ["changed command"]}
    monkeypatch.setattr(gates, "dvc_status", lambda root: broken)
    assert gates.main(["--root", str(PROJECT_ROOT), "lock-consistent"]) == 1
    assert "FAIL: emissions: changed command" in capsys.readouterr().out


@pytest.mark.slow
def test_real_dvc_repo_fresh_clone_state(project: Path) -> None:
    """No DVC cache and no cached output in the workspace: a fresh clone. The lock still matches."""
    shutil.rmtree(project / ".dvc" / "cache")
    shutil.rmtree(project / "data")
    clean, lock = _gates_on(project)
    assert lock == []
    assert clean == ["make: changed outs: data: not in cache", "use: changed deps: data: deleted"]


@pytest.mark.slow
def test_real_dvc_repo_edited_dependency_fails_both(project: Path) -> None:
    (project / "input.txt").write_text("cifar10\n")
    clean, lock = _gates_on(project)
    assert clean == lock == ["make: changed deps: input.txt: modified"]


@pytest.mark.slow
def test_real_dvc_repo_edited_param_and_git_tracked_output_fail_both(project: Path) -> None:
    (project / "params.yaml").write_text("scale: 3\n")
    (project / "used.txt").write_text("edited by hand\n")
    clean, lock = _gates_on(project)
    expected = ["make: changed deps: params.yaml: scale modified", "use: changed outs: used.txt: modified"]
    assert clean == lock
    assert sorted(lock) == sorted(expected)


# ---------------------------------------------------------------------------------------------------------
# The PR report compares like with like
# ---------------------------------------------------------------------------------------------------------


def _load_report() -> ModuleType:
    # scripts/pr_report.py imports ci_gates as a sibling module: the one loaded above
    spec = importlib.util.spec_from_file_location("pr_report", PROJECT_ROOT / "scripts" / "pr_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pr_report_compares_a_quick_run_with_the_quick_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = _load_report()
    monkeypatch.setattr(report, "ROOT", tmp_path)
    _write(tmp_path / "params.yaml", yaml.safe_dump(_quick_params()))  # after `dvc exp run -S profile=quick`
    _write(tmp_path / "metrics/eval.json", json.dumps({"accuracy": 0.60, "test_images": 2000}))
    _write(tmp_path / "metrics/train.json", json.dumps({"device": "AMD EPYC CPU, 2 threads"}))
    # the committed results are the default profile's: not comparable with a quick run
    monkeypatch.setattr(report, "committed_profile", lambda base: "default")
    assert report.choose_reference("HEAD", "auto") == "quick-baseline"
    monkeypatch.setattr(report, "committed_profile", lambda base: "quick")
    assert report.choose_reference("HEAD", "auto") == "base"

    baseline = {
        "accuracy": 0.62,
        "metrics": {"metrics/eval.json": {"accuracy": 0.62, "test_images": 2000}},
        "provenance": {"machine": "AMD EPYC", "train_device": "AMD EPYC CPU, 2 threads"},
    }
    section = report.baseline_headline_section(baseline, "quick baseline")
    assert "| test accuracy | 0.62 | 0.6 | -0.02 |" in section
    assert "| test images | 2000 | 2000 | 0 |" in section
    assert "0.6000 passes the threshold 0.5700" in section
    _write(tmp_path / "metrics/eval.json", json.dumps({"accuracy": 0.55, "test_images": 2000}))
    assert "0.5500 **fails** the threshold 0.5700" in report.baseline_headline_section(
        baseline, "quick baseline"
    )


def test_known_stale_stages_are_reported_not_failed_and_must_really_be_stale() -> None:
    problems = [
        "train: changed deps: src/cifar10_pipeline/training/loop.py: modified",
        "evaluate: changed deps: src/cifar10_pipeline/stages/evaluate.py: modified",
        "preprocess: changed deps: params.yaml: preprocess modified",
    ]
    failing, excused = gates.split_known_stale(problems, ["train", "evaluate"])
    assert failing == ["preprocess: changed deps: params.yaml: preprocess modified"]
    assert len(excused) == 2
    # A stage declared stale whose lock is up to date fails the gate: the declaration cannot linger.
    failing, _ = gates.split_known_stale(problems[:1], ["train", "model_card"])
    assert failing == [
        "model_card: declared stale (--known-stale) but dvc.lock matches it: drop the declaration"
    ]
