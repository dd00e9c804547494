"""``manage.py replay`` argument checks that need no services."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from workers.replay_cli import register


@pytest.fixture
def cli() -> click.Group:
    group = click.Group("manage.py")
    register(group)
    return group


@pytest.mark.parametrize("days", ["401", "10000", "20000"])
def test_days_is_capped_like_the_api(cli: click.Group, tmp_path: Path, days: str) -> None:
    # an unreachable Redis proves the cap is checked before anything is requested
    env = {"RULES_DATA_DIR": str(tmp_path), "RULES_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = CliRunner().invoke(cli, ["replay", "aud", "--days", days], env=env)
    assert result.exit_code == 2
    assert f"error: --days {days}: at most 400 (RULES_DAY_RETENTION_DAYS)" in result.stderr
    lower = CliRunner().invoke(cli, ["replay", "aud", "--days", "5"],
                               env={**env, "RULES_DAY_RETENTION_DAYS": "3"})
    assert lower.exit_code == 2 and "--days 5: at most 3" in lower.stderr
