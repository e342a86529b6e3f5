"""The web service: endpoints, response models, every kind of bad input, and a real uvicorn process."""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.modeling.inference import MAX_IMAGE_PIXELS as DECODE_PIXEL_LIMIT
from cifar10_pipeline.modeling.inference import image_to_array, predict_logits
from cifar10_pipeline.modeling.model import load_model
from cifar10_pipeline.serving.schemas import ErrorResponse, HealthResponse, PredictResponse
from cifar10_pipeline.serving.serve import PROG, create_app
from cifar10_pipeline.serving.settings import (
    ServeSettings,
    SettingsInputError,
    build_parser,
    env_var_name,
    flag_name,
    parse_settings,
    settings_from_args,
)
from tests.localserver import model_server

from ..conftest import PROJECT_ROOT, mirror_dir
from ..helpers import save_tiny_convnet

TEST_SHARD = "test-00000-of-00001.parquet"
MAX_UPLOAD_BYTES = 300_000
MAX_FILES = 4
MAX_IMAGE_PIXELS = 2_000_000


def real_test_pngs(count: int) -> list[bytes]:
    mirror = mirror_dir()
    if mirror is None:
        pytest.skip("CIFAR-10 mirror not found (download.mirror_dir in conf/config.yaml)")
    batch = next(pq.ParquetFile(mirror / TEST_SHARD).iter_batches(batch_size=count, columns=["img"]))
    return [row["bytes"] for row in batch.column("img").to_pylist()]


def encode(size: tuple[int, int] = (32, 32), fmt: str = "PNG", mode: str = "RGB", seed: int = 0) -> bytes:
    """A smooth synthetic image (small when compressed, whatever its dimensions)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    rows, cols = np.indices((size[1], size[0]))
    planes = [(rows * (c + 1) + cols * (seed + 2) + 40 * c) % 256 for c in range(channels)]
    pixels = np.stack(planes, axis=-1).astype(np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, fmt)
    return buffer.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG whose header claims width x height pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_convnet(tmp_path_factory.mktemp("serve") / "model", tta_level=2)


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[TestClient]:
    settings = ServeSettings(
        model=str(model_dir),
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_files=MAX_FILES,
        max_image_pixels=MAX_IMAGE_PIXELS,
        git_commit="0123456789abcdef",
    )
    with TestClient(create_app(settings)) as test_client:  # runs the lifespan: loads the model
        yield test_client


def test_health_names_the_model_its_checksum_and_the_commit(client: TestClient, model_dir: Path) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    health = HealthResponse.model_validate(response.json())
    assert health.model.architecture == "CifarConvNetForImageClassification"
    assert health.model.tta_level == 2 and health.model.num_labels == 10
    expected = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert [(w.file, w.sha256) for w in health.model.weights] == [("model.safetensors", expected)]
    assert health.server.git_commit == "0123456789abcdef"
    assert health.limits.max_files == MAX_FILES


def test_labels_are_in_class_id_order(client: TestClient) -> None:
    response = client.get("/labels")
    assert response.status_code == 200
    assert [(label["id"], label["name"]) for label in response.json()["labels"]] == list(
        enumerate(CLASS_NAMES)
    )


def test_predict_many_images_of_any_size_and_format(client: TestClient) -> None:
    uploads = [
        ("files", ("cifar.png", encode(), "image/png")),
        ("files", ("photo.jpg", encode((1024, 768), "JPEG", seed=1), "image/jpeg")),
        ("files", ("alpha.webp", encode((64, 20), "WEBP", "RGBA", seed=2), "image/webp")),
        ("files", ("gray.bmp", encode((40, 40), "BMP", "L", seed=3), "application/octet-stream")),
    ]
    response = client.post("/predict", files=uploads, params={"top_k": 5})
    assert response.status_code == 200, response.text
    body = PredictResponse.model_validate(response.json())
    assert [p.filename for p in body.predictions] == ["cifar.png", "photo.jpg", "alpha.webp", "gray.bmp"]
    for prediction in body.predictions:
        assert list(prediction.probabilities) == list(CLASS_NAMES)
        assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert len(prediction.top_k) == 5
        assert prediction.top_k[0].label == prediction.label
        assert prediction.probability == max(prediction.probabilities.values())


def test_openapi_documents_request_and_response_models(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    assert "multipart/form-data" in predict["requestBody"]["content"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "PredictResponse"
    )
    for status in ("400", "413", "415", "422"):
        assert predict["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith(
            "ErrorResponse"
        )
    assert spec["paths"]["/health"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"
    ].endswith("HealthResponse")
    assert client.get("/docs").status_code == 200


def test_page_is_served_and_self_contained(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in response.text and 'id="drop-zone"' in response.text
    assert "http://" not in response.text and "https://" not in response.text  # no CDN


def _multipart(boundary: str, name: str, filename: str, data: bytes) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def _streamed_oversized_body() -> dict:
    """A body over the limit sent chunked, with no Content-Length to refuse it by."""
    body = _multipart("xyz", "files", "big.png", b"\0" * (MAX_UPLOAD_BYTES + 10_000))

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 64_000):
            yield body[start : start + 64_000]

    return {"content": chunks(), "headers": {"content-type": "multipart/form-data; boundary=xyz"}}


BAD_REQUESTS = {
    "not an image": (
        400,
        "not an image",
        {"files": [("files", ("notes.png", b"hello, world", "image/png"))]},
    ),
    "truncated image": (
        400,
        "truncated",
        {"files": [("files", ("cut.png", encode((64, 64))[:200], "image/png"))]},
    ),
    "empty file": (400, "empty", {"files": [("files", ("empty.png", b"", "image/png"))]}),
    "text content type": (415, "not an image type", {"files": [("files", ("a.txt", b"text", "text/plain"))]}),
    "json body": (415, "multipart/form-data", {"json": {"files": ["cat.png"]}}),
    "raw image body": (
        415,
        "multipart/form-data",
        {"content": encode(), "headers": {"content-type": "image/png"}},
    ),
    "body over limit": (
        413,
        "CIFAR10_SERVE_MAX_UPLOAD_BYTES",
        {"files": [("files", ("big.bmp", encode((400, 300), "BMP"), "image/bmp"))]},
    ),
    "streamed body over limit": (413, "CIFAR10_SERVE_MAX_UPLOAD_BYTES", _streamed_oversized_body),
    "decompression bomb": (
        413,
        "too large to decode safely",
        {"files": [("files", ("bomb.png", png_declaring(100_000, 100_000), "image/png"))]},
    ),
    "more pixels than allowed": (
        413,
        "above the limit",
        {"files": [("files", ("wide.png", encode((2000, 1001)), "image/png"))]},
    ),
    "too many files": (
        413,
        f"at most {MAX_FILES}",
        {"files": [("files", (f"{i}.png", encode(seed=i), "image/png")) for i in range(MAX_FILES + 1)]},
    ),
    "missing files field": (422, "field 'files'", {"files": [("image", ("a.png", encode(), "image/png"))]}),
    "files field is text": (
        422,
        "field 'files'",
        {"data": {"files": "cat.png"}, "files": [("x", ("a.png", b"1"))]},
    ),
    "top_k out of range": (
        422,
        "top_k",
        {"params": {"top_k": 11}, "files": [("files", ("a.png", encode()))]},
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(client: TestClient, case: str) -> None:
    status, message, request = BAD_REQUESTS[case]
    request = request() if callable(request) else request
    response = client.post("/predict", **request)
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate(response.json())
    assert message in error.detail + " ".join(item.message for item in error.errors)
    good = client.post("/predict", files=[("files", ("ok.png", encode(), "image/png"))])
    assert good.status_code == 200


def test_one_bad_file_among_good_ones_is_named(client: TestClient) -> None:
    uploads = [
        ("files", ("good.png", encode(), "image/png")),
        ("files", ("bad.png", b"GIF89a-not-really", "image/png")),
        ("files", ("good2.png", encode(seed=5), "image/png")),
    ]
    response = client.post("/predict", files=uploads)
    assert response.status_code == 400
    error = ErrorResponse.model_validate(response.json())
    assert [item.location for item in error.errors] == ["files[1] (bad.png)"]


def test_settings_come_from_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR10_SERVE_MODEL", "models:/cifar10-classifier@champion")
    monkeypatch.setenv("CIFAR10_SERVE_MAX_FILES", "7")
    settings = ServeSettings()
    assert settings.model == "models:/cifar10-classifier@champion" and settings.max_files == 7
    monkeypatch.setenv("CIFAR10_SERVE_MAX_FILES", "0")
    with pytest.raises(ValidationError):
        ServeSettings()


# ------------------------------------------------------------------------------------ settings from the CLI


def _from_flags(*argv: str) -> ServeSettings:
    return settings_from_args(build_parser(PROG).parse_args(list(argv)))


def test_a_flag_beats_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR10_SERVE_PORT", "9000")
    monkeypatch.setenv("CIFAR10_SERVE_MAX_FILES", "7")
    monkeypatch.setenv("CIFAR10_SERVE_LOG_LEVEL", "debug")
    settings = _from_flags("--port", "9100", "--log-level", "warning", "--max-image-pixels", "1000")
    assert (settings.port, settings.log_level, settings.max_image_pixels) == (9100, "warning", 1000)
    assert settings.max_files == 7  # no flag: the variable still counts
    assert _from_flags().port == 9000


@pytest.mark.parametrize(
    ("argv", "env", "named", "not_named"),
    [
        (["--max-files", "0"], {}, "--max-files '0': Input should be greater than 0", "CIFAR10_SERVE_"),
        (["--port", "http"], {"CIFAR10_SERVE_PORT": "8000"}, "--port 'http'", "CIFAR10_SERVE_PORT"),
        (["--log-level", "loud"], {}, "--log-level 'loud': Input should be 'critical'", "CIFAR10_SERVE_"),
        ([], {"CIFAR10_SERVE_DEFAULT_TOP_K": "11"}, "CIFAR10_SERVE_DEFAULT_TOP_K '11'", "--default-top-k"),
    ],
)
def test_a_bad_value_names_the_flag_or_variable_it_came_from(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], named: str, not_named: str
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsInputError) as caught:
        _from_flags(*argv)
    assert named in str(caught.value) and not_named not in str(caught.value)


def test_the_server_entry_point_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(["--max-upload-bytes", "-5"], prog=PROG)
    assert caught.value.code == 2
    assert "--max-upload-bytes '-5': Input should be greater than 0" in capsys.readouterr().err


def test_help_lists_every_setting_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_settings(["--help"], prog=PROG)
    assert caught.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for name, field in ServeSettings.model_fields.items():
        assert f"{flag_name(name)} " in shown and f"[env: {env_var_name(name)}]" in shown, name
        assert " ".join(str(field.description).split()) in shown, name


def test_api_probabilities_equal_predict_logits_on_real_test_images(
    client: TestClient, model_dir: Path
) -> None:
    """No train/serve skew: what the API returns is what the evaluation path computes on the same pixels."""
    pngs = real_test_pngs(MAX_FILES)
    expected = (
        predict_logits(load_model(model_dir), np.stack([image_to_array(p) for p in pngs])).softmax(1).numpy()
    )
    uploads = [("files", (f"test_{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    response = client.post("/predict", files=uploads)
    assert response.status_code == 200
    got = np.array([list(p["probabilities"].values()) for p in response.json()["predictions"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------- real uvicorn


@pytest.mark.slow
def test_real_uvicorn_server(model_dir: Path, tmp_path: Path) -> None:
    with (
        # The flag must win over the variable: the 300x300 BMP below is refused only under the flag's limit.
        model_server(
            model_dir,
            tmp_path / "server.log",
            flags=["--max-upload-bytes", "200000"],
            max_upload_bytes=10_000_000,
        ) as url,
        httpx.Client(base_url=url, timeout=60) as http,
    ):
        pngs = [encode(seed=i) for i in range(3)]
        response = http.post(
            "/predict", files=[("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
        )
        assert response.status_code == 200, response.text
        got = np.array([list(p["probabilities"].values()) for p in response.json()["predictions"]])
        expected = predict_logits(load_model(model_dir), np.stack([image_to_array(p) for p in pngs])).softmax(
            1
        )
        np.testing.assert_allclose(got, expected.numpy(), rtol=0, atol=1e-6)

        bad = http.post("/predict", files=[("files", ("bad.png", b"not an image", "image/png"))])
        assert bad.status_code == 400 and "not an image" in bad.json()["detail"]
        too_big = http.post(
            "/predict", files=[("files", ("big.bmp", encode((300, 300), "BMP"), "image/bmp"))]
        )
        assert too_big.status_code == 413
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        # No CIFAR10_SERVE_GIT_COMMIT here: the server asks git beside its code, this checkout.
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        )
        assert health.json()["server"]["git_commit"] == head.stdout.strip()
        limits = health.json()["limits"]
        assert limits["max_upload_bytes"] == 200000 and limits["max_image_pixels"] == DECODE_PIXEL_LIMIT
        assert http.get("/").status_code == 200
