"""What a change did to the pipeline's results, in Markdown: the part of the PR report needing no GitHub API.

    scripts/pr_report.sh [BASE_REV]        # BASE_REV defaults to HEAD

compares the results committed at BASE_REV with the workspace (what the last ``dvc repro`` or
``dvc exp run`` left there) and writes

    pr_report/report.md       the headline metrics of both revisions, dvc metrics diff --md (folded),
                              dvc params diff --md, the training curves (Mermaid charts) and the confusion
                              matrix (a table): all of it renders inline on GitHub
    pr_report/plots/          dvc plots diff BASE_REV --out pr_report/plots: index.html with every plot of
                              both revisions, static/ with the PNG plots (confusion matrix, training curves)

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

from cifar10_pipeline import CLASS_NAMES

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


def folded(summary: str, markdown: str) -> str:
    """A collapsed block (GitHub renders Markdown inside it when blank lines surround it)."""
    return f"<details><summary>{summary}</summary>\n\n{markdown}\n\n</details>"


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


def numbers(history: list[dict[str, str]], column: str) -> list[float]:
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


def curves_section(base: str, base_label: str) -> str:
    head = rows(workspace_text(HISTORY))
    if not head:
        return f"No `{HISTORY}` in the workspace: run the pipeline first."
    old = rows(base_text(base, HISTORY))
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


def confusion_section(base: str, base_label: str) -> str:
    head = confusion(workspace_text(CONFUSION))
    if not head:
        return f"No `{CONFUSION}` in the workspace: run the pipeline first."
    old = confusion(base_text(base, CONFUSION))
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
            old_recall = recall(old, actual)
            delta = None if new_recall is None or old_recall is None else new_recall - old_recall
            cells.append("n/a" if delta is None else f"{100 * delta:+.1f} pt")
        lines.append("| " + " | ".join(cells) + " |")
    total = sum(head.values())
    correct = sum(head.get((name, name), 0) for name in CLASS_NAMES)
    lines.append(f"\n{total} test images of this change, {correct / total:.2%} correct.")
    return "\n".join(lines)


def plots_section(plots_dir: Path) -> str:
    """Names of the rendered files (relative links work in the artifact and in a local checkout)."""
    static = plots_dir / "static"
    images = sorted(static.glob("*.png")) if static.is_dir() else []
    wanted = [p for p in images if any(p.name.endswith(key.replace("/", "_")) for key in KEY_IMAGES)]
    listed = "\n".join(f"- `{p.relative_to(OUT_ABS).as_posix()}`" for p in wanted or images)
    return (
        f"`dvc plots diff` rendered every plot of both revisions to `{OUT}/plots/index.html` "
        f"(open it in a browser); the key PNG plots:\n\n{listed or '- (none rendered)'}"
    )


def build(base: str) -> Path:
    base_sha = run("git", "rev-parse", "--short", base).strip()
    head_sha = run("git", "rev-parse", "--short", "HEAD").strip()
    base_label = f"`{base}`" if base_sha == base else f"`{base}` ({base_sha})"
    shutil.rmtree(OUT_ABS, ignore_errors=True)
    OUT_ABS.mkdir(parents=True)

    metrics = dvc("metrics", "diff", base, "--md", "--precision", "4").strip()
    params = dvc("params", "diff", base, "--md").strip()
    dvc("plots", "diff", base, "--out", str(OUT / "plots"))
    dirty = run("git", "status", "--porcelain", "--untracked-files=no").strip()
    workspace = f"the workspace (HEAD {head_sha}{', with uncommitted changes' if dirty else ''})"

    report = "\n\n".join(
        [
            "## CIFAR-10 pipeline: what this change did",
            f"Compared the results committed at {base_label} with {workspace}, as left by the last "
            "`dvc repro` / `dvc exp run`. Changed params (e.g. `profile`) explain part of any metric change.",
            "### Metrics (`dvc metrics diff`)",
            headline_section(base, base_label),
            folded("Every changed metric (dvc metrics diff --md)", metrics)
            if metrics
            else "No metric changed.",
            "### Params (`dvc params diff`)",
            params or "No param changed.",
            "### Training curves",
            curves_section(base, base_label),
            "### Confusion matrix (test split, this change)",
            confusion_section(base, base_label),
            "### Plots (`dvc plots diff`)",
            plots_section(OUT_ABS / "plots"),
        ]
    )
    path = OUT_ABS / "report.md"
    path.write_text(report + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", nargs="?", default="HEAD", help="git revision to compare with (default HEAD)")
    path = build(parser.parse_args().base)
    print(f"pr_report: wrote {path.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
