"""Experiments: every knob settable with ``dvc exp run -S``, and a real sweep seen by DVC and by MLflow.

Fast: each leaf key of params.yaml is changed through the function ``dvc exp run -S`` composes params.yaml
with (DVC's Hydra composition, ``dvc.utils.hydra.compose_and_dump``), alone and under every profile; the
explicit value must win, the result must pass ``cifar10_pipeline.core.params.validate_params``, and the
project's own ``compose`` (the benchmark's path) must give the same params.

Slow (integration, needs the CIFAR-10 mirror): a clone of the project runs a tiny sweep of named experiments
with ``dvc exp run``; ``dvc exp show`` must list them; a real ``mlflow server`` on that store must hold one
parent run per experiment, named after it, with its params and metrics (checked through the REST API); the
MLflow compare page for those runs, in headless Chromium, is saved to the test's temporary folder;
scripts/pr_report.sh must compare two of the experiments.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

from cifar10_pipeline.core.params import ParamsError, compose, validate_params
from tests.support.localserver import mlflow_server

from ..conftest import PROJECT_ROOT
from ..support.helpers import default_raw_params, headless_chrome, run_checked
from ..support.mirrors import SMALL_MIRROR_PARAMS

# ---------------------------------------------------------------------------------------------------------
# Every knob, through the same YAML edit as `dvc exp run -S key=value`
# ---------------------------------------------------------------------------------------------------------

# A valid value, different from the committed one, for each leaf key: the text after `-S key=` (its YAML
# reading is the value the key must end up with).
CHANGED: dict[str, str] = {
    "profile": "quick",
    "download.sources": "[hub,url]",
    "download.mirror_dir": "/srv/data/cifar10",
    "download.hub_repo": "someone/cifar10-copy",
    "download.hub_revision": "refs/convert/parquet",
    "download.url": "https://example.org/cifar-10-python.tar.gz",
    "download.url_md5": "0123456789abcdef0123456789abcdef",
    "validate.class_share_tolerance": "0.03",
    "validate.channel_stat_tolerance": "0.02",
    "validate.known_duplicates_train": "1",
    "validate.known_duplicates_test": "2",
    "validate.known_train_test_overlap": "3",
    "validate.train_images": "60000",
    "validate.test_images": "20000",
    "preprocess.seed": "7",
    "preprocess.val_size": "1000",
    "preprocess.max_train_images": "20000",
    "preprocess.max_test_images": "5000",
    "train.model": "google/vit-base-patch16-224-in21k",
    "train.seed": "3",
    "train.tta_fraction": "0.5",
    "train.device": "cpu",
    "train.epochs": "2.5",
    "train.batch_size": "512",
    "train.lr": "10.0",
    "train.momentum": "0.9",
    "train.weight_decay": "0.01",
    "train.bias_lr_scale": "32.0",
    "train.label_smoothing": "0.1",
    "train.warmup_fraction": "0.1",
    "train.final_lr_fraction": "0.0",
    "train.whiten_bias_epochs": "2",
    "train.lookahead": "false",
    "train.translate": "4",
    "train.flip": "false",
    "train.tta_level": "1",
    "train.precision": "fp32",
    "train.compile": "default",
    "train.cuda_graphs": "true",
    "train.cutout": "12",
    "train.widths": "[32,128,128]",
    "train.extra_convs": "2",
    "train.adamw_lr": "0.001",
    "train.adamw_weight_decay": "0.1",
    "train.vit_dim": "384",
    "train.vit_depth": "8",
    "train.vit_heads": "8",
    "train.vit_mlp_ratio": "4.0",
    "train.finetune_image_size": "160",
    "train.nproc": "2",
    "train.checkpoint_every": "3",
    "train.resume": "false",
    "evaluate.batch_size": "500",
    "evaluate.device": "cpu",
    "evaluate.precision": "fp32",
    "evaluate.robustness_images": "300",
    "evaluate.calibration_bins": "10",
    "evaluate.gallery_per_class": "2",
    "emissions.country_iso_code": "FRA",
    "mlflow.experiment": "cifar10-sweep",
    "mlflow.registered_model": "cifar10-candidate",
    "train.head_lr_scale": "2.0",
    "train.filter_optimizer": "muon",
    "train.muon_lr": "0.3",
    "train.muon_momentum": "0.7",
    "tracking.required": "false",
}
# Second choices, for profile overrides that already hold the CHANGED value.
ALTERNATIVE: dict[str, str] = {
    "train.cuda_graphs": "false",
    "train.batch_size": "768",
    "train.final_lr_fraction": "0.05",
    "train.label_smoothing": "0.15",
    "train.translate": "3",
    "train.cutout": "16",
    "train.compile": "max-autotune-no-cudagraphs",
    "train.filter_optimizer": "sgd",
    "train.lookahead": "true",
    "train.model": "cifar_vit",
    "train.warmup_fraction": "0.2",
    "evaluate.batch_size": "250",
}


def leaf_keys(raw: dict) -> list[str]:
    """``section.key`` for every knob (lists are single knobs), ``key`` for top-level scalars."""
    keys = []
    for name, value in raw.items():
        keys += [f"{name}.{key}" for key in value] if isinstance(value, dict) else [name]
    return keys


PROFILES = sorted(path.stem for path in (PROJECT_ROOT / "conf" / "profile").glob("*.yaml"))


def profile_keys() -> list[str]:
    """``<profile>:<section>.<key>`` for every value a profile sets (its name aside)."""
    keys = []
    for name in PROFILES:
        profile = yaml.safe_load((PROJECT_ROOT / "conf" / "profile" / f"{name}.yaml").read_text()) or {}
        keys += [f"{name}:{key}" for key in leaf_keys(profile) if key != "profile"]
    return keys


def set_params(tmp_path: Path, *overrides: str) -> dict:
    """params.yaml as ``dvc exp run -S <override> ...`` writes it (DVC's own Hydra composition of conf/)."""
    from dvc.utils.hydra import compose_and_dump

    path = tmp_path / "params.yaml"
    compose_and_dump(path, str(PROJECT_ROOT / "conf"), None, "config", str(PROJECT_ROOT), list(overrides))
    raw = yaml.safe_load(path.read_text())
    # The benchmark resolves params through cifar10_pipeline.core.params.compose: the same values.
    assert compose(overrides, PROJECT_ROOT / "conf") == raw
    return raw


def effective(params, dotted: str) -> Any:
    if "." not in dotted:
        return getattr(params, dotted)
    section, key = dotted.split(".")
    return params.model_dump(by_alias=True)[section][key]


# A class: a unit of its own under `make test` (xdist loadscope), so these hundred quick cases run on the
# other worker while this module's sweep runs, instead of after it on the same one.
class TestEveryKnobThroughDvcSet:
    def test_committed_params_yaml_is_what_conf_composes(self) -> None:
        # Plain `dvc repro` reads params.yaml as committed: it must be conf/'s default composition, byte for
        # byte (as `dvc exp run` would write it), holding resolved values only.
        from cifar10_pipeline.core.params import composed_yaml

        committed = (PROJECT_ROOT / "params.yaml").read_text()
        assert committed == composed_yaml([], PROJECT_ROOT / "conf"), (
            "params.yaml is not what conf/ composes: run `python -m cifar10_pipeline.core.params` and commit"
        )
        assert "profiles" not in yaml.safe_load(committed)

    def test_every_knob_has_a_changed_value(self) -> None:
        keys = leaf_keys(default_raw_params())
        assert set(keys) == set(CHANGED), (
            "params.yaml and CHANGED disagree: give every new knob a valid changed value here "
            f"(missing {sorted(set(keys) - set(CHANGED))}, stale {sorted(set(CHANGED) - set(keys))})"
        )

    @pytest.mark.parametrize("key", leaf_keys(default_raw_params()))
    def test_dvc_set_param_reaches_every_knob(self, key: str, tmp_path: Path) -> None:
        if key not in CHANGED:
            pytest.fail(f"{key} is new in params.yaml: add a valid changed value for it to CHANGED")
        text = CHANGED[key]
        raw_before = default_raw_params()
        value = yaml.safe_load(text)
        section, _, name = key.rpartition(".")
        current = raw_before[section][name] if section else raw_before[name]
        assert current != value, f"{key}: pick a value that differs from the committed {current!r}"
        params = validate_params(
            set_params(tmp_path, f"{key}={text}"), source=f"params.yaml after -S {key}={text}"
        )
        assert effective(params, key) == value

    @pytest.mark.parametrize("key", profile_keys())
    def test_an_explicit_set_param_wins_over_every_profile_value(self, key: str, tmp_path: Path) -> None:
        profile, dotted = key.split(":")
        profile_value = compose([f"profile={profile}"], PROJECT_ROOT / "conf")
        section, name = dotted.split(".")
        current = profile_value[section][name]
        text = CHANGED[dotted] if yaml.safe_load(CHANGED[dotted]) != current else ALTERNATIVE[dotted]
        assert current != yaml.safe_load(text), f"{key}: CHANGED holds the profile's own value {current!r}"
        # Whatever the order on the command line, the explicit value wins and the profile's other values stay.
        for overrides in (
            [f"profile={profile}", f"{dotted}={text}"],
            [f"{dotted}={text}", f"profile={profile}"],
        ):
            params = validate_params(
                set_params(tmp_path, *overrides), source=f"params.yaml after -S {overrides}"
            )
            assert effective(params, dotted) == yaml.safe_load(text), overrides
            assert params.profile == profile

    def test_dvc_set_param_refuses_a_typo_and_validation_refuses_a_bad_value(self, tmp_path: Path) -> None:
        from hydra.errors import ConfigCompositionException

        with pytest.raises(ConfigCompositionException, match=r"train\.epoch"):
            set_params(tmp_path, "train.epoch=3")  # not a key of conf/config.yaml: Hydra itself refuses it
        with pytest.raises(ParamsError, match=r"Could not override 'train\.epoch'"):
            compose(["train.epoch=3"], PROJECT_ROOT / "conf")
        with pytest.raises(ParamsError, match=r"profile=NAME, NAME one of \[.*'quick'"):
            compose(["profile=quik"], PROJECT_ROOT / "conf")
        with pytest.raises(ParamsError, match=r"train\.tta_level"):
            validate_params(set_params(tmp_path, "train.tta_level=5"))


# ---------------------------------------------------------------------------------------------------------
# A real sweep in a clone, seen by DVC and by a real MLflow server and browser
# ---------------------------------------------------------------------------------------------------------

# Tiny runs of the quick profile: explicit -S values win over the profile's own.
TINY = {
    "profile": "quick",
    "preprocess.max_train_images": "1000",
    "preprocess.val_size": "100",
    "preprocess.max_test_images": "300",
    "train.epochs": "2",  # two points per training curve in the PR report
    # A narrow net: the sweep checks what DVC and MLflow record, not accuracy; the quick profile's full
    # widths made train and evaluate most of each experiment's minute on 2 cores.
    "train.widths": "[16,32,32]",
    "evaluate.robustness_images": "100",
    "download.sources": "[mirror]",
}
SWEEP = {"tiny-seed-1": 1, "tiny-seed-2": 2}  # experiment name -> train.seed
EXPERIMENT_TIMEOUT_S = 300
MLFLOW_EXPERIMENT = "cifar10"
# The stages that log an MLflow run: every stage (the harness opens one for each).
LOGGING_STAGES = {"download", "validate", "preprocess", "train", "evaluate", "emissions", "model_card"}
# The committed reports/screenshots/mlflow_compare.png (docs/experiments.md) was taken this way; the test
# saves its own into its temporary folder and leaves the committed one alone.
SCREENSHOT_NAME = "mlflow_compare.png"
# The compare page's "Metrics:" picker of the parallel coordinates plot (MLflow 3.17's page).
METRICS_SELECT = "//*[normalize-space(text())='Metrics:']/following::input[@role='combobox'][1]"
PLOT_AXIS = "//*[name()='svg']//*[name()='text' and normalize-space(.)='{}']"  # a plotly axis title
PLOTTED_METRICS = ("val_accuracy", "test_accuracy", "test_f1_macro", "test_ece")


@dataclass
class Sweep:
    clone: Path
    env: dict[str, str]
    store_uri: str
    seconds: dict[str, float] = field(default_factory=dict)
    exp_show: list = field(default_factory=list)


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float, log: Path | None = None) -> str:
    """Run a command, fail with its output's tail if it fails or overruns; its stdout."""
    return run_checked(args, cwd, env, timeout, log).stdout


def dvc(*args: str, sweep: Sweep, timeout: float = 120) -> str:
    return run([sys.executable, "-m", "dvc", *args], sweep.clone, sweep.env, timeout)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, small_mirror: Path) -> Sweep:
    mirror = small_mirror
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    clone = tmp_path_factory.mktemp("experiments") / "clone"
    # The clone holds the committed files only, as CI's fresh checkout does.
    subprocess.run(["git", "clone", "--quiet", str(PROJECT_ROOT), str(clone)], check=True, timeout=120)
    for key, value in (("user.name", "experiments test"), ("user.email", "experiments-test@localhost")):
        subprocess.run(["git", "config", key, value], cwd=clone, check=True, timeout=30)
    store_uri = f"sqlite:///{clone / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "GIT_"))}
    env.update(
        # Stage commands are `python -m ...`: this interpreter, importing the clone's code.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(clone / "src"),
        MLFLOW_TRACKING_URI=store_uri,
        MPLBACKEND="Agg",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
    )
    result = Sweep(clone, env, store_uri)
    settings = [arg for key, value in TINY.items() for arg in ("-S", f"{key}={value}")]
    settings += ["-S", f"download.mirror_dir={mirror}"]  # the small real mirror (tests/support/mirrors.py)
    settings += [arg for override in SMALL_MIRROR_PARAMS for arg in ("-S", override)]
    # One after the other in the workspace: on 2 cores parallel queue workers would only fight for them.
    for name, seed in SWEEP.items():
        started = time.monotonic()
        run(
            [sys.executable, "-m", "dvc", "exp", "run", *settings, "-S", f"train.seed={seed}", "-n", name],
            clone,
            env,
            EXPERIMENT_TIMEOUT_S,
            log=clone.parent / f"{name}.log",
        )
        result.seconds[name] = time.monotonic() - started
    timings = {name: round(seconds, 1) for name, seconds in result.seconds.items()}
    print(f"sweep timings (s): {timings}")
    result.exp_show = json.loads(dvc("exp", "show", "--json", sweep=result))
    return result


def experiments_in(exp_show: list) -> dict[str, dict]:
    """name -> data of each experiment in ``dvc exp show --json`` (DVC 3: baselines hold ``experiments``)."""
    found = {}
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                if rev.get("name"):
                    found[rev["name"]] = rev.get("data") or {}
    return found


@pytest.mark.slow
@pytest.mark.integration
def test_dvc_exp_show_lists_the_sweep(sweep: Sweep) -> None:
    experiments = experiments_in(sweep.exp_show)
    assert set(SWEEP) <= set(experiments), f"dvc exp show lists {sorted(experiments)}"
    for name, seed in SWEEP.items():
        data = experiments[name]
        params = data["params"]["params.yaml"]["data"]
        assert params["train"]["seed"] == seed
        assert params["profile"] == "quick"
        assert params["preprocess"]["max_train_images"] == 1000  # -S beat the profile's 5000
        evaluation = data["metrics"]["metrics/eval.json"]["data"]
        assert evaluation["test_images"] == 300
        assert 0.0 < evaluation["accuracy"] <= 1.0
    assert sweep.seconds, "no experiment ran"


@pytest.fixture(scope="module")
def server(sweep: Sweep) -> Iterator[str]:
    with mlflow_server(sweep.store_uri, sweep.clone, sweep.clone.parent / "mlflow_server.log") as url:
        yield url


def parent_runs(url: str) -> tuple[str, dict[str, dict]]:
    """The experiment id and run name -> run of every pipeline (parent) run, through the REST API."""
    response = httpx.get(
        f"{url}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": MLFLOW_EXPERIMENT},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    experiment_id = response.json()["experiment"]["experiment_id"]
    response = httpx.post(
        f"{url}/api/2.0/mlflow/runs/search",
        json={
            "experiment_ids": [experiment_id],
            "filter": "tags.`pipeline.role` = 'pipeline'",
            "max_results": 100,
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    runs = response.json().get("runs", [])
    names = [run["info"]["run_name"] for run in runs]
    assert len(names) == len(set(names)), f"duplicate parent runs: {names}"
    return experiment_id, {run["info"]["run_name"]: run for run in runs}


def as_dict(entries: list[dict]) -> dict[str, Any]:
    return {entry["key"]: entry["value"] for entry in entries}


@pytest.mark.slow
@pytest.mark.integration
def test_each_experiment_is_an_mlflow_parent_run(sweep: Sweep, server: str) -> None:
    experiment_id, parents = parent_runs(server)
    dvc_experiments = experiments_in(sweep.exp_show)
    for name, seed in SWEEP.items():
        assert name in parents, f"no MLflow parent run named {name!r}: {sorted(parents)}"
        run = parents[name]
        tags = as_dict(run["data"].get("tags", []))
        assert tags["pipeline.role"] == "pipeline" and tags["pipeline.key"] == name
        params = as_dict(run["data"].get("params", []))
        assert params["train.seed"] == str(seed)
        assert params["profile"] == "quick"
        # The effective values: the tiny overrides reached the stages.
        assert params["preprocess.max_train_images"] == "1000"
        assert params["train.epochs"] == "2.0"
        metrics = as_dict(run["data"].get("metrics", []))
        dvc_accuracy = dvc_experiments[name]["metrics"]["metrics/eval.json"]["data"]["accuracy"]
        assert metrics["test_accuracy"] == pytest.approx(dvc_accuracy)
        assert "test_f1_macro" in metrics
        response = httpx.post(
            f"{server}/api/2.0/mlflow/runs/search",
            json={
                "experiment_ids": [experiment_id],
                "filter": f"tags.`mlflow.parentRunId` = '{run['info']['run_id']}'",
                "max_results": 100,
            },
            timeout=30,
        )
        assert response.status_code == 200, response.text
        stages = {as_dict(child["data"]["tags"])["stage"] for child in response.json().get("runs", [])}
        # One child per stage DVC ran, and DVC reruns only what a change invalidates: the first experiment's
        # tiny subset reruns preprocess; a seed change reruns train and what follows it.
        expected = {"train", "evaluate", "emissions"}
        if name == next(iter(SWEEP)):
            expected.add("preprocess")
        assert expected <= stages <= LOGGING_STAGES, f"{name}: stage runs {sorted(stages)}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chrome("1600,1000") as chrome:  # wide enough for the compare table's columns
        yield chrome


@pytest.mark.slow
@pytest.mark.integration
def test_mlflow_compare_page_shows_the_sweep(sweep: Sweep, server: str, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    experiment_id, parents = parent_runs(server)
    run_ids = [parents[name]["info"]["run_id"] for name in SWEEP]
    # The UI's own compare link (mlflow/server/js: getCompareRunPageRoute, a hash route).
    url = (
        f"{server}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
        f"&experiments={quote(json.dumps([experiment_id]))}"
    )
    browser.get(url)
    body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    wait = WebDriverWait(browser, 90)
    wait.until(lambda d: f"Comparing {len(SWEEP)} Runs" in body(d) and all(name in body(d) for name in SWEEP))

    # For the screenshot: close the assistant panel (a third of the width), plot the seed against the
    # headline metrics (the page preselects an arbitrary one), list only the params that differ.
    for button in browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
    metrics = browser.find_element(By.XPATH, METRICS_SELECT)
    picker = metrics.find_element(By.XPATH, "./ancestor::div[contains(@class, '-select ')][1]")
    for remove in picker.find_elements(By.CSS_SELECTOR, "[class$='-select-selection-item-remove']"):
        remove.click()
    picker.click()
    for metric in PLOTTED_METRICS:
        metrics.send_keys(metric)
        wait.until(lambda d, m=metric: d.find_elements(By.CSS_SELECTOR, f"[title='{m}']"))
        metrics.send_keys(Keys.ENTER)
    metrics.send_keys(Keys.ESCAPE)
    for metric in PLOTTED_METRICS:
        wait.until(lambda d, m=metric: d.find_elements(By.XPATH, PLOT_AXIS.format(m)))
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Parameters - Show diff only']").click()
    wait.until(lambda d: "train.seed" in body(d) and "train.lr" not in body(d))
    title = browser.find_element(By.XPATH, "//h2[starts-with(normalize-space(.), 'Comparing ')]")
    # Back to the top of the page's scrolling panel (the switch scrolled it), breadcrumb included.
    browser.execute_script(
        "let e = arguments[0];"
        "while (e && !(e.scrollHeight > e.clientHeight && e.scrollTop > 0)) e = e.parentElement;"
        "if (e) e.scrollTop = 0;",
        title,
    )
    time.sleep(1)  # let the plot settle after the scroll

    screenshot = tmp_path / SCREENSHOT_NAME
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.integration
def test_pr_report_compares_two_experiments(sweep: Sweep) -> None:
    first, second = list(SWEEP)[:2]
    # The first experiment becomes the base commit, the second the workspace: a PR's situation.
    dvc("exp", "apply", first, sweep=sweep)
    # MLflow's local artifacts stay out of the commit, whatever the committed .gitignore says.
    with open(sweep.clone / ".git" / "info" / "exclude", "a") as exclude:
        exclude.write("\n/mlruns/\n/mlartifacts/\n/mlflow.db\n")
    run(["git", "add", "-A"], sweep.clone, sweep.env, 60)
    run(["git", "commit", "--quiet", "-m", f"results of {first}"], sweep.clone, sweep.env, 60)
    dvc("exp", "apply", second, sweep=sweep)
    # The working tree's script (the one under test), run in the clone.
    run([sys.executable, str(PROJECT_ROOT / "scripts" / "pr_report.py"), "HEAD"], sweep.clone, sweep.env, 300)
    report = (sweep.clone / "pr_report" / "report.md").read_text()
    for heading in ("### Metrics", "### Params", "### Training curves", "### Confusion matrix", "### Plots"):
        assert heading in report
    assert "| metrics/eval.json" in report and "accuracy" in report  # dvc metrics diff --md table
    assert "train.seed" in report  # dvc params diff --md: the seed is what changed
    assert report.count("```mermaid") == 2 and "grey: `HEAD`" in report
    assert "300 test images" in report and "Δ recall" in report
    static = sweep.clone / "pr_report" / "plots" / "static"
    assert (sweep.clone / "pr_report" / "plots" / "index.html").is_file()
    assert any(p.name.endswith("confusion_matrix.png") for p in static.glob("*.png"))
