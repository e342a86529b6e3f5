"""Concurrent writers on one real team server (PostgreSQL, SeaweedFS, MLflow on free loopback ports).

Three writers at once here (`make test`; tests/release/test_team_writers.py runs eight, `make
test-release`), each from its own folder, each running the evaluate stage's tracking and registry path
for real (benchmarks/team_concurrency.py's ``registration`` form: the stage harness's parent and child runs,
a metric history, an artifact, ``log_and_register`` of a small saved model): every run FINISHED, every
metric and artifact there, versions 1..N without gaps, ``champion`` on the most accurate version, all
within a deadline (no deadlock). The full form, eight tiny ``dvc exp run`` pipelines, is the benchmark's
(records/team_concurrency.json): on 2 cores it takes minutes.

And the lost update behind the champion check, made deterministic: a writer that read "no champion" before
another writer's better version took the alias, moving the alias last.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.team_concurrency import concurrent_writers

from ..support.helpers import save_tiny_convnet
from .team_stack import logged_in, team_stack
from .test_team_server import Team, tracking_at

pytestmark = [pytest.mark.integration, pytest.mark.slow]

WRITERS = 3  # enough for the races (experiment creation, versions, the alias); the release form runs 8
DEADLINE_S = 300  # all together; a deadlock shows as writers killed at the deadline


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    # The in-process clients log in as the editor `team_stack` made; the writers get its login too.
    with team_stack("team-concurrency-") as started, logged_in(started):
        yield started


def check_writers(team: Team, base: Path, writers: int) -> None:
    """``writers`` writers at once through the stage's tracking and registry path: nothing lost."""
    result = concurrent_writers(team.tracking_uri, team.login(), base, writers, "registration", DEADLINE_S)
    print(f"{writers} writers: {result['wall_seconds']} s, {result['runs_per_minute']} runs/min")
    assert result["problems"] == [], "\n".join(result["problems"])
    assert result["versions"] == list(range(1, writers + 1))
    assert result["runs"] == 2 * writers  # a parent and an evaluate run each


def test_writers_at_once_lose_nothing(team: Team, tmp_path_factory: pytest.TempPathFactory) -> None:
    check_writers(team, tmp_path_factory.mktemp("writers"), WRITERS)


def test_a_champion_moved_on_a_stale_read_is_settled(
    team: Team, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from cifar10_pipeline.tracking import model_registry as registry

    name = "cifar10-settle-test"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team.tracking_uri)
    model_dir = save_tiny_convnet(tmp_path / "model")
    with tracking_at(team.tracking_uri):
        client = MlflowClient()
        experiment = client.create_experiment("settle-test")

        def register(accuracy: float) -> dict:
            run = client.create_run(experiment)
            return registry.log_and_register(
                run.info.run_id, model_dir, name, np.zeros((2, 32, 32, 3), np.uint8), np.full((2, 10), 0.1),
                accuracy=accuracy, test_set="T", evaluate_champion=lambda uri: pytest.fail(uri),
            )  # fmt: skip

        better = register(0.9)
        assert better["promoted"] and better["champion_version"] == better["version"]
        # The worse writer read the alias before the better one moved it: no champion, as removing it shows.
        client.delete_registered_model_alias(name, registry.CHAMPION)
        worse = register(0.5)
        assert worse["promoted"]  # it moved the alias, on what it read
        champion = client.get_model_version_by_alias(name, registry.CHAMPION)
        assert str(champion.version) == better["version"] == worse["champion_version"]
