"""Checks on untrusted uploads, made before they cost memory or CPU.

In order: the request body's size (413) and content type (415), in ``UploadGuard`` before the body is parsed;
then, per file, its declared content type (415), emptiness (400), the pixel count read from its header
before decoding (413, a decompression-bomb guard) and whether it decodes (400). Every refusal is an
``ErrorResponse`` that says how to fix it.
"""

from __future__ import annotations

import io

import numpy as np
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifar10_pipeline.serving.schemas import CURL_HINT, FILES_FIELD, PREDICT_PATH, ErrorItem, ErrorResponse

# Content types a client may send for an image part; anything else is refused before decoding.
# application/octet-stream and a missing type are what clients send when they do not know.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream"}


def image_pixel_limit(configured: int | None) -> int:
    """The server's pixel limit: the setting, else the limit every decode in the package obeys."""
    if configured is not None:
        return configured
    # Imported here: it loads torch, which the settings and `--help` should not wait for.
    from cifar10_pipeline.modeling.inference import MAX_IMAGE_PIXELS

    return MAX_IMAGE_PIXELS


class UploadProblem(Exception):
    """A request the server refuses, with the status and a message that says how to fix it."""

    def __init__(self, status_code: int, detail: str, errors: list[ErrorItem] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors or []


class BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI re-raises it from form parsing instead of turning it into a 400.
    def __init__(self, limit: int):
        super().__init__(
            status_code=413,
            detail=f"request body is larger than the server's limit of {limit} bytes; send fewer or smaller "
            f"images per request (or raise CIFAR10_SERVE_MAX_UPLOAD_BYTES)",
        )


def error_response(status_code: int, detail: str, errors: list[ErrorItem] | None = None) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(detail=detail, errors=errors or []).model_dump(), status_code=status_code
    )


class UploadGuard:
    """Refuse uploads to /predict by content type and body size before the body is parsed or buffered."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PREDICT_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
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


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Bytes of one upload -> (32, 32, 3) uint8 via the shared ``image_to_array``, after the size checks."""
    from PIL import Image, UnidentifiedImageError

    from cifar10_pipeline.modeling.inference import ImageInputError, image_to_array

    if not data:
        raise UploadProblem(400, "the file is empty (0 bytes); choose an image file")
    # Read only the header first: a small file can declare billions of pixels (a decompression bomb).
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:
        raise UploadProblem(413, f"image is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UploadProblem(
            400,
            f"not an image the server can read ({type(exc).__name__}); "
            "upload PNG, JPEG, WebP, BMP, GIF or TIFF",
        ) from None
    if width * height > max_pixels:
        raise UploadProblem(
            413,
            f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}; "
            "downscale it first (the model sees 32x32 anyway)",
        )
    try:
        return image_to_array(data)
    except ImageInputError as exc:
        message = str(exc).removeprefix("image bytes: ")
        raise UploadProblem(400, f"{message}; the file looks corrupt or truncated, upload it again") from None


def decode_all(uploads: list[tuple[str | None, str | None, bytes]], max_pixels: int) -> np.ndarray:
    """Decode every upload, or raise one UploadProblem listing every bad file (to fix them all at once)."""
    arrays: list[np.ndarray] = []
    problems: list[tuple[int, ErrorItem]] = []
    for index, (filename, content_type, data) in enumerate(uploads):
        where = describe(index, filename)
        if (reason := check_content_type(content_type)) is not None:
            problems.append((415, ErrorItem(location=where, message=reason)))
            continue
        try:
            arrays.append(decode_upload(data, max_pixels))
        except UploadProblem as problem:
            problems.append((problem.status_code, ErrorItem(location=where, message=problem.detail)))
    if problems:
        first_status, first = problems[0]
        detail = f"{first.location}: {first.message}"
        if len(problems) > 1:
            summary = f"{len(problems)} of {len(uploads)} files could not be classified (see errors)"
            detail = f"{summary}; first: {detail}"
        raise UploadProblem(first_status, detail, [item for _, item in problems])
    return np.stack(arrays)


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
