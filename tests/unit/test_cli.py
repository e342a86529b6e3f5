"""``cifar10 predict``: inputs, output formats, per-file errors and exit codes, on a small real model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cifar10_pipeline import CLASS_NAMES
from cifar10_pipeline.core.data import decode_png
from cifar10_pipeline.core.images import image_to_array
from cifar10_pipeline.modeling.inference import predict_logits
from cifar10_pipeline.modeling.model import load_model
from cifar10_pipeline.serving.cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, build_parser, main
from cifar10_pipeline.serving.settings import ServeSettings, env_var_name, flag_name, settings_from_args
from tests.support.hostile_images import sixteen_bit_copies

from ..conftest import mirror_dir
from ..support.helpers import save_tiny_convnet

TEST_SHARD = "test-00000-of-00001.parquet"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_convnet(tmp_path_factory.mktemp("cli") / "model", tta_level=2)


def _save(
    path: Path, size: tuple[int, int], mode: str = "RGB", fmt: str | None = None, seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8).squeeze()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path, fmt)
    return path


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """photos/ with images of several sizes and formats, a hidden folder, and a text file."""
    root = tmp_path / "photos"
    _save(root / "small.png", (32, 32))
    _save(root / "trip" / "photo.JPG", (1024, 768), seed=1)
    _save(root / "trip" / "deep" / "alpha.webp", (200, 50), "RGBA", seed=2)
    _save(root / "gray.bmp", (17, 45), "L", seed=3)
    _save(root / ".thumbnails" / "ignored.png", (32, 32), seed=4)
    (root / "notes.txt").write_text("not an image")
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_is_searched_recursively_for_images_only(capsys, model_dir: Path, image_tree: Path) -> None:
    code, out, err = run_cli(capsys, "predict", str(image_tree), "--model", str(model_dir))
    assert code == EXIT_OK, err
    lines = out.strip().splitlines()
    paths = [line.split("\t")[0] for line in lines]
    assert sorted(Path(p).name for p in paths) == ["alpha.webp", "gray.bmp", "photo.JPG", "small.png"]
    for line in lines:
        ranked = line.split("\t")[1].split("  ")
        assert len(ranked) == 3  # default --top-k
        assert ranked[0].split()[0] in CLASS_NAMES


def test_json_reports_every_bad_input_and_classifies_the_rest(
    capsys, model_dir: Path, image_tree: Path
) -> None:
    truncated = image_tree / "truncated.png"
    truncated.write_bytes((image_tree / "small.png").read_bytes()[:100])
    empty = image_tree / "empty.jpg"
    empty.write_bytes(b"")
    code, out, err = run_cli(
        capsys,
        "predict",
        str(image_tree / "small.png"),
        str(truncated),
        str(image_tree / "notes.txt"),  # named explicitly, so it is tried and fails
        str(empty),
        str(image_tree / "missing.png"),
        str(image_tree / "*.gif"),  # a pattern that matches nothing
        str(image_tree / "trip" / "photo.JPG"),
        "--model",
        str(model_dir),
        "--json",
        "--top-k",
        "2",
    )
    assert code == EXIT_SOME_FAILED
    document = json.loads(out)
    by_name = {Path(item["path"]).name: item for item in document["results"]}
    assert document["errors"] == 5
    for name in ("truncated.png", "notes.txt", "empty.jpg", "missing.png", "*.gif"):
        assert by_name[name]["error"], name
        assert name in err  # also said on stderr, for people
    assert "truncated" in by_name["truncated.png"]["error"]
    assert "no such file" in by_name["missing.png"]["error"]
    assert "no files match" in by_name["*.gif"]["error"]
    for name in ("small.png", "photo.JPG"):
        item = by_name[name]
        assert item["error"] is None
        assert list(item["probabilities"]) == list(CLASS_NAMES)
        assert sum(item["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert item["top_k"][0]["label"] == item["label"]
        assert len(item["top_k"]) == 2
        assert item["probability"] == max(item["probabilities"].values())


def test_glob_with_double_star_and_duplicates(capsys, model_dir: Path, image_tree: Path) -> None:
    pattern = str(image_tree / "**" / "*.webp")
    code, out, _ = run_cli(
        capsys,
        "predict",
        pattern,
        str(image_tree / "trip" / "deep" / "alpha.webp"),
        "--model",
        str(model_dir),
        "--json",
    )
    assert code == EXIT_OK
    results = json.loads(out)["results"]
    assert [Path(item["path"]).name for item in results] == ["alpha.webp"]  # the same file once


@pytest.mark.slow
def test_batch_size_does_not_change_probabilities(capsys, model_dir: Path, image_tree: Path) -> None:
    outputs = []
    for batch_size in ("1", "3", "64"):
        code, out, _ = run_cli(
            capsys,
            "predict",
            str(image_tree),
            "--model",
            str(model_dir),
            "--json",
            "--batch-size",
            batch_size,
        )
        assert code == EXIT_OK
        outputs.append({item["path"]: item["probabilities"] for item in json.loads(out)["results"]})
    # Same labels; the same probabilities up to float rounding (fp32 kernels sum in a batch-size-dependent
    # order, and `precision: auto` runs fp32 on a CPU without native bf16).
    for other in outputs[1:]:
        assert other.keys() == outputs[0].keys()
        for path, probabilities in other.items():
            assert probabilities.keys() == outputs[0][path].keys()
            for label, p in probabilities.items():
                assert p == pytest.approx(outputs[0][path][label], rel=1e-5, abs=1e-7), (path, label)


def test_progress_bar_goes_to_stderr(capsys, model_dir: Path, image_tree: Path) -> None:
    code, out, err = run_cli(
        capsys,
        "predict",
        str(image_tree),
        "--model",
        str(model_dir),
        "--json",
        "--batch-size",
        "2",
        "--progress",
    )
    assert code == EXIT_OK
    assert "predict" in err and "img" in err
    json.loads(out)  # stdout stays clean JSON


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "no/such/model"], "no trained model at no/such/model"),
        (["--top-k", "11"], "--top-k"),
        (["--batch-size", "0"], "--batch-size"),
    ],
)
def test_usage_errors_exit_2(
    capsys, model_dir: Path, image_tree: Path, argv: list[str], message: str
) -> None:
    argv = ["--model", str(model_dir), *argv] if argv[0] != "--model" else argv
    code, _, err = run_cli(capsys, "predict", str(image_tree), *argv)
    assert code == EXIT_USAGE
    assert message in err


# ---------------------------------------------------------------------------------------------------- serve


def test_serve_flags_are_the_server_settings_and_beat_the_environment(
    capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["serve", "--help"])
    assert caught.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    for name in ServeSettings.model_fields:
        assert f"{flag_name(name)} " in shown and f"[env: {env_var_name(name)}]" in shown, name

    monkeypatch.setenv("CIFAR10_SERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("CIFAR10_SERVE_MAX_FILES", "5")
    args = build_parser().parse_args(["serve", "--host", "127.0.0.2", "--model", "models:/m@champion"])
    settings = settings_from_args(args)
    assert (settings.host, settings.model, settings.max_files) == ("127.0.0.2", "models:/m@champion", 5)


def test_serve_bad_flag_exits_2_naming_it(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR10_SERVE_PORT", "8000")
    code, _, err = run_cli(capsys, "serve", "--port", "70000")
    assert code == EXIT_USAGE
    assert "cifar10 serve: error: --port '70000': Input should be less than or equal to 65535" in err


def test_console_script_help() -> None:
    script = Path(sys.executable).with_name("cifar10")
    if not script.exists():
        pytest.skip("console script not installed (pip install -e .)")
    result = subprocess.run([str(script), "predict", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--top-k" in result.stdout and "--json" in result.stdout


@pytest.mark.slow
def test_python_module_entry_point(model_dir: Path, image_tree: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar10_pipeline.serving.cli",
            "predict",
            str(image_tree),
            "--model",
            str(model_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == EXIT_OK, result.stderr
    assert len(json.loads(result.stdout)["results"]) == 4


def test_cli_probabilities_equal_predict_logits_on_real_test_images(
    capsys, model_dir: Path, tmp_path: Path
) -> None:
    """No train/serve skew: the CLI's probabilities are those of the evaluation path on the same pixels."""
    mirror = mirror_dir()
    if mirror is None:
        pytest.skip("CIFAR-10 mirror not found (download.mirror_dir in conf/config.yaml)")
    first = next(pq.ParquetFile(mirror / TEST_SHARD).iter_batches(batch_size=8, columns=["img"]))
    rows = first.column("img").to_pylist()
    paths = []
    for index, row in enumerate(rows):
        paths.append(tmp_path / f"test_{index}.png")
        paths[-1].write_bytes(row["bytes"])
    arrays = np.stack([image_to_array(row["bytes"]) for row in rows])
    # The served decode is the training-time decode for CIFAR-sized PNGs (no resize, no colour change).
    training_arrays = np.stack([decode_png(row["bytes"], "test") for row in rows])
    np.testing.assert_array_equal(arrays, training_arrays)
    expected = predict_logits(load_model(model_dir), arrays).softmax(1).numpy()

    code, out, _ = run_cli(capsys, "predict", *map(str, paths), "--model", str(model_dir), "--json")
    assert code == EXIT_OK
    got = np.array([list(item["probabilities"].values()) for item in json.loads(out)["results"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


@pytest.mark.reliability(
    "16-bit images (modes I;16, I;16B, I and 16-bit RGB) given to cifar10 predict",
    "each classified with the probabilities of its 8-bit copy",
)
def test_16_bit_files_are_classified_like_their_8_bit_copies(capsys, model_dir: Path, tmp_path: Path) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # resized: not 32x32
    paths = []
    for index, (sixteen, eight) in enumerate(sixteen_bit_copies(rgb).values()):
        for kind, data in (("16", sixteen), ("8", eight)):
            paths.append(tmp_path / f"{index}_{kind}.img")
            paths[-1].write_bytes(data)
    code, out, _ = run_cli(capsys, "predict", *map(str, paths), "--model", str(model_dir), "--json")
    assert code == EXIT_OK
    results = json.loads(out)["results"]
    for sixteen, eight in zip(results[::2], results[1::2], strict=True):
        assert sixteen["probabilities"] == pytest.approx(eight["probabilities"], abs=1e-6), sixteen["path"]


NO_MODEL_ADVICE = ("no trained model at", "dvc exp run -S profile=quick", "cifar10 pull", "docs/team.md")


def test_predict_without_a_model_says_in_one_line_how_to_get_one(
    capsys, image_tree: Path, tmp_path: Path
) -> None:
    code, out, err = run_cli(capsys, "predict", str(image_tree), "--model", str(tmp_path / "absent"))
    assert code == EXIT_USAGE and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert all(words in err for words in NO_MODEL_ADVICE), err


def test_serve_without_a_model_says_in_one_line_how_to_get_one(capsys, tmp_path: Path) -> None:
    """Before: uvicorn's lifespan traceback (about 30 lines) and exit status 3."""
    code, _, err = run_cli(capsys, "serve", "--model", str(tmp_path / "absent"))
    assert code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1, err
    assert all(words in err for words in NO_MODEL_ADVICE) and "CIFAR10_SERVE_MODEL" in err, err
