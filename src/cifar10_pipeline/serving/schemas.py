"""The HTTP API's contract: the upload endpoint and field, and every request and response model.

These models are what FastAPI validates answers against and what ``/openapi.json`` documents; clients (and
the tests) can validate responses with them too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

PREDICT_PATH = "/predict"
FILES_FIELD = "files"
CURL_HINT = f"e.g. curl -F {FILES_FIELD}=@cat.png -F {FILES_FIELD}=@dog.jpg http://HOST:PORT{PREDICT_PATH}"


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
    max_image_pixels: int = Field(description="Largest width x height one image may declare (413 above).")
    max_request_pixels: int = Field(
        description="Most pixels the decodes of one request's images may produce together (a JPEG counts "
        "at the reduced scale it is decoded at, 1/8 for a photo; other formats at full size)."
    )
    max_concurrent_decodes: int
    decode_wait_s: float = Field(description="Longest wait for a decode slot before a 503.")
    max_pending_requests: int = Field(description="Most /predict requests in flight before a 503.")


class Batching(BaseModel):
    enabled: bool
    max_batch_size: int = Field(description="Most images in one forward pass.")
    max_wait_ms: float = Field(description="Longest a forward pass is held back for more requests.")


class Load(BaseModel):
    """What the server is doing now and has done since it started."""

    requests_in_flight: int
    requests_refused_busy: int = Field(
        description="Answered 503 since start (too many in flight or no slot)."
    )
    decodes_running: int
    decodes_waiting: int
    batches: int = Field(description="Forward passes run since start.")
    batched_requests: int
    batched_images: int
    largest_batch: int
    max_hold_ms: float = Field(description="Longest a forward pass was held back for more requests.")


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: ModelInfo
    server: ServerInfo
    limits: Limits
    batching: Batching
    load: Load


# The error answers of POST /predict, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "An upload is empty, not an image, or corrupt",
        413: "Request body, file count or image dimensions above the server's limits",
        415: "Not multipart/form-data, or a part that is not an image",
        422: f"The '{FILES_FIELD}' field is missing or a parameter is invalid",
        503: "The server is busy (too many requests in flight, or no decode slot in time); see Retry-After",
    }.items()
}
