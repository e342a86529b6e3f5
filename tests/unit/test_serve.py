"""The web service: endpoints, response models, every kind of bad input, and a real uvicorn process."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.images import EMPTY_FILE, image_to_array
from cifar10_pipeline.core.images import MAX_IMAGE_PIXELS as DECODE_CEILING
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import load_model
from cifar10_pipeline.serving.cli import main as cli_main
from cifar10_pipeline.serving.guards import RETRY_AFTER_S
from cifar10_pipeline.serving.schemas import ErrorResponse, HealthResponse, PredictResponse
from cifar10_pipeline.serving.serve import PROG, create_app
from cifar10_pipeline.serving.serve import main as serve_main
from cifar10_pipeline.serving.settings import (
    ServeSettings,
    SettingsInputError,
    build_parser,
    env_var_name,
    flag_name,
    parse_settings,
    settings_from_args,
)
from tests.support.hostile_images import (
    blank_png,
    corrupt_payloads,
    jpeg_declaring,
    noisy_png,
    photo_jpeg,
    png_declaring,
    sixteen_bit_copies,
)
from tests.support.localserver import model_server

from ..conftest import PROJECT_ROOT, mirror_dir
from ..support.helpers import save_tiny_convnet

TEST_SHARD = "test-00000-of-00001.parquet"
MAX_UPLOAD_BYTES = 300_000
MAX_FILES = 4
MAX_IMAGE_PIXELS = 2_000_000
MAX_REQUEST_PIXELS = 3_000_000


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
        max_request_pixels=MAX_REQUEST_PIXELS,
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


def _case(
    status: int, message: str, request: object, tried: str, kept: str
) -> pytest.ParameterSet:  # one hostile request, with the reliability marker that reports it
    return pytest.param(status, message, request, marks=pytest.mark.reliability(tried, kept))


BAD_REQUESTS = {
    "not an image": _case(
        400,
        "not a readable image: its bytes are in no image format",
        {"files": [("files", ("notes.png", b"hello, world", "image/png"))]},
        "a text file uploaded as notes.png",
        "400 naming the file and the formats accepted; the server keeps serving",
    ),
    "truncated image": _case(
        400,
        "corrupt or truncated",
        {"files": [("files", ("cut.png", encode((64, 64))[:200], "image/png"))]},
        "a PNG cut short in its pixel data",
        "400 saying the file is corrupt or truncated; the server keeps serving",
    ),
    "empty file": _case(
        400,
        EMPTY_FILE,
        {"files": [("files", ("empty.png", b"", "image/png"))]},
        "an empty (0-byte) file",
        "400 in the same words as the CLI; the server keeps serving",
    ),
    "text content type": _case(
        415,
        "not an image type",
        {"files": [("files", ("a.txt", b"text", "text/plain"))]},
        "a part declared text/plain",
        "415 before decoding; the server keeps serving",
    ),
    "json body": _case(
        415,
        "multipart/form-data",
        {"json": {"files": ["cat.png"]}},
        "a JSON body instead of a multipart upload",
        "415 with a curl example; the server keeps serving",
    ),
    "raw image body": _case(
        415,
        "multipart/form-data",
        {"content": encode(), "headers": {"content-type": "image/png"}},
        "a raw image body instead of a multipart upload",
        "415 with a curl example; the server keeps serving",
    ),
    "body over limit": _case(
        413,
        "CIFAR10_SERVE_MAX_UPLOAD_BYTES",
        {"files": [("files", ("big.bmp", encode((400, 300), "BMP"), "image/bmp"))]},
        "a body larger than the upload limit, with its Content-Length",
        "413 before the body is read; the server keeps serving",
    ),
    "streamed body over limit": _case(
        413,
        "CIFAR10_SERVE_MAX_UPLOAD_BYTES",
        _streamed_oversized_body,
        "a chunked body larger than the upload limit, with no Content-Length",
        "413 once the limit is passed, without buffering the rest; the server keeps serving",
    ),
    "decompression bomb": _case(
        413,
        f"10000000000 pixels, above the limit of {MAX_IMAGE_PIXELS} pixels",
        {"files": [("files", ("bomb.png", png_declaring(100_000, 100_000), "image/png"))]},
        "a 100 KB PNG header declaring 100000x100000 pixels (a decompression bomb)",
        "413 from the header alone, stating the limit /health reports; nothing is decoded",
    ),
    "more pixels than allowed": _case(
        413,
        f"2000x1001 = 2002000 pixels, above the limit of {MAX_IMAGE_PIXELS} pixels",
        {"files": [("files", ("wide.png", encode((2000, 1001)), "image/png"))]},
        "an image just above the pixel limit",
        "413 from the header alone, stating the limit /health reports; nothing is decoded",
    ),
    "small PNG of 6300x6300 pixels": _case(
        413,
        f"6300x6300 = 39690000 pixels, above the limit of {MAX_IMAGE_PIXELS} pixels",
        {"files": [("files", ("huge.png", blank_png(6300, 6300), "image/png"))]},
        "a 115 KB PNG of 6300x6300 pixels (40 megapixels, 0.7 GB and seconds of CPU to decode)",
        "413 from the header alone (nothing decoded); the server keeps serving",
    ),
    "request over its pixel budget": _case(
        413,
        f"would decode to 4000000 pixels together, above the per-request limit of {MAX_REQUEST_PIXELS}",
        {
            "files": [
                ("files", (f"{i}.png", encode((1000, 1000), seed=i), "image/png")) for i in range(MAX_FILES)
            ]
        },
        f"{MAX_FILES} images each under the pixel limit but together over the per-request budget",
        "413 before any of them is decoded; the server keeps serving",
    ),
    "too many files": _case(
        413,
        f"at most {MAX_FILES}",
        {"files": [("files", (f"{i}.png", encode(seed=i), "image/png")) for i in range(MAX_FILES + 1)]},
        "more files in one request than allowed",
        "413 naming the limit; the server keeps serving",
    ),
    "missing files field": _case(
        422,
        "field 'files'",
        {"files": [("image", ("a.png", encode(), "image/png"))]},
        "an upload under the wrong form field",
        "422 naming the field to use; the server keeps serving",
    ),
    "files field is text": _case(
        422,
        "field 'files'",
        {"data": {"files": "cat.png"}, "files": [("x", ("a.png", b"1"))]},
        "a text value where files are expected",
        "422 naming the field to use; the server keeps serving",
    ),
    "top_k out of range": _case(
        422,
        "top_k",
        {"params": {"top_k": 11}, "files": [("files", ("a.png", encode()))]},
        "top_k=11 with 10 classes",
        "422 naming top_k; the server keeps serving",
    ),
}


@pytest.mark.parametrize(
    ("status", "message", "request_kwargs"), list(BAD_REQUESTS.values()), ids=list(BAD_REQUESTS)
)
def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(
    client: TestClient, status: int, message: str, request_kwargs: object
) -> None:
    request = request_kwargs() if callable(request_kwargs) else request_kwargs
    response = client.post("/predict", **request)
    assert response.status_code == status, response.text
    error = ErrorResponse.model_validate(response.json())
    said = error.detail + " ".join(item.message for item in error.errors)
    assert message in said
    assert " object at 0x" not in said  # never a Python object's repr
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


# ----------------------------------------------------------------------- image decoding, as a user meets it

TRAINED_MODEL = PROJECT_ROOT / "models" / "cifar10"  # dvc repro train writes it; absent in a fresh clone


def real_test_image(label: str) -> np.ndarray:
    """The first test image of a class in the mirror, as uint8 (32, 32, 3)."""
    mirror = mirror_dir()
    if mirror is None:
        pytest.skip("CIFAR-10 mirror not found (download.mirror_dir in conf/config.yaml)")
    batch = next(pq.ParquetFile(mirror / TEST_SHARD).iter_batches(batch_size=200, columns=["img", "label"]))
    for row in batch.to_pylist():
        if row["label"] == CLASS_NAMES.index(label):
            return np.asarray(Image.open(io.BytesIO(row["img"]["bytes"])).convert("RGB"))
    raise AssertionError(f"no {label} among the mirror's first 200 test images")


@pytest.fixture(scope="module")
def photo_client(model_dir: Path) -> Iterator[tuple[TestClient, bool]]:
    """The service on the trained model when there is one (its answers then mean something), else the tiny
    one; and whether it is the trained model."""
    trained = (TRAINED_MODEL / "model.safetensors").is_file()
    settings = ServeSettings(model=str(TRAINED_MODEL if trained else model_dir), git_commit="0" * 40)
    with TestClient(create_app(settings)) as test_client:
        yield test_client, trained


SIXTEEN_BIT_CASES = list(sixteen_bit_copies(np.zeros((2, 2, 3), np.uint8)))


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            name,
            marks=pytest.mark.reliability(
                f"a {name} copy of a CIFAR-10 cat photo", "classified exactly as its 8-bit copy"
            ),
        )
        for name in SIXTEEN_BIT_CASES
    ],
)
def test_16_bit_uploads_classify_like_their_8_bit_copies(
    photo_client: tuple[TestClient, bool], variant: str
) -> None:
    """Pillow's own conversion clipped 16-bit gray to white: the trained model then saw a white square."""
    client, trained = photo_client
    cat = real_test_image("cat")
    sixteen, eight = sixteen_bit_copies(cat)[variant]
    response = client.post(
        "/predict",
        files=[("files", ("16.png", sixteen, "image/png")), ("files", ("8.png", eight, "image/png"))],
    )
    assert response.status_code == 200, response.text
    got_16, got_8 = response.json()["predictions"]
    assert got_16["label"] == got_8["label"]
    np.testing.assert_allclose(
        list(got_16["probabilities"].values()), list(got_8["probabilities"].values()), rtol=0, atol=1e-6
    )
    if trained and variant == "16-bit RGB PNG":
        assert got_16["label"] == "cat"


def test_phone_photos_are_classified_under_the_default_limits(photo_client: tuple[TestClient, bool]) -> None:
    """Four 12-megapixel JPEGs (48 megapixels declared) in one request: each is decoded at 1/8 scale, so the
    request's pixel budget counts 4 x 500x375 and lets them through."""
    client, _ = photo_client
    files = [("files", (f"photo{i}.jpg", photo_jpeg(4000, 3000), "image/jpeg")) for i in range(4)]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 4
    assert client.get("/health").json()["limits"]["max_image_pixels"] >= 50_000_000


@pytest.mark.reliability(
    "decompression bombs (PNG and JPEG headers declaring billions of pixels) and full-size PNGs over the "
    "request's pixel budget, under the default limits",
    "413 from the headers alone, nothing decoded; the 413 for PNGs says other formats count at full size",
)
def test_bombs_and_full_size_decodes_are_refused_under_the_default_limits(
    photo_client: tuple[TestClient, bool],
) -> None:
    client, _ = photo_client
    for bomb in (png_declaring(100_000, 100_000), jpeg_declaring(60_000, 60_000)):
        response = client.post("/predict", files=[("files", ("bomb", bomb, "application/octet-stream"))])
        assert response.status_code == 413, response.text
        assert "above the limit of" in response.json()["detail"]
    png = blank_png(4000, 3000)  # 12 megapixels decoded at full size, twice: over the default budget
    response = client.post("/predict", files=[("files", (f"{i}.png", png, "image/png")) for i in range(2)])
    assert response.status_code == 413, response.text
    assert "other formats at full size" in response.json()["detail"]


CORRUPT_CASES = {**corrupt_payloads(encode((64, 64), seed=7)), "empty file": b""}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            name,
            marks=pytest.mark.reliability(
                f"a corrupt upload: {name}",
                "400 with a plain message (no Python object repr), in the same words as the CLI",
            ),
        )
        for name in CORRUPT_CASES
    ],
)
def test_a_bad_file_is_described_cleanly_and_as_the_cli_describes_it(
    client: TestClient, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    data = CORRUPT_CASES[case]
    response = client.post("/predict", files=[("files", ("upload.png", data, "image/png"))])
    assert response.status_code == 400, response.text
    served = ErrorResponse.model_validate(response.json()).errors[0].message
    assert " object at 0x" not in served and "<_io" not in served
    assert served.startswith("not a readable image: ")

    path = tmp_path / "upload.png"
    path.write_bytes(data)
    assert cli_main(["predict", str(path), "--model", str(model_dir), "--json"]) == 1
    said_by_cli = json.loads(capsys.readouterr().out)["results"][0]["error"]
    assert said_by_cli == served


@pytest.mark.reliability(
    "decompression bombs above Pillow's own guard and images above the service's limit",
    "refused in a message that states the one pixel limit /health reports",
)
def test_one_pixel_limit_in_health_and_in_every_refusal(client: TestClient) -> None:
    limit = client.get("/health").json()["limits"]["max_image_pixels"]
    assert limit == MAX_IMAGE_PIXELS  # the setting, reported as set
    for upload in (png_declaring(100_000, 100_000), png_declaring(9_000, 9_000), encode((2000, 1001))):
        response = client.post("/predict", files=[("files", ("big.png", upload, "image/png"))])
        assert response.status_code == 413
        stated = {int(n) for n in re.findall(r"the limit of (\d+) pixels", response.json()["detail"])}
        assert stated == {limit}, response.json()["detail"]


def test_a_pixel_limit_above_the_decode_ceiling_is_refused_at_startup(
    capsys: pytest.CaptureFixture[str], model_dir: Path
) -> None:
    with pytest.raises(SystemExit) as caught:
        serve_main(["--model", str(model_dir), "--max-image-pixels", str(DECODE_CEILING + 1)])
    assert caught.value.code == 2
    assert "CIFAR10_SERVE_MAX_IMAGE_PIXELS" in capsys.readouterr().err


# -------------------------------------------------------------------------------- bounded work under load


def _wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


def _heavy_request(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Images under the limits that take a while to decode (random pixels do not compress)."""
    return [("files", (f"noise{i}.png", noisy_png(1000, 1000, seed=i), "image/png")) for i in range(count)]


def _while_one_request_decodes(settings: ServeSettings, probe: Callable[[TestClient], None]) -> None:
    """Run ``probe`` while a heavy request holds the only decode slot; the heavy one must still succeed."""
    with TestClient(create_app(settings)) as test_client:
        heavy = _heavy_request(3)
        for _ in range(5):  # the heavy request must still be decoding when the probe arrives
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(test_client.post, "/predict", files=heavy)
                _wait_until(lambda: test_client.get("/health").json()["load"]["decodes_running"] == 1)
                try:
                    probe(test_client)
                    break
                except _TooLate:
                    continue
                finally:
                    assert first.result().status_code == 200
        else:
            pytest.fail("the heavy request never overlapped the probe")


class _TooLate(Exception):
    pass


@pytest.mark.reliability(
    "more requests than decode slots, waiting longer than the decode wait bound",
    "503 with Retry-After for the one that waited; the request decoding still answered",
)
def test_a_request_waiting_too_long_for_a_decode_slot_gets_503_retry_after(model_dir: Path) -> None:
    settings = ServeSettings(
        model=str(model_dir), git_commit="0", max_concurrent_decodes=1, decode_wait_s=0.002
    )

    def probe(client: TestClient) -> None:
        # A CIFAR-sized upload is decoded without a slot (next test); this one needs one.
        response = client.post("/predict", files=[("files", ("photo.png", encode((300, 300)), "image/png"))])
        if response.status_code == 200:
            raise _TooLate
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        assert "no image decoder freed up within 0.002 s" in response.json()["detail"]
        assert client.get("/health").json()["load"]["requests_refused_busy"] >= 1

    _while_one_request_decodes(settings, probe)


def test_cifar_sized_requests_are_not_held_behind_large_decodes(model_dir: Path) -> None:
    settings = ServeSettings(
        model=str(model_dir), git_commit="0", max_concurrent_decodes=1, decode_wait_s=0.002
    )

    def probe(client: TestClient) -> None:
        files = [("files", (f"{i}.png", encode(seed=i), "image/png")) for i in range(MAX_FILES)]
        response = client.post("/predict", files=files)
        assert response.status_code == 200, response.text
        if client.get("/health").json()["load"]["decodes_running"] != 1:
            raise _TooLate  # the heavy request had finished: nothing was shown

    _while_one_request_decodes(settings, probe)


@pytest.mark.reliability(
    "more requests in flight than max_pending_requests",
    "503 with Retry-After before the body is read; the request in flight still answered",
)
def test_requests_beyond_max_pending_get_503_without_being_read(model_dir: Path) -> None:
    settings = ServeSettings(model=str(model_dir), git_commit="0", max_pending_requests=1)

    def probe(client: TestClient) -> None:
        response = client.post("/predict", files=[("files", ("ok.png", encode(), "image/png"))])
        if response.status_code == 200:
            raise _TooLate
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        assert "CIFAR10_SERVE_MAX_PENDING_REQUESTS" in response.json()["detail"]

    _while_one_request_decodes(settings, probe)


def test_concurrent_single_image_requests_share_forward_passes(client: TestClient, model_dir: Path) -> None:
    """Micro-batching through the app: same probabilities as one image at a time, fewer forward passes."""
    pngs = [encode(seed=i) for i in range(24)]
    expected = [
        predict_logits(load_model(model_dir), np.stack([image_to_array(png)])).softmax(1).numpy()[0]
        for png in pngs
    ]
    before = client.get("/health").json()["load"]
    with ThreadPoolExecutor(12) as pool:
        responses = list(
            pool.map(
                lambda png: client.post("/predict", files=[("files", ("x.png", png, "image/png"))]), pngs
            )
        )
    after = client.get("/health").json()["load"]
    for response, want in zip(responses, expected, strict=True):
        assert response.status_code == 200
        got = list(response.json()["predictions"][0]["probabilities"].values())
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert after["batched_requests"] - before["batched_requests"] == len(pngs)
    assert after["batches"] - before["batches"] < len(pngs)  # some requests shared a forward pass
    assert after["largest_batch"] <= client.get("/health").json()["batching"]["max_batch_size"]


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
        assert bad.status_code == 400 and "not a readable image" in bad.json()["detail"]
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
        assert (
            limits["max_upload_bytes"] == 200000
            and limits["max_image_pixels"] == ServeSettings().max_image_pixels
        )
        assert http.get("/").status_code == 200


def test_the_settings_table_in_the_docs_states_the_defaults_in_force() -> None:
    """docs/serving.md types each setting's default; this keeps every numeric one equal to the code's."""
    rows = re.findall(
        r"^\| `(CIFAR10_SERVE_\w+)` \| ([^|]+) \|", (PROJECT_ROOT / "docs/serving.md").read_text(), re.M
    )
    checked = 0
    for variable, default in rows:
        field = variable.removeprefix("CIFAR10_SERVE_").lower()
        value = ServeSettings.model_fields[field].default
        if isinstance(value, int | float) and not isinstance(value, bool):
            stated = float(default.split()[0].strip("`"))
            assert stated == value, f"{variable}: docs say {default}, the code {value}"
            checked += 1
    assert checked >= 8


def test_the_decoder_and_the_guards_import_neither_torch_nor_transformers() -> None:
    """core/images.py is a bottom layer: the service's guards import it at module top, at no torch cost."""
    code = (
        "import sys, cifar10_pipeline.core.images, cifar10_pipeline.serving.guards; "
        "print(sorted(m for m in ('torch', 'transformers', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_app_without_a_model_says_on_its_page_and_endpoints_how_to_get_one(tmp_path: Path) -> None:
    settings = ServeSettings(model=str(tmp_path / "absent"), git_commit="0")
    with TestClient(create_app(settings)) as test_client:
        page = test_client.get("/")
        assert page.status_code == 200
        # The page shows the detail of /health's refusal as it is (the browser tests run the script).
        assert "err.detail ||" in page.text
        for response in (
            test_client.get("/health"),
            test_client.get("/labels"),
            test_client.post("/predict", files=[("files", ("a.png", encode(), "image/png"))]),
        ):
            assert response.status_code == 503, response.text
            detail = ErrorResponse.model_validate(response.json()).detail
            assert "\n" not in detail
            assert detail.startswith(f"no trained model at {tmp_path / 'absent'}: ")
            assert "dvc exp run -S profile=quick" in detail and "cifar10 pull" in detail


def test_the_server_entry_point_without_a_model_exits_2_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as caught:
        serve_main(["--model", str(tmp_path / "absent")])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "dvc exp run -S profile=quick" in err, err


def test_transformers_pipeline_on_a_missing_folder_is_told_how_to_get_a_model(tmp_path: Path) -> None:
    from transformers import pipeline

    from cifar10_pipeline.modeling import saved_model_dir

    with pytest.raises(FileNotFoundError, match=r"^no trained model at .*cifar10 pull \(docs/team\.md\)"):
        pipeline("image-classification", model=saved_model_dir(tmp_path / "absent"))
