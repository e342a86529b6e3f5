"""Web service for the trained classifier: a JSON API, OpenAPI docs and a drag-and-drop page.

Build the app with ``create_app(settings)`` (nothing happens at import time); ``main()`` runs it with uvicorn,
its settings from flags and ``CIFAR10_SERVE_*`` variables (``settings.py``). The model is loaded once, at
startup, from a directory written by ``save_pretrained``, a Hugging Face Hub model id
(``owner/name@revision``, downloaded and verified by core/hub.py) or an MLflow registry URI
(``models:/cifar10-classifier@champion``). Every upload goes through the same ``image_to_array`` ->
``predict_logits`` path as evaluation and the CLI, so served probabilities are the measured ones.

The endpoints are in ``routes.py``, what is loaded at startup in ``runtime.py``. Untrusted input is checked
before it costs memory or CPU, and the work it may cost is bounded per image, per request and across requests
(``guards.py``); each problem is answered with a JSON ``ErrorResponse`` (``schemas.py``, ``handlers.py``)
that says how to fix it, and the server keeps serving. Decoding runs in worker threads and
the model in its own thread behind a micro-batching queue (``batching.py``), so the event loop, and
``/health``, stay responsive under load.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from cifar10_pipeline import __version__
from cifar10_pipeline.core.paths import NoModelError, saved_model_dir
from cifar10_pipeline.serving.batching import MicroBatcher
from cifar10_pipeline.serving.guards import DecodeSlots, Traffic, UploadGuard, check_pixel_limit
from cifar10_pipeline.serving.handlers import add_exception_handlers
from cifar10_pipeline.serving.routes import index_html, router
from cifar10_pipeline.serving.runtime import MODEL_SETTING, REGISTRY_PREFIX, load_runtime, logger
from cifar10_pipeline.serving.schemas import FILES_FIELD, PREDICT_PATH
from cifar10_pipeline.serving.settings import ServeSettings, SettingsInputError, build_parser, parse_settings

PROG = "python -m cifar10_pipeline.serving.serve"


def probabilities_of(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (N, 32, 32, 3) -> calibrated probabilities (N, C), by the evaluation path."""
    from cifar10_pipeline.modeling.inference import predict_logits

    def infer(images: np.ndarray) -> np.ndarray:
        return predict_logits(model, images, batch_size=max(1, len(images))).softmax(1).numpy()

    return infer


def size_limits(settings: ServeSettings) -> str:
    """The size limits in words, for the API page (from the settings, so the page states what is enforced)."""
    return (
        f"Each image may declare up to {settings.max_image_pixels / 1e6:g} megapixels "
        f"({settings.max_image_pixels} pixels); JPEGs are decoded at reduced scale (1/8 for a photo), other "
        f"formats at full size, and the decodes of one request may produce at most "
        f"{settings.max_request_pixels} pixels together, in a body of at most {settings.max_upload_bytes} "
        f"bytes and {settings.max_files} files."
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model when the app starts, with its batching queue and decode slots; close them at the end."""
    settings: ServeSettings = app.state.settings
    try:
        runtime = await run_in_threadpool(load_runtime, settings)
    except NoModelError as exc:
        # An app built without a model (``run`` refuses to start one) stays up to say, on its page and
        # in every model endpoint's 503, how to get a model.
        logger.error("%s", exc)
        app.state.runtime, app.state.no_model = None, str(exc)
        yield
        return
    runtime.decode_slots = DecodeSlots(settings.max_concurrent_decodes, settings.decode_wait_s)
    runtime.batcher = MicroBatcher(
        probabilities_of(runtime.model),
        app.state.traffic,
        max_batch=settings.batch_max_size,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        enabled=settings.batching,
    )
    app.state.runtime = runtime
    try:
        yield
    finally:
        runtime.close()


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the web app; the model is loaded when the app starts (lifespan), not here.

    Raises SettingsInputError for settings that cannot work together (naming the flag and variable).
    """
    settings = settings or ServeSettings()
    check_pixel_limit(settings.max_image_pixels)
    index_html()  # read now: a package without its page fails here, not on the first visit
    app = FastAPI(
        title="CIFAR-10 classifier",
        version=__version__,
        summary="Classify images into the 10 CIFAR-10 classes.",
        description=f"Upload images to `POST {PREDICT_PATH}` as multipart/form-data under the field "
        f"`{FILES_FIELD}`, in any format Pillow reads. They are scaled to 32x32 exactly as in training. "
        f"{size_limits(settings)}",
        lifespan=lifespan,
    )
    # What the routes and the lifespan read through their dependencies (routes.py).
    app.state.settings = settings
    app.state.traffic = Traffic(settings.max_pending_requests)
    app.add_middleware(UploadGuard, max_bytes=settings.max_upload_bytes, traffic=app.state.traffic)
    add_exception_handlers(app)
    app.include_router(router, form_limits={"max_files": settings.max_files})
    return app


# ---------------------------------------------------------------------------------------------- entry point


def run(settings: ServeSettings) -> None:
    """Serve with uvicorn; raises SettingsInputError, before serving, for settings that cannot work, and
    NoModelError when the model folder holds no model (checked before torch is even imported)."""
    import uvicorn

    app = create_app(settings)
    if not settings.model.startswith(REGISTRY_PREFIX):
        saved_model_dir(settings.model, MODEL_SETTING)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)


def main(argv: Sequence[str] | None = None) -> None:
    settings = parse_settings(argv, prog=PROG)
    try:
        run(settings)
    except SettingsInputError as exc:
        build_parser(PROG).error(str(exc))
    except NoModelError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)  # one line: the usage would bury it
        if hint := getattr(exc, "hint", None):
            print(f"{PROG}: hint: {hint}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
