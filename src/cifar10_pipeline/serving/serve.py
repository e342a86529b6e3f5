"""Web service for the trained classifier: a JSON API, OpenAPI docs and a drag-and-drop page.

Build the app with ``create_app(settings)`` (nothing happens at import time); ``main()`` runs it with uvicorn.
The model is loaded once, at startup, from a directory written by ``save_pretrained`` or from an MLflow
registry URI (``models:/cifar10-classifier@champion``). Every upload goes through the same
``image_to_array`` -> ``predict_logits`` path as evaluation and the CLI, so served probabilities are the
measured ones.

Untrusted input is checked before it costs memory or CPU: the request body size (413), the content type
(415), the number of files (413), the image's pixel count read from its header before decoding (413, a
decompression-bomb guard), and empty, non-image or corrupt files (400). Each problem is answered with a JSON
``ErrorResponse`` that says how to fix it, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import shutil
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifar10_pipeline import IMAGE_SHAPE, NUM_CLASSES, __version__
from cifar10_pipeline.core.paths import MODEL_DIR

logger = logging.getLogger("cifar10_pipeline.serving.serve")

REGISTRY_PREFIX = "models:/"
PREDICT_PATH = "/predict"
FILES_FIELD = "files"
CURL_HINT = f"e.g. curl -F {FILES_FIELD}=@cat.png -F {FILES_FIELD}=@dog.jpg http://HOST:PORT{PREDICT_PATH}"
# Content types a client may send for an image part; anything else is refused before decoding.
# application/octet-stream and a missing type are what clients send when they do not know.
GENERIC_CONTENT_TYPES = {"", "application/octet-stream"}


class ServeSettings(BaseSettings):
    """Server settings, read from CIFAR10_SERVE_* environment variables (or given explicitly)."""

    model_config = SettingsConfigDict(env_prefix="CIFAR10_SERVE_", extra="forbid")

    model: str = Field(
        default=str(MODEL_DIR),
        description="A model directory written by save_pretrained, or an MLflow registry URI "
        "(models:/NAME@ALIAS or models:/NAME/VERSION).",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="Largest request body (413 above)."
    )
    max_files: int = Field(default=64, gt=0, description="Most images in one request (413 above).")
    max_image_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Largest width x height an image may declare; checked before decoding (413 above).",
    )
    default_top_k: int = Field(default=3, ge=1, le=NUM_CLASSES)
    git_commit: str | None = Field(
        default=None, description="Commit reported by /health; by default asked of git beside the package."
    )


# ---------------------------------------------------------------------------------------------------- models


class ErrorItem(BaseModel):
    location: str = Field(
        description="What the problem is about, e.g. 'files[1] (notes.txt)' or 'query.top_k'."
    )
    message: str


class ErrorResponse(BaseModel):
    detail: str = Field(description="What went wrong and how to fix it.")
    errors: list[ErrorItem] = Field(
        default_factory=list, description="One entry per offending file or field."
    )


class LabelProbability(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class Prediction(BaseModel):
    filename: str | None = Field(description="The uploaded file's name, as the client sent it.")
    label: str = Field(description="The most probable class.")
    probability: float = Field(ge=0.0, le=1.0, description="Its probability.")
    top_k: list[LabelProbability] = Field(description="The k most probable classes, most probable first.")
    probabilities: dict[str, float] = Field(description="Every class's probability, in class-id order.")


class PredictResponse(BaseModel):
    model: str = Field(description="The served model's name.")
    predictions: list[Prediction] = Field(description="One per uploaded file, in upload order.")


class Label(BaseModel):
    id: int
    name: str


class LabelsResponse(BaseModel):
    labels: list[Label]


class WeightsFile(BaseModel):
    file: str
    sha256: str
    bytes: int


class ModelInfo(BaseModel):
    name: str
    source: str = Field(description="The directory or registry URI the model was loaded from.")
    registry_version: str | None = Field(description="The registered model version, when loaded from MLflow.")
    architecture: str
    model_type: str
    num_labels: int
    image_size: int
    tta_level: int
    parameters: int
    weights: list[WeightsFile] = Field(description="SHA-256 of each safetensors file (model.safetensors).")


class ServerInfo(BaseModel):
    package_version: str
    git_commit: str


class Limits(BaseModel):
    max_upload_bytes: int
    max_files: int
    max_image_pixels: int


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: ModelInfo
    server: ServerInfo
    limits: Limits


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "An upload is empty, not an image, or corrupt",
        413: "Request body, file count or image dimensions above the server's limits",
        415: "Not multipart/form-data, or a part that is not an image",
        422: f"The '{FILES_FIELD}' field is missing or a parameter is invalid",
    }.items()
}


# ---------------------------------------------------------------------------------------------- model state


@dataclass
class Runtime:
    """Everything loaded once at startup and shared by the requests."""

    model: Any  # a transformers PreTrainedModel
    labels: list[str]
    info: ModelInfo
    server: ServerInfo
    # One forward pass at a time: torch already spreads one batch over all cores, so concurrent passes
    # would only contend for them.
    lock: threading.Lock = field(default_factory=threading.Lock)
    scratch: Path | None = None  # where a registry model was downloaded; removed at shutdown

    def close(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def server_git_commit(override: str | None = None) -> str:
    """The commit the server's code comes from: the setting, else git asked beside this file."""
    if override:
        return override
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"  # no git, or not a checkout (e.g. a wheel in a container)


def download_registry_model(uri: str, scratch: Path) -> tuple[Path, str | None]:
    """Fetch a registered model's files and return (the saved transformers model directory, its version).

    The registry stores the save_pretrained directory as an artifact of a pyfunc model (see registry.py);
    serving loads that directory directly, so it runs exactly the code evaluation ran.
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
        model_dir = Path(settings.model)
        name = model_dir.resolve().name
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
    # One forward pass now, so the first user does not wait for torch's one-off kernel setup.
    predict_logits(model, np.zeros((1, *IMAGE_SHAPE), dtype=np.uint8))
    logger.info("serving %s (%s) from %s", info.name, info.architecture, settings.model)
    return Runtime(model=model, labels=labels, info=info, server=server, scratch=scratch)


# ---------------------------------------------------------------------------------------------- input checks


class UploadProblem(Exception):
    """A request the server refuses, with the status and a message that says how to fix it."""

    def __init__(self, status_code: int, detail: str, errors: list[ErrorItem] | None = None):
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.errors = errors or []


class _BodyTooLarge(HTTPException):
    # An HTTPException, so FastAPI re-raises it from form parsing instead of turning it into a 400.
    def __init__(self, limit: int):
        super().__init__(
            status_code=413,
            detail=f"request body is larger than the server's limit of {limit} bytes; send fewer or smaller "
            f"images per request (or raise CIFAR10_SERVE_MAX_UPLOAD_BYTES)",
        )


def _error_response(status_code: int, detail: str, errors: list[ErrorItem] | None = None) -> JSONResponse:
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
            response = _error_response(
                415,
                f"POST {PREDICT_PATH} takes multipart/form-data with the images under the field "
                f"'{FILES_FIELD}' (got content type {content_type or 'none'!r}); {CURL_HINT}",
            )
            await response(scope, receive, send)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            # Answer without reading the body: the declared size is enough to refuse it.
            exc = _BodyTooLarge(self.max_bytes)
            await _error_response(exc.status_code, exc.detail)(scope, receive, send)
            return

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:  # a missing or false Content-Length
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge as exc:
            if started:
                raise
            await _error_response(exc.status_code, exc.detail)(scope, receive, send)


def _describe(index: int, filename: str | None) -> str:
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


# ------------------------------------------------------------------------------------------------------ app


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def _infer(runtime: Runtime, images: np.ndarray) -> np.ndarray:
    from cifar10_pipeline.modeling.inference import predict_logits

    with runtime.lock:
        return predict_logits(runtime.model, images).softmax(1).numpy()


def _decode_all(uploads: list[tuple[str | None, str | None, bytes]], max_pixels: int) -> np.ndarray:
    """Decode every upload, or raise one UploadProblem listing every bad file (to fix them all at once)."""
    arrays: list[np.ndarray] = []
    problems: list[tuple[int, ErrorItem]] = []
    for index, (filename, content_type, data) in enumerate(uploads):
        where = _describe(index, filename)
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


def _validation_detail(exc: RequestValidationError) -> tuple[str, list[ErrorItem]]:
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


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """Build the web app; the model is loaded when the app starts (lifespan), not here."""
    settings = settings or ServeSettings()
    index_html = (
        resources.files("cifar10_pipeline.serving").joinpath("static/index.html").read_text(encoding="utf-8")
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await run_in_threadpool(load_runtime, settings)
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
        f"`{FILES_FIELD}`; any size or format Pillow reads. They are scaled to 32x32 exactly as in training.",
        lifespan=lifespan,
    )
    app.add_middleware(UploadGuard, max_bytes=settings.max_upload_bytes)

    @app.exception_handler(UploadProblem)
    async def _upload_problem(request: Request, exc: UploadProblem) -> JSONResponse:
        return _error_response(exc.status_code, exc.detail, exc.errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_problem(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = str(exc.detail)
        if exc.status_code == 400 and detail.startswith("Too many files"):
            # Starlette's multipart parser stops at max_files; say which limit and what to do.
            return _error_response(
                413,
                f"too many files in one request: at most {settings.max_files}; split the images over several "
                "requests (or raise CIFAR10_SERVE_MAX_FILES)",
            )
        response = _error_response(exc.status_code, detail)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, items = _validation_detail(exc)
        return _error_response(422, detail, items)

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: JSON like every other answer; uvicorn still logs the traceback.
        return _error_response(500, "internal server error; the server log has the traceback")

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
            File(description="One or more images (repeat the field); any size, any format Pillow reads."),
        ],
        runtime: Annotated[Runtime, Depends(get_runtime)],
        top_k: Annotated[
            int, Query(ge=1, le=NUM_CLASSES, description="How many classes to list per image in top_k.")
        ] = settings.default_top_k,
    ) -> PredictResponse:
        uploads = [(upload.filename, upload.content_type, await upload.read()) for upload in files]
        # Decoding and the forward pass are CPU-bound: off the event loop, so other requests keep flowing.
        images = await run_in_threadpool(_decode_all, uploads, settings.max_image_pixels)
        probabilities = await run_in_threadpool(_infer, runtime, images)
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
        return HealthResponse(
            status="ok",
            model=runtime.info,
            server=runtime.server,
            limits=Limits(
                max_upload_bytes=settings.max_upload_bytes,
                max_files=settings.max_files,
                max_image_pixels=settings.max_image_pixels,
            ),
        )

    return app


# ---------------------------------------------------------------------------------------------- entry point


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line overrides of the CIFAR10_SERVE_* settings (shared with ``cifar10 serve``)."""
    parser.add_argument(
        "--model",
        help=f"model directory or models:/NAME@ALIAS (default: $CIFAR10_SERVE_MODEL or {MODEL_DIR})",
    )
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    overrides = {
        key: getattr(args, key)
        for key in ("model", "host", "port", "log_level")
        if getattr(args, key, None) is not None
    }
    return ServeSettings(**overrides)


def run(settings: ServeSettings) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m cifar10_pipeline.serving.serve",
        description="Serve the CIFAR-10 classifier over HTTP. Settings come from CIFAR10_SERVE_* environment "
        "variables; these flags override them.",
    )
    add_server_arguments(parser)
    run(settings_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
