"""The release form of tests/integration/test_team_faults.py's mid-stage faults: the S3 gateway killed with
SIGKILL while a real stage runs (about 50 s: the MLflow server retries the gateway before each 500). `make
test` keeps the MLflow server and its PostgreSQL killed mid-stage, the same path through the stage harness."""

from __future__ import annotations

from pathlib import Path

import pytest

from ..integration.test_team_faults import (  # noqa: F401 (clone, stack: the fixtures)
    check_offline_then_synced,
    clone,
    kill_group,
    stack,
    stage_with_fault,
)
from ..integration.test_team_server import Team

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_s3_gateway_killed_mid_stage(stack: Team, clone: Path, tmp_path: Path) -> None:  # noqa: F811
    result = stage_with_fault(stack, clone, "fault-s3", lambda: kill_group(stack.home / "seaweedfs.pid"))
    # The artifact upload fails: the MLflow server retries the S3 gateway (boto3's retries) before it
    # answers 500, so each of the client's tries takes seconds; the bound holds all the same.
    check_offline_then_synced(stack, clone, "fault-s3", result, tmp_path)
