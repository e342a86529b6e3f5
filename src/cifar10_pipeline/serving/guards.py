"""Checks on untrusted uploads, made before they cost memory or CPU, and the bounds on concurrent work.

In order: the number of /predict requests in flight (503 above ``max_pending_requests``), the request
body's size (413) and content type (415), in ``UploadGuard`` before the body is parsed; then, per file, from
its header alone (``inspect_all``): its declared content type (415), emptiness or an unreadable header (400),
its declared pixel count (413, the decompression-bomb guard: the one per-image limit,
``ServeSettings.max_image_pixels``, which ``/health`` reports), then the pixels the decodes of all files
produce together (413, ``max_request_pixels``: a JPEG counts at the reduced scale it is decoded at, other
formats at full size). Only then is a request decoded, at most ``max_concurrent_decodes`` at a time
(``DecodeSlots``; 503 with Retry-After after ``decode_wait_s``), in a worker thread, off the event loop.
Every refusal is an ``ErrorResponse`` that says how to fix it, and uses the words the CLI uses for the same
file (both decode with ``core/images.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifar10_pipeline.core.images import (
    MAX_IMAGE_PIXELS,
    ImageInputError,
    ImageTooLargeError,
    image_to_array,
    inspect_image,
)
from cifar10_pipeline.serving.schemas import CURL_HINT, FILES_FIELD, PREDICT_PATH, ErrorItem, ErrorResponse
from cifar10_pipeline.serving.settings import SettingsInputError

# Content types a client may send for an image part; anything else is refused before decoding.
# application/octet-stream and a missing type are what clients send when they do not know.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream"}
# Seconds a client is told to wait (Retry-After) when the server refuses work because it is busy.
RETRY_AFTER_S = 2
TICKET_KEY = "cifar10_ticket"  # where UploadGuard leaves a request's Ticket in the ASGI scope's state

Upload = tuple[str | None, str | None, bytes]  # (filename, content type, bytes) of one uploaded file


def check_pixel_limit(max_image_pixels: int) -> None:
    """The service's pixel limit may not exceed the ceiling every decode in the package obeys (Pillow's own
    guard fires above it, and would then be the limit that counts)."""
    if max_image_pixels > MAX_IMAGE_PIXELS:
        raise SettingsInputError(
            f"--max-image-pixels / CIFAR10_SERVE_MAX_IMAGE_PIXELS {max_image_pixels} is above the package's "
            f"decode ceiling of {MAX_IMAGE_PIXELS} pixels (MAX_IMAGE_PIXELS in core/images.py); set "
            "it at or below that"
        )


class UploadProblem(Exception):
    """A request the server refuses, with the status and a message that says how to fix it."""

    def __init__(
        self,
        status_code: int,
        detail: str,
        errors: list[ErrorItem] | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors or []
        self.headers = headers or {}


# ------------------------------------------------------------------------------------ requests in flight


class Traffic:
    """The /predict requests in flight, from admission by ``UploadGuard`` until answered (at most
    ``max_in_flight``). ``on_the_way`` counts those not yet handed to the model's queue: the micro-batcher
    waits (a bounded time) only while some are, so a lone request never waits. ``changed`` is notified on
    every change; the batcher's queue shares its lock."""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.on_the_way = 0
        self.refused = 0  # requests answered 503 because max_in_flight were in flight
        self.changed = threading.Condition()

    def admit(self) -> Ticket | None:
        with self.changed:
            if self.in_flight >= self.max_in_flight:
                self.refused += 1
                return None
            self.in_flight += 1
            self.on_the_way += 1
            self.changed.notify_all()
        return Ticket(self)


class Ticket:
    """One admitted request's place in ``Traffic``."""

    def __init__(self, traffic: Traffic):
        self.traffic = traffic
        self.queued = False  # handed to the model's queue
        self.left = False

    def mark_queued(self) -> None:
        """Call holding ``traffic.changed`` (the batcher does, as it queues the request's images)."""
        if not self.queued and not self.left:
            self.queued = True
            self.traffic.on_the_way -= 1
            self.traffic.changed.notify_all()

    def leave(self) -> None:
        with self.traffic.changed:
            if self.left:
                return
            self.left = True
            if not self.queued:
                self.traffic.on_the_way -= 1
            self.traffic.in_flight -= 1
            self.traffic.changed.notify_all()


class BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI re-raises it from form parsing instead of turning it into a 400.
    def __init__(self, limit: int):
        super().__init__(
            status_code=413,
            detail=f"request body is larger than the server's limit of {limit} bytes; send fewer or smaller "
            f"images per request (or raise CIFAR10_SERVE_MAX_UPLOAD_BYTES)",
        )


def error_response(
    status_code: int,
    detail: str,
    errors: list[ErrorItem] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(detail=detail, errors=errors or []).model_dump(),
        status_code=status_code,
        headers=headers,
    )


class UploadGuard:
    """Refuse uploads to /predict when too many are in flight (503), and by content type and body size,
    before the body is parsed or buffered; admitted requests hold a ``Ticket`` in ``traffic`` until answered.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, traffic: Traffic):
        self.app = app
        self.max_bytes = max_bytes
        self.traffic = traffic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        ticket = self.traffic.admit()
        if ticket is None:
            # Refused before the body is read: waiting requests hold their bodies in memory.
            response = error_response(
                503,
                f"the server is busy: {self.traffic.max_in_flight} requests are already being classified; "
                f"retry in a few seconds (or raise CIFAR10_SERVE_MAX_PENDING_REQUESTS)",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[TICKET_KEY] = ticket
        try:
            await self._guarded(scope, receive, send)
        finally:
            ticket.leave()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        content_type = headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "multipart/form-data":
            response = error_response(
                415,
                f"POST {PREDICT_PATH} takes multipart/form-data with the images under the field "
                f"'{FILES_FIELD}' (got content type {content_type or 'none'!r}); {CURL_HINT}",
            )
            await response(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # Answer without reading the body: the declared size is enough to refuse it.
            exc = BodyTooLarge(self.max_bytes)
            await error_response(exc.status_code, exc.detail)(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a missing or false Content-Length
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await error_response(exc.status_code, exc.detail)(scope, receive, send)


def describe(index: int, filename: str | None) -> str:
    return f"{FILES_FIELD}[{index}] ({filename or 'unnamed'})"


def check_content_type(content_type: str | None) -> str | None:
    """None if an upload's declared content type may be an image, else why it is refused."""
    main = (content_type or "").split(";")[0].strip().lower()
    if main in GENERIC_CONTENT_TYPES or main.startswith("image/"):
        return None
    return f"content type {main!r} is not an image type; upload PNG, JPEG, WebP, BMP, GIF or TIFF files"


def _problem(exc: Exception) -> UploadProblem:
    """The shared decoder's error for one upload -> its status and the words the CLI uses for it too."""
    message = str(exc).removeprefix("image bytes: ")
    return UploadProblem(413 if isinstance(exc, ImageTooLargeError) else 400, message)


def _raise_all(problems: list[tuple[int, ErrorItem]], total: int) -> None:
    """One UploadProblem listing every bad file (to fix them all at once); the status is the first's."""
    if not problems:
        return
    first_status, first = problems[0]
    detail = f"{first.location}: {first.message}"
    if len(problems) > 1:
        detail = f"{len(problems)} of {total} files could not be classified (see errors); first: {detail}"
    raise UploadProblem(first_status, detail, [item for _, item in problems])


def inspect_all(uploads: list[Upload], max_pixels: int, max_request_pixels: int) -> int:
    """Check every upload from its header alone (cheap: nothing is decoded) and return the pixels their
    decodes will produce together.

    Refuses, listing every bad file: a content type that is not an image (415), an empty or unreadable
    file (400), an image declaring more than ``max_pixels`` (413); then the request as a whole when its
    decodes would produce more than ``max_request_pixels`` together (413), before any of them is decoded.
    """
    total = 0
    problems: list[tuple[int, ErrorItem]] = []
    for index, (filename, content_type, data) in enumerate(uploads):
        where = describe(index, filename)
        if (reason := check_content_type(content_type)) is not None:
            problems.append((415, ErrorItem(location=where, message=reason)))
            continue
        try:
            header = inspect_image(data, max_pixels)
        except ImageInputError as exc:
            problem = _problem(exc)
            problems.append((problem.status_code, ErrorItem(location=where, message=problem.detail)))
            continue
        total += header.decode_pixels
    _raise_all(problems, len(uploads))
    if total > max_request_pixels:
        raise UploadProblem(
            413,
            f"the {len(uploads)} images of this request would decode to {total} pixels together, above "
            f"the per-request limit of {max_request_pixels} (JPEGs count at the reduced scale they are "
            "decoded at, other formats at full size); send fewer or smaller images per request, or JPEGs "
            "(the model sees 32x32 anyway)",
        )
    return total


def decode_all(uploads: list[Upload], max_pixels: int) -> np.ndarray:
    """Decode every upload with the shared ``image_to_array``, or raise one UploadProblem listing every file
    that fails (a corrupt pixel stream is found only here; ``inspect_all`` has checked the rest)."""
    arrays: list[np.ndarray] = []
    problems: list[tuple[int, ErrorItem]] = []
    for index, (filename, _, data) in enumerate(uploads):
        try:
            arrays.append(image_to_array(data, max_pixels))
        except ImageInputError as exc:
            problem = _problem(exc)
            problems.append(
                (problem.status_code, ErrorItem(location=describe(index, filename), message=problem.detail))
            )
    _raise_all(problems, len(uploads))
    return np.stack(arrays)


def decode_and_trim(uploads: list[Upload], max_pixels: int) -> np.ndarray:
    """``decode_all`` for a request too large to decode at once (it holds a decode slot), then the memory
    its decode freed goes back to the system."""
    try:
        return decode_all(uploads, max_pixels)
    finally:
        return_freed_memory()


def return_freed_memory() -> None:
    """Hand the heap memory a large decode freed back to the system (glibc's ``malloc_trim``; nothing
    elsewhere). Decodes run in worker threads, each with its own malloc arena, whose freed pages glibc keeps
    mapped: without this the server's RSS creeps up by the size of the largest decodes per thread."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc() -> Any:
    import ctypes

    process = ctypes.CDLL(None)  # the symbols already loaded, the C library's among them
    return process if hasattr(process, "malloc_trim") else None


class DecodeSlots:
    """At most ``count`` requests decode at once; a request waits at most ``wait_s`` for a slot, then is
    answered 503 with Retry-After. Decoding costs CPU and memory in proportion to the pixels, so this bounds
    both across concurrent requests (each request is bounded by the pixel limits)."""

    def __init__(self, count: int, wait_s: float):
        self.count = count
        self.wait_s = wait_s
        self._semaphore = asyncio.Semaphore(count)
        self.waiting = 0  # requests waiting for a slot now
        self.busy = 0  # slots in use now
        self.refused = 0  # requests answered 503 after waiting wait_s

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.waiting += 1
        try:
            async with asyncio.timeout(self.wait_s):
                await self._semaphore.acquire()
        except TimeoutError:
            self.refused += 1
            raise UploadProblem(
                503,
                f"the server is busy: no image decoder freed up within {self.wait_s:g} s "
                f"({self.count} decode at a time); retry in a few seconds",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        finally:
            self.waiting -= 1
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            self._semaphore.release()


def validation_detail(exc: RequestValidationError) -> tuple[str, list[ErrorItem]]:
    """FastAPI's request validation errors as a sentence that says how to send the request."""
    items = [
        ErrorItem(location=".".join(str(part) for part in error["loc"]), message=error["msg"])
        for error in exc.errors()
    ]
    if any(tuple(error["loc"][:2]) == ("body", FILES_FIELD) for error in exc.errors()):
        detail = (
            f"send the images as files in the multipart form field '{FILES_FIELD}' "
            f"(repeat the field for several images); {CURL_HINT}"
        )
    else:
        detail = "invalid request: " + "; ".join(f"{item.location}: {item.message}" for item in items)
    return detail, items
