"""What a change did to the pipeline's results, in Markdown: the part of the PR report needing no GitHub API.

    scripts/pr_report.sh [BASE_REV] [--against auto|base|quick-baseline]   # BASE_REV defaults to HEAD

compares the workspace (what the last ``dvc repro`` or ``dvc exp run`` left there) with a reference of the
same profile, like with like:

    base             the results committed at BASE_REV (when they are of the workspace's profile)
    quick-baseline   a quick-profile run (``dvc exp run -S profile=quick``, CI's) against the quick baseline
                     committed at BASE_REV (records/ci_quick_baseline.json, written by
                     ``scripts/ci_gates.py record-baseline``); the committed results are the default
                     profile's, so a diff with them would show the profile, not the change
    auto (default)   quick-baseline when the workspace is on the quick profile and BASE_REV's committed
                     results are not; base otherwise

and writes

    pr_report/report.md       which reference it compares with, the headline metrics of both, every changed
                              metric (folded), the params that differ, the training curves (Mermaid charts)
                              and the confusion matrix (a table): all of it renders inline on GitHub
    pr_report/plots/          base: dvc plots diff BASE_REV (every plot of both revisions); quick-baseline:
                              dvc plots show (this run's; the baseline keeps numbers, not plots). index.html
                              and static/ with the PNG plots (confusion matrix, training curves)

.github/workflows/ci.yml posts report.md to the job summary and to one PR comment and uploads pr_report/ as
an artifact; .ci/run prints it. Images cannot be inlined into a PR comment from the runner (GitHub shows only
images it can fetch by URL), hence the text-based charts; the PNGs and the HTML are in the artifact.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import yaml
from ci_gates import ACCURACY_MARGIN, BASELINE_FILE, QUICK_PROFILE, cpu_model, flatten

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.params import validate_params

# Run from the project root (scripts/pr_report.sh changes there), like dvc itself.
ROOT = Path.cwd()
OUT = Path("pr_report")
OUT_ABS = ROOT / OUT
HISTORY = "metrics/train_history.csv"
CONFUSION = "metrics/confusion.csv"
# The PNG plots worth a look in review (dvc.yaml lists them among the top-level plots).
KEY_IMAGES = ("reports/figures/confusion_matrix.png", "reports/training_curves.png")
# The metrics a reviewer looks at first (the full `dvc metrics diff` follows, folded).
HEADLINE = (
    ("metrics/eval.json", "accuracy", "test accuracy"),
    ("metrics/eval.json", "f1_macro", "test F1 (macro)"),
    ("metrics/eval.json", "class_gap.worst_class", "worst class"),
    ("metrics/eval.json", "ece", "calibration error (ECE)"),
    ("metrics/eval.json", "robustness.mean_corrupted_accuracy", "accuracy under corruptions"),
    ("metrics/eval.json", "test_images", "test images"),
    ("metrics/train.json", "val_accuracy", "validation accuracy"),
    ("metrics/train.json", "train_seconds", "training time (s)"),
    ("metrics/emissions.json", "energy_kwh", "energy (kWh)"),
)
BASE_COLOUR, HEAD_COLOUR = "#9e9e9e", "#1f77b4"
TIMEOUT_S = 600


def run(*args: str) -> str:
    """stdout of a command run from the project root; a failure stops the report with the command's stderr."""
    try:
        done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"pr_report: `{' '.join(args)}` took more than {TIMEOUT_S}s") from None
    if done.returncode != 0:
        raise SystemExit(f"pr_report: `{' '.join(args)}` failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def dvc(*args: str) -> str:
    # The interpreter running this script is the project's: its dvc is the pinned one.
    return run(sys.executable, "-m", "dvc", *args)


def fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def headline_section(base: str, base_label: str) -> str:
    """Key metrics of both revisions, from ``dvc metrics diff --json --all`` (unchanged ones too)."""
    diff = json.loads(dvc("metrics", "diff", base, "--json", "--all") or "{}")
    diff = diff.get("diff", diff)  # older DVC versions nest the table under "diff"
    lines = [f"| metric | {base_label} | this change | change |", "|---|---|---|---|"]
    for path, key, label in HEADLINE:
        entry = diff.get(path, {}).get(key)
        if entry is None:
            continue
        change = entry.get("diff")
        if isinstance(change, int | float):
            shown = "0" if abs(change) < 1e-9 else f"{change:+.4g}"  # float noise is no change
        else:
            shown = "" if change is None else str(change)
        lines.append(f"| {label} | {fmt(entry.get('old'))} | {fmt(entry.get('new'))} | {shown} |")
    return "\n".join(lines) if len(lines) > 2 else "No headline metric in either revision."


def change_text(old: object, new: object) -> str:
    if isinstance(old, int | float) and isinstance(new, int | float) and not isinstance(old, bool):
        change = new - old
        return "0" if abs(change) < 1e-9 else f"{change:+.4g}"
    return "" if old == new else "changed"


def workspace_metrics(paths: set[str]) -> dict[str, dict[str, object]]:
    """Each metrics file of the workspace, flattened to dotted keys as in the baseline."""
    found = {}
    for path in sorted(paths):
        text = workspace_text(path)
        found[path] = flatten(json.loads(text)) if text else {}
    return found


def baseline_headline_section(baseline: dict, label: str) -> str:
    """Key metrics of the quick baseline and of this run, and the check-quick gate's verdict."""
    old = baseline.get("metrics", {})
    new = workspace_metrics(set(old) | {path for path, _, _ in HEADLINE})
    lines = [f"| metric | {label} | this run | change |", "|---|---|---|---|"]
    for path, key, name in HEADLINE:
        before, after = old.get(path, {}).get(key), new.get(path, {}).get(key)
        if before is None and after is None:
            continue
        lines.append(f"| {name} | {fmt(before)} | {fmt(after)} | {change_text(before, after)} |")
    accuracy, reference = new.get("metrics/eval.json", {}).get("accuracy"), baseline.get("accuracy")
    if isinstance(accuracy, int | float) and isinstance(reference, int | float):
        threshold = reference - ACCURACY_MARGIN
        verdict = "passes" if accuracy >= threshold else "**fails**"
        lines.append(
            f"\nAccuracy gate (`scripts/ci_gates.py check-quick`): {accuracy:.4f} {verdict} the threshold "
            f"{threshold:.4f} (baseline {reference:.4f} - margin {ACCURACY_MARGIN})."
        )
    provenance = baseline.get("provenance", {})
    device = new.get("metrics/train.json", {}).get("device")
    lines.append(
        f"Training time and energy depend on the machine: the baseline ran on {provenance.get('machine')} "
        f"({provenance.get('train_device')}), this run on {cpu_model()} ({device})."
    )
    return "\n".join(lines)


def baseline_metrics_diff(baseline: dict) -> str:
    """Every metric the baseline keeps that this run changed (dvc metrics diff's table, by hand)."""
    old = baseline.get("metrics", {})
    new = workspace_metrics(set(old))
    lines = ["| path | metric | baseline | this run | change |", "|---|---|---|---|---|"]
    for path in sorted(old):
        for key in sorted(old[path]):
            before, after = old[path].get(key), new[path].get(key)
            if change_text(before, after) not in ("", "0"):
                lines.append(
                    f"| {path} | {key} | {fmt(before)} | {fmt(after)} | {change_text(before, after)} |"
                )
    return "\n".join(lines) if len(lines) > 2 else ""


def effective_params() -> dict[str, object]:
    """The workspace's params.yaml (resolved values), as ``section.key`` pairs."""
    return validate_params(yaml.safe_load((ROOT / "params.yaml").read_text())).as_flat_dict()


def baseline_params_section(baseline: dict) -> str:
    """The params that differ between the baseline's run and this one."""
    old, new = baseline.get("params") or {}, effective_params()
    changed = [key for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    if not changed:
        return "No effective param differs from the baseline's run (profile overrides applied to both)."
    lines = ["| param | baseline | this run |", "|---|---|---|"]
    lines += [f"| {key} | {fmt(old.get(key))} | {fmt(new.get(key))} |" for key in changed]
    return "\n".join(lines)


def folded(summary: str, markdown: str) -> str:
    """A collapsed block (GitHub renders Markdown inside it when blank lines surround it)."""
    return f"<details><summary>{summary}</summary>\n\n{markdown}\n\n</details>"


FORMER_BASELINE_FILE = "metrics/ci_quick_baseline.json"  # where BASELINE_FILE was before records/


def base_text(base: str, path: str) -> str | None:
    """``path`` as committed at ``base`` (metrics and plots are git-tracked: cache: false), None if absent."""
    done = subprocess.run(
        ["git", "show", f"{base}:{path}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return done.stdout if done.returncode == 0 else None


def workspace_text(path: str) -> str | None:
    file = ROOT / path
    return file.read_text() if file.is_file() else None


def rows(text: str | None) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text))) if text else []


def numbers(history: list[dict], column: str) -> list[float]:
    return [float(row[column]) for row in history if row.get(column) not in (None, "")]


def mermaid_lines(title: str, y_label: str, series: list[tuple[str, list[float]]], y_range: str = "") -> str:
    """An xychart (Mermaid renders it inline on GitHub) with one line per (colour, values)."""
    series = [(colour, values) for colour, values in series if values]
    if not series:
        return ""
    if max(len(values) for _, values in series) < 2:  # a one-point line draws nothing
        return f"{title}: " + " vs ".join(f"{values[0]:.4f}" for _, values in series)
    epochs = max(len(values) for _, values in series)
    palette = ", ".join(colour for colour, _ in series)
    lines = [
        "```mermaid",
        f'%%{{init: {{"themeVariables": {{"xyChart": {{"plotColorPalette": "{palette}"}}}}}}}}%%',
        "xychart-beta",
        f'  title "{title}"',
        f'  x-axis "epoch" [{", ".join(str(e) for e in range(1, epochs + 1))}]',
        f'  y-axis "{y_label}"{y_range}',
    ]
    lines += [f"  line [{', '.join(f'{v:.4f}' for v in values)}]" for _, values in series]
    return "\n".join([*lines, "```"])


def curves_section(old: list[dict], base_label: str) -> str:
    """This run's per-epoch curves, with ``old`` (the reference's history rows) in grey."""
    head = rows(workspace_text(HISTORY))
    if not head:
        return f"No `{HISTORY}` in the workspace: run the pipeline first."
    # Validation figures when the run held out a validation split, else the training ones.
    accuracy = "val_accuracy" if numbers(head, "val_accuracy") else "train_accuracy"
    loss = "val_loss" if numbers(head, "val_loss") else "train_loss"
    legend = f"blue: this change, {len(head)} epoch(s)"
    if old:
        legend = f"grey: {base_label}, {len(old)} epoch(s); " + legend
    charts = [
        mermaid_lines(
            f"{accuracy} per epoch",
            "accuracy",
            [(BASE_COLOUR, numbers(old, accuracy)), (HEAD_COLOUR, numbers(head, accuracy))],
            " 0 --> 1",
        ),
        mermaid_lines(
            f"{loss} per epoch",
            "loss",
            [(BASE_COLOUR, numbers(old, loss)), (HEAD_COLOUR, numbers(head, loss))],
        ),
    ]
    return "\n\n".join([legend, *charts])


def confusion(text: str | None) -> dict[tuple[str, str], int]:
    return Counter((row["actual"], row["predicted"]) for row in rows(text))


def recall(counts: dict[tuple[str, str], int], name: str) -> float | None:
    total = sum(n for (actual, _), n in counts.items() if actual == name)
    return counts.get((name, name), 0) / total if total else None


def base_recalls(base: str) -> dict[str, float | None]:
    """Recall per class of the confusion matrix committed at ``base`` (empty when it has none)."""
    counts = confusion(base_text(base, CONFUSION))
    return {name: recall(counts, name) for name in CLASS_NAMES} if counts else {}


def confusion_section(old_recalls: dict[str, float | None], base_label: str) -> str:
    """This run's confusion matrix and recall per class, with the change from ``old_recalls`` if any."""
    head = confusion(workspace_text(CONFUSION))
    if not head:
        return f"No `{CONFUSION}` in the workspace: run the pipeline first."
    old = old_recalls
    header = ["actual \\ predicted", *CLASS_NAMES, "recall"]
    if old:
        header.append(f"Δ recall vs {base_label}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for actual in CLASS_NAMES:
        cells = [actual]
        for predicted in CLASS_NAMES:
            count = head.get((actual, predicted), 0)
            cells.append(f"**{count}**" if actual == predicted else (str(count) if count else "·"))
        new_recall = recall(head, actual)
        cells.append("n/a" if new_recall is None else f"{new_recall:.1%}")
        if old:
            old_recall = old.get(actual)
            delta = None if new_recall is None or old_recall is None else new_recall - old_recall
            cells.append("n/a" if delta is None else f"{100 * delta:+.1f} pt")
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(head.values())
    correct = sum(head.get((name, name), 0) for name in CLASS_NAMES)
    lines.append(f"\n{total} test images of this change, {correct / total:.2%} correct.")
    return "\n".join(lines)


def plots_section(plots_dir: Path, command: str = "dvc plots diff", whose: str = "both revisions") -> str:
    """Names of the rendered files (relative links work in the artifact and in a local checkout)."""
    static = plots_dir / "static"
    images = sorted(static.glob("*.png")) if static.is_dir() else []
    wanted = [p for p in images if any(p.name.endswith(key.replace("/", "_")) for key in KEY_IMAGES)]
    listed = "\n".join(f"- `{p.relative_to(OUT_ABS).as_posix()}`" for p in wanted or images)
    return (
        f"`{command}` rendered every plot of {whose} to `{OUT}/plots/index.html` "
        f"(open it in a browser); the key PNG plots:\n\n{listed or '- (none rendered)'}"
    )


def committed_profile(base: str) -> str | None:
    """The ``profile`` of params.yaml as committed at ``base`` (None if unreadable)."""
    text = base_text(base, "params.yaml")
    raw = yaml.safe_load(text) if text else None
    return raw.get("profile", "default") if isinstance(raw, dict) else None


def choose_reference(base: str, against: str) -> str:
    """``base`` or ``quick-baseline``: what the workspace's results are compared with (see the docstring)."""
    if against != "auto":
        return against
    workspace = yaml.safe_load((ROOT / "params.yaml").read_text()).get("profile", "default")
    return "quick-baseline" if workspace == QUICK_PROFILE != committed_profile(base) else "base"


def load_baseline(base: str, base_label: str) -> tuple[dict, str]:
    """The quick baseline committed at ``base``, else the workspace's copy; and where it came from."""
    text = base_text(base, BASELINE_FILE.as_posix())
    where = f"`{BASELINE_FILE}` committed at {base_label}"
    if text is None:  # a base from before the records left metrics/
        text = base_text(base, FORMER_BASELINE_FILE)
        where = f"`{FORMER_BASELINE_FILE}` committed at {base_label}"
    if text is None:
        text = workspace_text(BASELINE_FILE.as_posix())
        where = f"`{BASELINE_FILE}` of the workspace ({base_label} has none)"
    if text is None:
        raise SystemExit(
            f"pr_report: no {BASELINE_FILE} at {base} or in the workspace: record one "
            "(scripts/ci_gates.py record-baseline after dvc exp run -S profile=quick) or use --against base"
        )
    return json.loads(text), where


def base_sections(base: str, base_label: str, workspace: str) -> list[str]:
    """The report against the results committed at ``base`` (same profile as the workspace)."""
    metrics = dvc("metrics", "diff", base, "--md", "--precision", "4").strip()
    params = dvc("params", "diff", base, "--md").strip()
    dvc("plots", "diff", base, "--out", str(OUT / "plots"))
    base_profile, profile = committed_profile(base), effective_params()["profile"]
    warning = (
        f" **Not like with like:** {base_label}'s results are of profile `{base_profile}`, this run's of "
        f"`{profile}`; the profile explains much of any metric change."
        if base_profile != profile
        else ""
    )
    return [
        f"Compared against: the results committed at {base_label} (profile `{base_profile}`), with "
        f"{workspace}, as left by the last `dvc repro` / `dvc exp run`.{warning}",
        "### Metrics (`dvc metrics diff`)",
        headline_section(base, base_label),
        folded("Every changed metric (dvc metrics diff --md)", metrics) if metrics else "No metric changed.",
        "### Params (`dvc params diff`)",
        params or "No param changed.",
        "### Training curves",
        curves_section(rows(base_text(base, HISTORY)), base_label),
        "### Confusion matrix (test split, this change)",
        confusion_section(base_recalls(base), base_label),
        "### Plots (`dvc plots diff`)",
        plots_section(OUT_ABS / "plots"),
    ]


def baseline_sections(base: str, base_label: str, workspace: str) -> list[str]:
    """The report of a quick run against the quick baseline: like with like."""
    baseline, where = load_baseline(base, base_label)
    provenance = baseline.get("provenance", {})
    label = "quick baseline"
    dvc("plots", "show", "--out", str(OUT / "plots"))
    metrics = baseline_metrics_diff(baseline)
    commit = str(provenance.get("git_commit") or "?")[:7]
    return [
        f"Compared against: the **quick baseline**, {where}: a `{QUICK_PROFILE}`-profile run of commit "
        f"{commit} recorded {provenance.get('date')} on {provenance.get('machine')} (torch "
        f"{provenance.get('torch')}) with `{provenance.get('command')}`. This run: {workspace}, on the "
        f"`{QUICK_PROFILE}` profile too (like with like; the committed results are another profile's and "
        "are not compared).",
        "### Metrics (this quick run vs the quick baseline)",
        baseline_headline_section(baseline, label),
        folded("Every changed metric (vs the quick baseline)", metrics) if metrics else "No metric changed.",
        "### Params (effective, vs the quick baseline's run)",
        baseline_params_section(baseline),
        "### Training curves",
        curves_section(baseline.get("history") or [], label),
        "### Confusion matrix (test split, this run)",
        confusion_section(
            {
                name: baseline.get("metrics", {}).get("metrics/eval.json", {}).get(f"per_class.{name}.recall")
                for name in CLASS_NAMES
            },
            label,
        ),
        "### Plots (`dvc plots show`)",
        plots_section(
            OUT_ABS / "plots", "dvc plots show", "this run (the baseline keeps numbers, not plots)"
        ),
    ]


def build(base: str, against: str = "auto") -> Path:
    base_sha = run("git", "rev-parse", "--short", base).strip()
    head_sha = run("git", "rev-parse", "--short", "HEAD").strip()
    base_label = f"`{base}`" if base_sha == base else f"`{base}` ({base_sha})"
    shutil.rmtree(OUT_ABS, ignore_errors=True)
    OUT_ABS.mkdir(parents=True)
    dirty = run("git", "status", "--porcelain", "--untracked-files=no").strip()
    workspace = f"the workspace (HEAD {head_sha}{', with uncommitted changes' if dirty else ''})"
    reference = choose_reference(base, against)
    sections = (baseline_sections if reference == "quick-baseline" else base_sections)(
        base, base_label, workspace
    )
    report = "\n\n".join(["## CIFAR-10 pipeline: what this change did", *sections])
    path = OUT_ABS / "report.md"
    path.write_text(report + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", default="HEAD", help="git revision to compare with (default HEAD)")
    parser.add_argument(
        "--against",
        choices=("auto", "base", "quick-baseline"),
        default="auto",
        help="the committed results of BASE, or BASE's quick baseline (default: auto, by profile)",
    )
    args = parser.parse_args()
    path = build(args.base, args.against)
    print(f"pr_report: wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
