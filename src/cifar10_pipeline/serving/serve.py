"""Web service for the trained classifier: a JSON API, OpenAPI docs and a drag-and-drop page.

Build the app with ``create_app(settings)`` (nothing happens at import time); ``main()`` runs it with uvicorn,
its settings from flags and ``CIFAR10_SERVE_*`` variables (``settings.py``). The model is loaded once, at
startup, from a directory written by ``save_pretrained``, a Hugging Face Hub model id
(``owner/name@revision``, downloaded and verified by core/hub.py) or an MLflow registry URI
(``models:/cifar10-classifier@champion``). Every upload goes through the same ``image_to_array`` ->
``predict_logits`` path as evaluation and the CLI, so served probabilities are the measured ones.

Untrusted input is checked before it costs memory or CPU, and the work it may cost is bounded per image, per
request and across requests (``guards.py``); each problem is answered with a JSON ``ErrorResponse``
(``schemas.py``) that says how to fix it, and the server keeps serving. Decoding runs in worker threads and
the model in its own thread behind a micro-batching queue (``batching.py``), so the event loop, and
``/health``, stay responsive under load.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cifar10_pipeline import IMAGE_SHAPE, NUM_CLASSES, __version__
from cifar10_pipeline.core.hub import parse_hub_id
from cifar10_pipeline.core.paths import NoModelError, saved_model_dir
from cifar10_pipeline.serving.batching import MicroBatcher
from cifar10_pipeline.serving.guards import (
    TICKET_KEY,
    DecodeSlots,
    Traffic,
    Upload,
    UploadGuard,
    UploadProblem,
    check_pixel_limit,
    decode_all,
    decode_and_trim,
    error_response,
    inspect_all,
    validation_detail,
)
from cifar10_pipeline.serving.schemas import (
    ERROR_RESPONSES,
    FILES_FIELD,
    PREDICT_PATH,
    Batching,
    HealthResponse,
    Label,
    LabelProbability,
    LabelsResponse,
    Limits,
    Load,
    ModelInfo,
    Prediction,
    PredictResponse,
    ServerInfo,
    WeightsFile,
)
from cifar10_pipeline.serving.settings import ServeSettings, SettingsInputError, build_parser, parse_settings

logger = logging.getLogger("cifar10_pipeline.serving.serve")

REGISTRY_PREFIX = "models:/"
# A request declaring at most this many pixels (64 CIFAR-sized images) is decoded without waiting for a
# decode slot: it costs less than the slot's bookkeeping and one more thread hop.
SMALL_REQUEST_PIXELS = 64 * 32 * 32
PROG = "python -m cifar10_pipeline.serving.serve"
MODEL_SETTING = "--model / CIFAR10_SERVE_MODEL"  # how a no-model message names the setting


# ---------------------------------------------------------------------------------------------- model state


@dataclass
class Runtime:
    """Everything loaded once at startup and shared by the requests."""

    model: Any  # a transformers PreTrainedModel
    labels: list[str]
    info: ModelInfo
    server: ServerInfo
    limits: Limits
    scratch: Path | None = None  # where a registry model was downloaded; removed at shutdown
    # Set when the app starts: the model's own thread behind a micro-batching queue (one forward pass at a
    # time: torch already spreads one batch over all cores), and the decode slots.
    batcher: MicroBatcher | None = field(default=None, repr=False)
    decode_slots: DecodeSlots | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def server_git_commit(override: str | None = None) -> str:
    """The commit the server's code comes from: the setting, else git asked beside this file."""
    if override:
        return override
    from cifar10_pipeline.core.provenance import head_commit

    # Beside this file, not the working directory: the server may be started from anywhere.
    return head_commit(Path(__file__).resolve().parent)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def download_registry_model(uri: str, scratch: Path) -> tuple[Path, str | None]:
    """Fetch a registered model's files and return (the saved transformers model directory, its version).

    The registry stores the save_pretrained directory as an artifact of a pyfunc model (see
    tracking/model_registry.py); serving loads that directory directly, so it runs exactly the code
    evaluation ran.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    from cifar10_pipeline.tracking.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    reference = uri[len(REGISTRY_PREFIX) :]
    version: str | None = None
    client = MlflowClient()
    if "@" in reference:
        name, alias = reference.split("@", 1)
        version = str(client.get_model_version_by_alias(name, alias).version)
    elif "/" in reference:
        version = reference.rsplit("/", 1)[1]
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(scratch)))
    candidates = sorted({p.parent for p in local.rglob("config.json") if any(p.parent.glob("*.safetensors"))})
    if len(candidates) != 1:
        raise RuntimeError(
            f"{uri}: expected one saved model directory (config.json + *.safetensors) in the registered "
            f"artifacts, found {len(candidates)}; register models with "
            "cifar10_pipeline.tracking.model_registry."
        )
    return candidates[0], version


def load_runtime(settings: ServeSettings) -> Runtime:
    """Load the model named by the settings and describe it for /health."""
    from cifar10_pipeline.modeling.inference import predict_logits
    from cifar10_pipeline.modeling.model import load_model

    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    scratch: Path | None = None
    version: str | None = None
    if settings.model.startswith(REGISTRY_PREFIX):
        scratch = Path(tempfile.mkdtemp(prefix="cifar10-serve-"))
        try:
            model_dir, version = download_registry_model(settings.model, scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        name = settings.model[len(REGISTRY_PREFIX) :].split("@")[0].split("/")[0]
    else:
        model_dir = saved_model_dir(settings.model, MODEL_SETTING)
        hub_id = parse_hub_id(settings.model)
        # A Hub model is named by its repository and the commit it was downloaded at (the snapshot's folder).
        name = f"{hub_id[0]}@{model_dir.name}" if hub_id else model_dir.resolve().name
    model = load_model(model_dir)
    config = model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    info = ModelInfo(
        name=name,
        source=settings.model,
        registry_version=version,
        architecture=(config.architectures or [type(model).__name__])[0],
        model_type=config.model_type,
        num_labels=config.num_labels,
        image_size=config.image_size,
        tta_level=config.tta_level,
        parameters=sum(p.numel() for p in model.parameters()),
        weights=[
            WeightsFile(file=p.name, sha256=_sha256(p), bytes=p.stat().st_size)
            for p in sorted(model_dir.glob("*.safetensors"))
        ],
    )
    server = ServerInfo(package_version=__version__, git_commit=server_git_commit(settings.git_commit))
    limits = Limits(
        max_upload_bytes=settings.max_upload_bytes,
        max_files=settings.max_files,
        max_image_pixels=settings.max_image_pixels,
        max_request_pixels=settings.max_request_pixels,
        max_concurrent_decodes=settings.max_concurrent_decodes,
        decode_wait_s=settings.decode_wait_s,
        max_pending_requests=settings.max_pending_requests,
    )
    # One forward pass now, so the first user does not wait for torch's one-off kernel setup.
    predict_logits(model, np.zeros((1, *IMAGE_SHAPE), dtype=np.uint8))
    logger.info("serving %s (%s) from %s", info.name, info.architecture, settings.model)
    return Runtime(model=model, labels=labels, info=info, server=server, limits=limits, scratch=scratch)


# ------------------------------------------------------------------------------------------------------ app


def get_runtime(request: Request) -> Runtime:
    runtime = request.app.state.runtime
    if runtime is None:  # started without a model: every model endpoint says how to get one
        raise UploadProblem(503, request.app.state.no_model)
    return runtime


def probabilities_of(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 (N, 32, 32, 3) -> calibrated probabilities (N, C), by the evaluation path."""
    from cifar10_pipeline.modeling.inference import predict_logits

    def infer(images: np.ndarray) -> np.ndarray:
        return predict_logits(model, images, batch_size=max(1, len(images))).softmax(1).numpy()

    return infer


def inspect_and_decode_small(uploads: list[Upload], limits: Limits) -> np.ndarray | None:
    """Check every upload from its header; decode the request at once if it is small (at most
    ``SMALL_REQUEST_PIXELS``: a few milliseconds of work), else return None (it needs a decode slot)."""
    pixels = inspect_all(uploads, limits.max_image_pixels, limits.max_request_pixels)
    return decode_all(uploads, limits.max_image_pixels) if pixels <= SMALL_REQUEST_PIXELS else None


def size_limits(settings: ServeSettings) -> str:
    """The size limits in words, for the API page (from the settings, so the page states what is enforced)."""
    return (
        f"Each image may declare up to {settings.max_image_pixels / 1e6:g} megapixels "
        f"({settings.max_image_pixels} pixels); JPEGs are decoded at reduced scale (1/8 for a photo), other "
        f"formats at full size, and the decodes of one request may produce at most "
        f"{settings.max_request_pixels} pixels together, in a body of at most {settings.max_upload_bytes} "
        f"bytes and {settings.max_files} files."
    )


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the web app; the model is loaded when the app starts (lifespan), not here.

    Raises SettingsInputError for settings that cannot work together (naming the flag and variable).
    """
    settings = settings or ServeSettings()
    check_pixel_limit(settings.max_image_pixels)
    index_html = (
        resources.files("cifar10_pipeline.serving").joinpath("static/index.html").read_text(encoding="utf-8")
    )
    traffic = Traffic(settings.max_pending_requests)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
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
            traffic,
            max_batch=settings.batch_max_size,
            max_wait_s=settings.batch_max_wait_ms / 1000,
            enabled=settings.batching,
        )
        app.state.runtime = runtime
        try:
            yield
        finally:
            runtime.close()

    app = FastAPI(
        title="CIFAR-10 classifier",
        version=__version__,
        summary="Classify images into the 10 CIFAR-10 classes.",
        description=f"Upload images to `POST {PREDICT_PATH}` as multipart/form-data under the field "
        f"`{FILES_FIELD}`, in any format Pillow reads. They are scaled to 32x32 exactly as in training. "
        f"{size_limits(settings)}",
        lifespan=lifespan,
    )
    app.add_middleware(UploadGuard, max_bytes=settings.max_upload_bytes, traffic=traffic)

    @app.exception_handler(UploadProblem)
    async def _upload_problem(request: Request, exc: UploadProblem) -> JSONResponse:
        return error_response(exc.status_code, exc.detail, exc.errors, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and detail.startswith("Too many files"):
            # Starlette's multipart parser stops at max_files; say which limit and what to do.
            return error_response(
                413,
                f"too many files in one request: at most {settings.max_files}; split the images over several "
                "requests (or raise CIFAR10_SERVE_MAX_FILES)",
            )
        response = error_response(exc.status_code, detail)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, items = validation_detail(exc)
        return error_response(422, detail, items)

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: JSON like every other answer; uvicorn still logs the traceback.
        return error_response(500, "internal server error; the server log has the traceback")

    @app.get("/", response_class=HTMLResponse, summary="Drag-and-drop page", tags=["page"])
    async def index() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.post(
        PREDICT_PATH,
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        form_limits={"max_files": settings.max_files},
        summary="Classify one or more images",
        tags=["model"],
    )
    async def predict(
        files: Annotated[
            list[UploadFile],
            # Literal text only: the annotation is evaluated later, where the settings are not in scope.
            File(
                description="One or more images (repeat the field), any format Pillow reads, within the "
                "size limits stated above and reported by /health."
            ),
        ],
        request: Request,
        runtime: Annotated[Runtime, Depends(get_runtime)],
        top_k: Annotated[
            int, Query(ge=1, le=NUM_CLASSES, description="How many classes to list per image in top_k.")
        ] = settings.default_top_k,
    ) -> PredictResponse:
        assert runtime.batcher is not None and runtime.decode_slots is not None  # set at startup
        limits = runtime.limits
        uploads = [(upload.filename, upload.content_type, await upload.read()) for upload in files]
        # Everything CPU-bound runs off the event loop, so /health and other requests keep flowing: first
        # the header checks (cheap, no decoding) and, for a request as small as CIFAR images, the decode in
        # the same worker thread; a larger request then decodes in a bounded slot; then the model's thread.
        images = await run_in_threadpool(inspect_and_decode_small, uploads, limits)
        if images is None:
            async with runtime.decode_slots.slot():
                images = await run_in_threadpool(decode_and_trim, uploads, limits.max_image_pixels)
        probabilities = await runtime.batcher.predict(images, request.scope.get("state", {}).get(TICKET_KEY))
        predictions = []
        for (filename, _, _), row in zip(uploads, probabilities, strict=True):
            order = np.argsort(-row, kind="stable")
            predictions.append(
                Prediction(
                    filename=filename,
                    label=runtime.labels[order[0]],
                    probability=float(row[order[0]]),
                    top_k=[
                        LabelProbability(label=runtime.labels[i], probability=float(row[i]))
                        for i in order[:top_k]
                    ],
                    probabilities={label: float(p) for label, p in zip(runtime.labels, row, strict=True)},
                )
            )
        return PredictResponse(model=runtime.info.name, predictions=predictions)

    @app.get("/labels", response_model=LabelsResponse, summary="The classes, by id", tags=["model"])
    async def labels(runtime: Annotated[Runtime, Depends(get_runtime)]) -> LabelsResponse:
        return LabelsResponse(labels=[Label(id=i, name=name) for i, name in enumerate(runtime.labels)])

    @app.get(
        "/health", response_model=HealthResponse, summary="Liveness and what is being served", tags=["ops"]
    )
    async def health(runtime: Annotated[Runtime, Depends(get_runtime)]) -> HealthResponse:
        assert runtime.batcher is not None and runtime.decode_slots is not None  # set at startup
        stats, slots = runtime.batcher.stats, runtime.decode_slots
        return HealthResponse(
            status="ok",
            model=runtime.info,
            server=runtime.server,
            limits=runtime.limits,
            batching=Batching(
                enabled=settings.batching,
                max_batch_size=settings.batch_max_size,
                max_wait_ms=settings.batch_max_wait_ms,
            ),
            load=Load(
                requests_in_flight=traffic.in_flight,
                requests_refused_busy=traffic.refused + slots.refused,
                decodes_running=slots.busy,
                decodes_waiting=slots.waiting,
                batches=stats.batches,
                batched_requests=stats.requests,
                batched_images=stats.images,
                largest_batch=stats.largest_batch,
                max_hold_ms=round(1000 * stats.max_hold_s, 3),
            ),
        )

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
