"""The ``cifar10`` command: ``cifar10 predict PATH...`` classifies images; ``cifar10 serve`` runs the API;
``cifar10 publish OWNER/NAME`` uploads the trained model with its card to a Hugging Face Hub repository;
``cifar10 pull`` fetches the team's outputs from the DVC remote, saying in one line when it is absent.

Subcommands live in ``COMMANDS`` (name -> how to add its arguments and what to run), so a new one is one
entry. Heavy imports (torch, transformers) happen inside the commands, so ``cifar10 --help`` is instant.

``predict`` reads files, folders (recursively, image extensions only) and globs, decodes them with the shared
``image_to_array`` and classifies them in batches with ``predict_logits`` -- the same path evaluation and the
web service use. A file that cannot be read is reported (also in ``--json``) and the others still run; the
exit status is then 1. Exit status 2: bad arguments or no model.

``--model`` (predict) and ``--model`` / ``CIFAR10_SERVE_MODEL`` (serve) take a folder or a Hub id
(``owner/name@revision``): ``saved_model_dir`` downloads and verifies it (core/hub.py), then it loads as a
folder. The Hub client's own settings apply: ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HOME``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar10_pipeline import NUM_CLASSES, __version__
from cifar10_pipeline.core.paths import MODEL_CARD, MODEL_DIR, NoModelError

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_USAGE = 2
GLOB_CHARS = frozenset("*?[")
DEFAULT_BATCH_SIZE = 256
# No model or a broken checkpoint (OSError, ValueError); a device torch lacks (RuntimeError, AssertionError).
MODEL_LOAD_ERRORS = (OSError, ValueError, RuntimeError, AssertionError)


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# -------------------------------------------------------------------------------------------------- predict


def image_suffixes() -> frozenset[str]:
    """File extensions Pillow can open (.png, .jpg, .webp, ...), lower case."""
    from PIL import Image

    extensions = Image.registered_extensions()
    return frozenset(ext.lower() for ext, fmt in extensions.items() if fmt in Image.OPEN)


def _folder_images(folder: Path, suffixes: frozenset[str]) -> list[Path]:
    # Hidden files and folders (.DS_Store, .git, .ipynb_checkpoints) are never the user's images.
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and path.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def expand_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to classify, in the order given (no duplicates), and (input, error) for inputs that name none.

    A folder contributes its image files, recursively; a glob (``**`` included) contributes what it matches;
    a file named explicitly is taken whatever its extension.
    """
    suffixes = image_suffixes()
    files: list[Path] = []
    problems: list[tuple[str, str]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = _folder_images(path, suffixes)
            if not found:
                problems.append(
                    (raw, f"folder has no image files (looked for {', '.join(sorted(suffixes)[:8])}, ...)")
                )
            files.extend(found)
        elif path.exists():
            files.append(path)
        elif GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                problems.append((raw, "no files match this pattern"))
            for match in map(Path, matches):
                files.extend(_folder_images(match, suffixes) if match.is_dir() else [match])
        else:
            problems.append((raw, "no such file or folder"))
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, problems


def _decode(path: Path) -> tuple[Any, str | None]:
    """(uint8 32x32x3 array, None) or (None, why it failed) for one file."""
    from cifar10_pipeline.core.images import ImageInputError, image_to_array

    try:
        return image_to_array(path), None
    except ImageInputError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    except IsADirectoryError:
        return None, "is a folder, not an image"
    except OSError as exc:  # missing, unreadable, vanished since listing
        return None, exc.strerror or str(exc)


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _result(path: str, row: Any, labels: list[str], top_k: int) -> dict[str, Any]:
    order = sorted(range(len(labels)), key=lambda i: -float(row[i]))
    return {
        "path": path,
        "label": labels[order[0]],
        "probability": float(row[order[0]]),
        "top_k": [{"label": labels[i], "probability": float(row[i])} for i in order[:top_k]],
        "probabilities": {label: float(p) for label, p in zip(labels, row, strict=True)},
        "error": None,
    }


def _human_line(result: dict[str, Any]) -> str:
    ranked = "  ".join(f"{item['label']} {100 * item['probability']:.1f}%" for item in result["top_k"])
    return f"{result['path']}\t{ranked}"


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files, folders (searched recursively) or glob patterns (quote them: 'photos/**/*.jpg')",
    )
    parser.add_argument(
        "--model",
        default=str(MODEL_DIR),
        help="model directory, or Hub id owner/name[@COMMIT_OR_TAG] (the Hub client's HF_ENDPOINT, HF_TOKEN; "
        f"default: {MODEL_DIR})",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=3,
        metavar="K",
        help=f"classes to list per image, 1..{NUM_CLASSES} (default: 3)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document (for scripts) instead of text"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"images decoded and classified per step (default {DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--device", default="cpu", help="torch device to run on, e.g. cpu or cuda (default: cpu)"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on for more than one batch when stderr is a terminal)",
    )


def run_predict(args: argparse.Namespace) -> int:
    if not 1 <= args.top_k <= NUM_CLASSES:
        print(
            f"cifar10 predict: error: --top-k must be between 1 and {NUM_CLASSES}, got {args.top_k}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if args.batch_size < 1:
        print(
            f"cifar10 predict: error: --batch-size must be positive, got {args.batch_size}", file=sys.stderr
        )
        return EXIT_USAGE
    files, input_problems = expand_inputs(args.paths)

    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    from cifar10_pipeline.modeling.inference import predict_logits
    from cifar10_pipeline.modeling.model import load_model

    transformers_logging.disable_progress_bar()  # its weight-loading bar would clutter every run's stderr
    try:
        model = load_model(args.model, device=args.device)
    except NoModelError as exc:
        _print_error("predict", exc)  # says how to get a model
        return EXIT_USAGE
    except MODEL_LOAD_ERRORS as exc:
        print(f"cifar10 predict: error: cannot load the model from {args.model}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]

    results: list[dict[str, Any]] = [{"path": raw, "error": message} for raw, message in input_problems]
    for item in results:
        print(f"cifar10 predict: error: {item['path']}: {item['error']}", file=sys.stderr)

    show_progress = args.progress
    if show_progress is None:
        show_progress = len(files) > args.batch_size and sys.stderr.isatty()
    # Pillow releases the GIL while decoding, so threads decode large photos in parallel.
    with (
        ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool,
        tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr, disable=not show_progress) as bar,
    ):
        for chunk in _chunks(files, args.batch_size):
            decoded = list(pool.map(_decode, chunk))
            good = [array for array, error in decoded if error is None]
            probabilities = (
                predict_logits(model, np.stack(good), batch_size=args.batch_size).softmax(1).numpy()
                if good
                else []
            )
            rows = iter(probabilities)
            for path, (_, error) in zip(chunk, decoded, strict=True):
                if error is not None:
                    result = {"path": str(path), "error": error}
                    bar.write(f"cifar10 predict: error: {path}: {error}", file=sys.stderr)
                else:
                    result = _result(str(path), next(rows), labels, args.top_k)
                    if not args.json:
                        bar.write(_human_line(result), file=sys.stdout)
                results.append(result)
            bar.update(len(chunk))

    failed = sum(1 for item in results if item["error"] is not None)
    if args.json:
        document = {"model": str(args.model), "version": __version__, "results": results, "errors": failed}
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    if failed:
        print(f"cifar10 predict: {failed} of {len(results)} input(s) failed (see above)", file=sys.stderr)
        return EXIT_SOME_FAILED
    if not results:
        print("cifar10 predict: error: nothing to classify", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


# ---------------------------------------------------------------------------------------------------- serve


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    # The flags are built from ServeSettings, the same as for python -m cifar10_pipeline.serving.serve.
    from cifar10_pipeline.serving.settings import DESCRIPTION, add_settings_arguments

    parser.description = DESCRIPTION
    add_settings_arguments(parser)


def run_serve(args: argparse.Namespace) -> int:
    from cifar10_pipeline.serving.settings import SettingsInputError, settings_from_args

    try:
        settings = settings_from_args(args)
        from cifar10_pipeline.serving.serve import run

        run(settings)  # checks the settings and the model folder before it serves
    except (SettingsInputError, NoModelError) as exc:
        _print_error("serve", exc)
        return EXIT_USAGE
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- publish


def add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="the Hub model repository (created if missing)")
    parser.add_argument(
        "--model", type=Path, default=MODEL_DIR, help=f"save_pretrained folder to upload ({MODEL_DIR})"
    )
    parser.add_argument(
        "--card",
        type=Path,
        default=MODEL_CARD,
        help=f"model card, uploaded as README.md with its model-index (default: {MODEL_CARD}, written by "
        "dvc repro model_card)",
    )
    parser.add_argument("--tag", help="also tag the new commit, e.g. v1 (then: --model OWNER/NAME@v1)")
    parser.add_argument("--message", help="commit message (default: Upload <folder> with its model card)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT, else https://huggingface.co)")
    parser.add_argument(
        "--token",
        help="write token (default: HF_TOKEN, else the `hf auth login` token; prefer those: a flag shows in "
        "ps and the shell history)",
    )


def run_publish(args: argparse.Namespace) -> int:
    from cifar10_pipeline.core.hub import HubModelError, publish_model

    try:
        published = publish_model(
            args.repo_id, args.model, args.card, endpoint=args.endpoint, token=args.token,
            private=args.private, message=args.message, tag=args.tag,
        )  # fmt: skip
    except HubModelError as exc:
        _print_error("publish", exc)
        return EXIT_USAGE
    pinned = f"{args.repo_id}@{args.tag}" if args.tag else published.pinned_id
    files = len(published.files)
    print(f"published {args.model} ({files} files) to {published.url} at commit {published.commit}")
    print(f"use it: cifar10 predict --model {pinned} IMAGE")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------------- pull


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "targets", nargs="*", metavar="TARGET", help="outputs to fetch, e.g. models/cifar10 (default: all)"
    )
    parser.add_argument(
        "-r", "--remote", help="the DVC remote (default: the configured one, dvc remote list)"
    )
    parser.add_argument("--project", type=Path, default=Path("."), help="the checkout (default: .)")


def run_pull(args: argparse.Namespace) -> int:
    from cifar10_pipeline.core.remote import RemoteUnavailable, pull

    try:
        return pull(args.project, args.remote, args.targets)
    except RemoteUnavailable as exc:
        _print_error("pull", exc)
        return EXIT_USAGE


def _print_error(command: str, exc: Exception) -> None:
    """``cifar10 COMMAND: error: ...`` and, when the error carries one, ``cifar10 COMMAND: hint: ...``."""
    print(f"cifar10 {command}: error: {exc}", file=sys.stderr)
    if hint := getattr(exc, "hint", None):
        print(f"cifar10 {command}: hint: {hint}", file=sys.stderr)


COMMANDS: dict[str, Command] = {
    "predict": Command("classify image files, folders or globs", add_predict_arguments, run_predict),
    "serve": Command(
        "run the web API and page (settings: flags or CIFAR10_SERVE_* variables)",
        add_serve_arguments,
        run_serve,
    ),
    "publish": Command(
        "upload the trained model and its card to a Hugging Face Hub repository (HF_ENDPOINT, HF_TOKEN)",
        add_publish_arguments,
        run_publish,
    ),
    "pull": Command(
        "fetch the trained model, data and reports from the DVC remote (dvc pull, the remote checked first)",
        add_pull_arguments,
        run_pull,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar10", description="Use the CIFAR-10 classifier.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        sub = subparsers.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
