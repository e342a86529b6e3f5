"""The project's own error type and the command-line entry that shows it as a message, not a traceback.

A ``PipelineError`` is a problem the user can fix (a bad param, missing or corrupt data, no reachable data
source); its message names the key or file and says how. Every ``python -m cifar10_pipeline.stages.X`` entry
runs its ``main()`` through :func:`run_cli`, which prints such an error as::

    error: <message>
    hint: <how to fix it>          (when the error carries one)

and exits 1. ``--debug`` on the same command line shows the full traceback instead. Any other exception is a
bug in the pipeline, not a user error, and keeps Python's traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn, TextIO

DEBUG_FLAG = "--debug"


class PipelineError(Exception):
    """A problem the user can fix; ``hint`` (optional) says how, in one line."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


class StaleMetricsError(PipelineError):
    """A stage's inputs disagree with each other or predate the code that reads them: a record from an older
    run. Re-running the stages that wrote them fixes it."""

    def __init__(self, message: str, hint: str = "re-run the pipeline: dvc repro") -> None:
        super().__init__(message, hint)


def _program() -> str:
    """``python -m <module>`` for the running entry (how the user started it), else the script's name."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return f"python -m {spec.name}" if spec is not None else (sys.argv[0] or "python")


def report(error: PipelineError, program: str, stream: TextIO) -> None:
    """Print ``error`` as ``error: ...`` (and ``hint: ...``) lines, and where to find its traceback."""
    print(f"error: {error}", file=stream)
    if error.hint:
        print(f"hint: {error.hint}", file=stream)
    print(f"(for the full traceback, run: {program} {DEBUG_FLAG})", file=stream)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help="on an error, show the full Python traceback instead of the message alone",
    )


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Inside the block, a ``PipelineError`` ends the program with its message (exit 1), or with its
    traceback when ``debug``."""
    try:
        yield
    except PipelineError as exc:
        if debug:
            raise
        report(exc, _program(), sys.stderr)
        raise SystemExit(1) from None


def run_cli(
    main: Callable[[], object], argv: Sequence[str] | None = None, description: str | None = None
) -> NoReturn:
    """Run a stage's ``main()`` as a command: exit 0 when it returns (or its int), 1 on a ``PipelineError``
    (printed as a message on stderr), and with the traceback when ``--debug`` is on the command line."""
    parser = argparse.ArgumentParser(prog=_program(), description=description or main.__doc__)
    add_debug_flag(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    with user_errors(args.debug):
        result = main()
    raise SystemExit(result if isinstance(result, int) else 0)
