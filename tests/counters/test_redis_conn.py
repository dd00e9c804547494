"""connect_redis: RULES_REDIS_URL, else one embedded redis-server per DATA_DIR shared by processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from rules_service.config import Settings, load_settings
from rules_service.redis_conn import (
    _alive,
    connect_redis,
    embedded_redis_dir,
    embedded_redis_running,
    stop_embedded_redis,
)
from rules_service.redis_conn import (
    redis_url as url_of,
)

pytestmark = pytest.mark.redis

CHILD = textwrap.dedent(
    """
    import sys
    from rules_service.config import load_settings
    from rules_service.redis_conn import connect_redis
    client = connect_redis(load_settings({"DATA_DIR": sys.argv[1]}, environ={}))
    client.incr("shared")
    print(client.info("server")["process_id"])
    """
)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    s = load_settings({"DATA_DIR": str(tmp_path / "data")}, environ={})
    yield s
    stop_embedded_redis(s)


def test_starts_reuses_and_stops(settings: Settings) -> None:
    assert not embedded_redis_running(settings)
    client = connect_redis(settings)
    client.set("k", "v")
    pid = client.info("server")["process_id"]
    assert embedded_redis_running(settings)
    assert (embedded_redis_dir(settings) / "redis.pid").read_text().strip() == str(pid)

    # a second call in this process and one from another process reuse the same server
    assert connect_redis(settings).get("k") == b"v"
    out = subprocess.run([sys.executable, "-c", CHILD, str(settings.DATA_DIR)], capture_output=True, text=True,
                         check=True, timeout=60)
    assert int(out.stdout.strip()) == pid
    assert client.get("shared") == b"1"  # and the child exiting did not stop it
    assert connect_redis(settings).ping()
    assert url_of(settings).startswith("unix://")
    client.close()

    assert stop_embedded_redis(settings)
    assert not embedded_redis_running(settings)
    assert not stop_embedded_redis(settings)
    assert not _alive(pid)  # gone (or a zombie waiting for init to reap it)


def test_the_embedded_server_has_the_counters_tuning(settings: Settings) -> None:
    from rules_service.redis_conn import TUNING

    client = connect_redis(settings)
    assert client.config_get("hll-sparse-max-bytes") == {"hll-sparse-max-bytes": "1000"}
    assert client.config_get("auto-aof-rewrite-percentage") == {"auto-aof-rewrite-percentage": "400"}
    assert client.config_get("auto-aof-rewrite-min-size") == {"auto-aof-rewrite-min-size": str(512 * 2**20)}
    assert "--hll-sparse-max-bytes" in TUNING
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    client.close()


def test_data_survives_a_restart(settings: Settings) -> None:
    connect_redis(settings).hset("o:stream", "bids:0", 42)
    assert stop_embedded_redis(settings)
    assert connect_redis(settings).hget("o:stream", "bids:0") == b"42"


def test_concurrent_first_calls_start_one_server(settings: Settings) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(settings.DATA_DIR)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    pids = {int(p.communicate(timeout=60)[0].strip()) for p in procs}
    assert len(pids) == 1
    assert connect_redis(settings).get("shared") == b"4"


def test_long_data_dir_uses_a_short_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    s = load_settings({"DATA_DIR": str(deep)}, environ={})
    try:
        assert connect_redis(s).ping()
        assert url_of(s).startswith("unix:///")
        assert len(url_of(s)) < 120
    finally:
        stop_embedded_redis(s)


def test_redis_url_wins(redis_url: str, tmp_path: Path) -> None:
    s = load_settings({"DATA_DIR": str(tmp_path), "REDIS_URL": redis_url}, environ={})
    assert connect_redis(s).ping()
    assert not (tmp_path / "redis").exists()


def test_cli_redis_status_and_stop(settings: Settings) -> None:
    import json

    from click.testing import CliRunner

    from rules_service.cli import COMMAND_MODULES
    from rules_service.cli_redis import redis_group

    assert "rules_service.cli_redis" in COMMAND_MODULES
    env = {"RULES_DATA_DIR": str(settings.DATA_DIR), "RULES_REDIS_URL": ""}
    runner = CliRunner()
    status = json.loads(runner.invoke(redis_group, ["status"], env=env).stdout)
    assert status["running"] is False and status["pid"] is None
    assert not embedded_redis_running(settings)  # status never starts it

    pid = connect_redis(settings).info("server")["process_id"]
    status = json.loads(runner.invoke(redis_group, ["status"], env=env).stdout)
    assert status == {"embedded": True, "running": True, "pid": pid,
                      "socket": str(embedded_redis_dir(settings) / "redis.sock"),
                      "data_dir": str(Path(settings.DATA_DIR).resolve())}

    stopped = runner.invoke(redis_group, ["stop"], env=env)
    assert stopped.exit_code == 0 and json.loads(stopped.stdout)["stopped"] is True
    assert not embedded_redis_running(settings) and not _alive(pid)
    again = runner.invoke(redis_group, ["stop"], env=env)  # idempotent
    assert again.exit_code == 0 and json.loads(again.stdout)["stopped"] is False
    assert "not running" in again.stderr

    external = {**env, "RULES_REDIS_URL": "redis://127.0.0.1:1/0"}
    message = runner.invoke(redis_group, ["stop"], env=external)
    assert message.exit_code == 0 and "nothing embedded to stop" in message.stderr
    assert json.loads(runner.invoke(redis_group, ["status"], env=external).stdout)["embedded"] is False


def test_the_compose_redis_runs_with_the_same_tuning() -> None:
    """docker/docker-compose.yml's redis is the production stack's counters store: same settings."""
    from rules_service.redis_conn import TUNING

    compose = (Path(__file__).resolve().parents[2] / "docker" / "docker-compose.yml").read_text()
    command = next(line for line in compose.splitlines() if "redis-server" in line and "command" in line)
    following = compose[compose.index(command):].split("volumes:")[0]
    for arg in TUNING:
        assert f'"{arg}"' in following, arg
