"""The release form of tests/integration/test_team_concurrency.py: eight writers at once (`make test` runs
three) against one real team server, through the evaluate stage's tracking and registry path. The form of
eight whole `dvc exp run` pipelines is benchmarks/team_concurrency.py's (records/team_concurrency.json)."""

from __future__ import annotations

import pytest

from ..integration.test_team_concurrency import check_writers, team  # noqa: F401 (team: the fixture)
from ..integration.test_team_server import Team

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_eight_writers_at_once_lose_nothing(team: Team, tmp_path_factory: pytest.TempPathFactory) -> None:  # noqa: F811
    check_writers(team, tmp_path_factory.mktemp("writers"), 8)
