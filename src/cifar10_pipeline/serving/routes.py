"""The web service's endpoints: the page, /predict, /labels and /health. Each reads what the app holds
(``app.state``: the settings, the traffic counter, and the runtime loaded at startup) through a dependency,
so one router serves any app ``serve.create_app`` builds."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from cifar10_pipeline import NUM_CLASSES
from cifar10_pipeline.serving.guards import (
    TICKET_KEY,
    Traffic,
    Upload,
    UploadProblem,
    decode_all,
    decode_and_trim,
    inspect_all,
)
from cifar10_pipeline.serving.runtime import Runtime
from cifar10_pipeline.serving.schemas import (
    ERROR_RESPONSES,
    PREDICT_PATH,
    Batching,
    HealthResponse,
    Label,
    LabelProbability,
    LabelsResponse,
    Limits,
    Load,
    Prediction,
    PredictResponse,
)
from cifar10_pipeline.serving.settings import ServeSettings

# A request declaring at most this many pixels (64 CIFAR-sized images) is decoded without waiting for a
# decode slot: it costs less than the slot's bookkeeping and one more thread hop.
SMALL_REQUEST_PIXELS = 64 * 32 * 32

router = APIRouter()


def get_runtime(request: Request) -> Runtime:
    runtime = request.app.state.runtime
    if runtime is None:  # started without a model: every model endpoint says how to get one
        raise UploadProblem(503, request.app.state.no_model)
    return runtime


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_traffic(request: Request) -> Traffic:
    return request.app.state.traffic


@functools.cache
def index_html() -> str:
    page = resources.files("cifar10_pipeline.serving").joinpath("static/index.html")
    return page.read_text(encoding="utf-8")


def inspect_and_decode_small(uploads: list[Upload], limits: Limits) -> np.ndarray | None:
    """Check every upload from its header; decode the request at once if it is small (at most
    ``SMALL_REQUEST_PIXELS``: a few milliseconds of work), else return None (it needs a decode slot)."""
    pixels = inspect_all(uploads, limits.max_image_pixels, limits.max_request_pixels)
    return decode_all(uploads, limits.max_image_pixels) if pixels <= SMALL_REQUEST_PIXELS else None


@router.get("/", response_class=HTMLResponse, summary="Drag-and-drop page", tags=["page"])
async def index() -> HTMLResponse:
    return HTMLResponse(index_html())


@router.post(
    PREDICT_PATH,
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    summary="Classify one or more images",
    tags=["model"],
)
async def predict(
    files: Annotated[
        list[UploadFile],
        File(
            description="One or more images (repeat the field), any format Pillow reads, within the "
            "size limits stated above and reported by /health."
        ),
    ],
    request: Request,
    runtime: Annotated[Runtime, Depends(get_runtime)],
    settings: Annotated[ServeSettings, Depends(get_settings)],
    top_k: Annotated[
        int | None,
        Query(
            ge=1,
            le=NUM_CLASSES,
            description="How many classes to list per image in top_k; by default the server's "
            "--default-top-k (CIFAR10_SERVE_DEFAULT_TOP_K).",
        ),
    ] = None,
) -> PredictResponse:
    assert runtime.batcher is not None and runtime.decode_slots is not None  # set at startup
    top_k = settings.default_top_k if top_k is None else top_k
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


@router.get("/labels", response_model=LabelsResponse, summary="The classes, by id", tags=["model"])
async def labels(runtime: Annotated[Runtime, Depends(get_runtime)]) -> LabelsResponse:
    return LabelsResponse(labels=[Label(id=i, name=name) for i, name in enumerate(runtime.labels)])


@router.get(
    "/health", response_model=HealthResponse, summary="Liveness and what is being served", tags=["ops"]
)
async def health(
    runtime: Annotated[Runtime, Depends(get_runtime)],
    settings: Annotated[ServeSettings, Depends(get_settings)],
    traffic: Annotated[Traffic, Depends(get_traffic)],
) -> HealthResponse:
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
