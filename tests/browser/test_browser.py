"""The drag-and-drop page in a real headless Chromium against a real uvicorn server.

Needs the chromium and chromium-driver packages (apt) and selenium (pip); skipped cleanly without them. The
page's screenshot goes to the test's temporary folder, never into the committed reports/. Uses the trained
model in models/cifar10 when there is one (a meaningful screenshot), else a small random-weights model: the
test checks the page shows what the API answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from tests.support.localserver import model_server

from ..conftest import PROJECT_ROOT, mirror_dir
from ..support.helpers import headless_chrome, save_tiny_convnet

TEST_SHARD = "test-00000-of-00001.parquet"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    trained = PROJECT_ROOT / "models" / "cifar10"
    if (trained / "config.json").is_file():
        return trained
    return save_tiny_convnet(tmp_path_factory.mktemp("browser") / "model", tta_level=2)


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    with headless_chrome() as chrome:
        yield chrome


def _committed_reports() -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (PROJECT_ROOT / "reports").rglob("*")}


def test_page_classifies_uploaded_real_images(driver, model_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    mirror = mirror_dir()
    if mirror is None:
        pytest.skip("CIFAR-10 mirror not found (download.mirror_dir in conf/config.yaml)")
    reports_before = _committed_reports()
    batch = next(pq.ParquetFile(mirror / TEST_SHARD).iter_batches(batch_size=3, columns=["img"]))
    paths = []
    for index, row in enumerate(batch.column("img").to_pylist()):
        paths.append(tmp_path / f"cifar10_test_{index}.png")
        paths[-1].write_bytes(row["bytes"])

    with model_server(model_dir, tmp_path / "server.log") as url:
        expected = {}
        for path in paths:
            response = httpx.post(
                f"{url}/predict", files={"files": (path.name, path.read_bytes(), "image/png")}
            )
            assert response.status_code == 200, response.text
            expected[path.name] = response.json()["predictions"][0]["label"]

        driver.get(url + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "model-info").text.startswith("Model "))
        # Choosing files through the input is what dropping them does: both call the same handler.
        driver.find_element(By.ID, "file-input").send_keys("\n".join(str(p) for p in paths))

        def finished(d) -> bool:
            cards = d.find_elements(By.CSS_SELECTOR, ".card")
            errors = [c.text for c in cards if c.get_attribute("data-state") == "error"]
            assert not errors, f"the page shows an error: {errors}"
            return len(cards) == len(paths) and all(c.get_attribute("data-state") == "done" for c in cards)

        wait.until(finished)
        shown = {}
        for card in driver.find_elements(By.CSS_SELECTOR, ".card"):
            name = card.find_element(By.CSS_SELECTOR, ".filename").text
            shown[name] = card.find_element(By.CSS_SELECTOR, ".prediction-label").text
            assert len(card.find_elements(By.CSS_SELECTOR, ".bars li")) == 10
            assert card.find_element(By.CSS_SELECTOR, ".preview img").get_attribute("naturalWidth") == "32"
        assert shown == expected
        assert "3 classified" in driver.find_element(By.ID, "status").text

        screenshot = tmp_path / "serve_page.png"
        assert driver.save_screenshot(str(screenshot))

        # A bad file gets its own card with the server's explanation; the earlier results stay.
        bad = tmp_path / "not_an_image.png"
        bad.write_bytes(b"this is text, not a PNG")
        driver.find_element(By.ID, "file-input").send_keys(str(bad))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '.card[data-state="error"]'))
        error = driver.find_element(By.CSS_SELECTOR, '.card[data-state="error"] .error').text
        assert error.startswith("400") and "not a readable image" in error
        assert len(driver.find_elements(By.CSS_SELECTOR, '.card[data-state="done"]')) == len(paths)
    assert screenshot.stat().st_size > 10_000
    # Tests write to temporary folders only: the committed screenshot (docs/serving.md shows it) stays as is.
    assert _committed_reports() == reports_before
