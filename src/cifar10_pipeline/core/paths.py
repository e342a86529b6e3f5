"""Where each stage reads and writes, relative to the project root (DVC runs every stage from there).

dvc.yaml declares the same paths; keeping them in one module means a stage cannot quietly write somewhere
that DVC does not track. ``saved_model_dir`` checks, without importing torch, that a model folder is there.
"""

from pathlib import Path

from cifar10_pipeline.core.errors import PipelineError

PARAMS_FILE = Path("params.yaml")
# Hydra's config folder and its primary config (conf/config.yaml), composed into params.yaml.
CONF_DIR = Path("conf")
CONFIG_NAME = "config"

RAW_DIR = Path("data/raw")
PROCESSED_DIR = Path("data/processed")
MODEL_DIR = Path("models/cifar10")
# Scratch space of the train stage (git- and DVC-ignored, not a declared output): resumable checkpoints.
TRAIN_CHECKPOINT_DIR = Path("models/checkpoints/train")

METRICS_DIR = Path("metrics")  # what `dvc repro` writes, and nothing else
# Records no stage writes (benchmarks, the reliability suite, CI's quick baseline), each with the one command
# that rewrites it: records/README.md.
RECORDS_DIR = Path("records")
BENCHMARK_RECORD = RECORDS_DIR / "benchmark.json"  # written by `python benchmarks/training.py`
REPORTS_DIR = Path("reports")

DATA_SOURCE = METRICS_DIR / "data_source.json"
VALIDATION_METRICS = METRICS_DIR / "validation.json"
PROCESSED_VALIDATION = METRICS_DIR / "processed_validation.json"
DATA_DOCS_DIR = REPORTS_DIR / "data_docs"
TRAIN_METRICS = METRICS_DIR / "train.json"
TRAIN_HISTORY = METRICS_DIR / "train_history.csv"
TRAIN_CURVES = REPORTS_DIR / "training_curves.png"
EVAL_METRICS = METRICS_DIR / "eval.json"
CONFUSION_PAIRS = METRICS_DIR / "confusion.csv"
PER_CLASS_METRICS = METRICS_DIR / "per_class.csv"
RELIABILITY_BINS = METRICS_DIR / "reliability.csv"
ROBUSTNESS_METRICS = METRICS_DIR / "robustness.csv"
EVAL_FIGURES_DIR = REPORTS_DIR / "figures"
STAGE_EMISSIONS_DIR = METRICS_DIR / "emissions"
EMISSIONS_METRICS = METRICS_DIR / "emissions.json"
EMISSIONS_REPORT = REPORTS_DIR / "emissions.md"
MODEL_CARD = REPORTS_DIR / "model_card.md"


class NoModelError(PipelineError, FileNotFoundError):
    """No saved model where one was asked for; the message says, in one line, how to get one (a stage
    prints it as ``error: ...``, the CLI and the server as their own one-line error)."""


QUICK_START_RECORD = RECORDS_DIR / "quick_start.json"  # written by `python benchmarks/quick_start.py`


def quick_profile_cost(record: Path = QUICK_START_RECORD) -> str:
    """``, N min on a 2-core <CPU>`` from the checkout's timed quick start, or nothing without the record."""
    import json

    try:
        measured = json.loads(Path(record).read_text())
        minutes = measured["steps"][0]["seconds"] / 60
        machine = measured["machine"]
        return f", {minutes:.0f} min on {machine['usable_cores']} cores of an {machine['cpu_model']}"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return ""


def no_model_message(path: str | Path, flag: str = "--model") -> str:
    return (
        f"no trained model at {path}: train one with the quick profile (dvc exp run -S profile=quick"
        f"{quick_profile_cost()}), "
        f"fetch the team's with cifar10 pull (docs/team.md), or point {flag} at a published model (a folder, "
        "or a Hub id: owner/name@revision)"
    )


def saved_model_dir(path: str | Path = MODEL_DIR, flag: str = "--model") -> Path:
    """The local folder of a saved model: ``path`` if it holds one (its config.json), the verified download
    of a Hub model when ``path`` is a Hub id (``owner/name@revision``, core/hub.py), else NoModelError
    saying how to get one.

    For ``transformers.pipeline`` too, which takes a missing folder for a Hub id and answers with a network
    error: ``pipeline("image-classification", model=saved_model_dir("models/cifar10"))``, or
    ``saved_model_dir("owner/name@v1")`` for a published model.
    """
    from cifar10_pipeline.core.hub import download_model, parse_hub_id

    if (hub_id := parse_hub_id(path)) is not None:
        path = download_model(*hub_id)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise NoModelError(no_model_message(path, flag))
    return path
