"""The server's settings: one pydantic-settings model, read from ``CIFAR10_SERVE_*`` environment variables
and, on the command line, from flags that pydantic-settings builds from the same model (a flag beats its
variable). A new field is a new variable and a new flag, with its help text, without touching a parser.

This module imports nothing heavy, so ``cifar10 --help`` and ``--help`` of the server stay instant.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Literal

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

from cifar10_pipeline import NUM_CLASSES
from cifar10_pipeline.core.paths import MODEL_DIR

ENV_PREFIX = "CIFAR10_SERVE_"
DESCRIPTION = (
    "Serve the CIFAR-10 classifier over HTTP. Every setting is a flag and a CIFAR10_SERVE_* environment "
    "variable (shown with each flag); a flag given on the command line wins over its variable."
)


class ServeSettings(BaseSettings):
    """Server settings, from flags, CIFAR10_SERVE_* environment variables, or given explicitly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        cli_kebab_case=True,  # --log-level, matching the variables' spelling
        cli_hide_none_type=True,
        cli_show_env_vars=True,
    )

    model: str = Field(
        default=str(MODEL_DIR),
        description="A model directory written by save_pretrained, a Hugging Face Hub model id "
        "(owner/name, or pinned: owner/name@COMMIT_OR_TAG; endpoint and token from HF_ENDPOINT, HF_TOKEN), "
        "or an MLflow registry URI (models:/NAME@ALIAS or models:/NAME/VERSION).",
    )
    host: str = Field(default="127.0.0.1", description="Interface to listen on; 0.0.0.0 for all.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="uvicorn's log level (warning turns the access log off)."
    )
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="Largest request body (413 above)."
    )
    max_files: int = Field(default=64, gt=0, description="Most images in one request (413 above).")
    max_image_pixels: int = Field(
        default=100_000_000,
        gt=0,
        description="Largest width x height one image may declare, read from its header before decoding "
        "(413 above; the decompression-bomb guard, reported by /health). The default (100 megapixels) takes "
        "any photo a phone or most cameras take; a JPEG is decoded at reduced scale (1/8 for a photo: a "
        "12-megapixel one costs a 500x375 decode), other formats at full size, within max_request_pixels. "
        "At most the package's decode ceiling (core.images.MAX_IMAGE_PIXELS).",
    )
    max_request_pixels: int = Field(
        default=4 * 2048 * 2048,
        gt=0,
        description="Most pixels the decodes of all images of one request may produce together (413 "
        "above), checked from the headers before any is decoded: a JPEG counts at the reduced scale it is "
        "decoded at, other formats at full size, so this bounds a request's decode time and memory.",
    )
    max_concurrent_decodes: int = Field(
        default=2, gt=0, description="Requests decoding images at once (others wait for a slot)."
    )
    decode_wait_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest a request waits for a decode slot before it is answered 503 with Retry-After.",
    )
    max_pending_requests: int = Field(
        default=64,
        gt=0,
        description="Most /predict requests in flight; above it a request is answered 503 with Retry-After "
        "before its body is read (this bounds the memory held by request bodies).",
    )
    batching: bool = Field(
        default=True,
        description="Classify concurrent requests together, in one forward pass (micro-batching); false: "
        "one request per forward pass.",
    )
    batch_max_size: int = Field(
        default=32,
        gt=0,
        description="Most images merged into one forward pass (a larger request runs alone).",
    )
    batch_max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        description="Longest a forward pass is held back for more requests to join it, in milliseconds; "
        "only while other requests are on their way, so a lone request never waits.",
    )
    torch_threads: int | None = Field(
        default=None,
        gt=0,
        description="Threads torch uses for a forward pass; by default torch's own choice (one per core).",
    )
    default_top_k: int = Field(
        default=3, ge=1, le=NUM_CLASSES, description="Classes listed per image when a request gives no top_k."
    )
    git_commit: str | None = Field(
        default=None, description="Commit reported by /health; by default asked of git beside the package."
    )


class SettingsInputError(ValueError):
    """A flag or environment variable with a value the settings refuse; the message names which."""


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_var_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ServeSettings field to ``parser`` (also a subcommand's parser)."""
    CliSettingsSource(ServeSettings, root_parser=parser)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """Settings from flags parsed by a parser set up with ``add_settings_arguments``, then the environment.

    Raises SettingsInputError naming the flag or variable of each refused value.
    """
    source = CliSettingsSource(ServeSettings)(parsed_args=args)
    from_flags = set(source())
    try:
        return ServeSettings(_cli_settings_source=source)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            if field in from_flags:
                where = flag_name(field)
            elif field in ServeSettings.model_fields:
                where = env_var_name(field)
            else:
                where = "settings"
            value = f" {error['input']!r}" if field else ""  # what the user typed, to spot the typo
            problems.append(f"{where}{value}: {error['msg']}")
        raise SettingsInputError("; ".join(problems) + " (--help lists every setting)") from None


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_settings_arguments(parser)
    return parser


def parse_settings(argv: Sequence[str] | None, prog: str) -> ServeSettings:
    """Settings from ``argv`` (None: sys.argv[1:]) and the environment; exits 2 with a message if invalid."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        return settings_from_args(args)
    except SettingsInputError as exc:
        parser.error(str(exc))
