"""The Kafka backend (kafka-python), for a modern broker (version negotiated) or an old one.

Choose it with ``RULES_LOG_URL=kafka://host:9092[,host2:9092][?api_version=0.9]`` (see
``workers.log.factory``). Notes per broker generation:

* Modern brokers (>= 0.10.1; topic admin needs >= 0.10): topics are created through
  ``KafkaAdminClient`` with their partitions and ``cleanup.policy``/``retention.ms``/``segment.ms``/
  ``min.cleanable.dirty.ratio``; message timestamps are stored and ``seek_to_time`` works.
* Kafka 0.9 (``api_version=0.9``): the protocol has no CreateTopics, no DescribeConfigs, no
  timestamps. :meth:`KafkaLog.create_topic` raises :class:`UnsupportedError` saying how to create
  the topic with ``kafka.admin.TopicCommand --zookeeper``; :meth:`KafkaLog.describe_topic` knows
  only the partition count (the policy fields are reported as the defaults); every
  :class:`Record` has ``timestamp_ms == -1`` (Kafka's "no timestamp"), the consumer must take
  time from the message payload; ``seek_to_time`` raises :class:`UnsupportedError`.

Placement: the producer computes every partition itself with the port's ``partition_for`` (it
is also handed to kafka-python as the partitioner), so a key lands in the same partition as on
the embedded log. Unkeyed messages go round-robin.

Replays: :meth:`KafkaLog.scan_compacted` is the port's default, since no cleaner checkpoint is
visible to clients: two passes per partition through a consumer (first the last offset of every
key, kept as 16-byte BLAKE2b digests and offsets in arrays: 24 bytes per record of the partition,
~60 at the sort's peak; then the records at those offsets), so each key appears once with its
latest record whether or not the broker's cleaner has run. The topic is fetched twice, plus
~0.5 us of hashing and ~0.25 us of sorting per record. 10 million records in one partition need
~600 MB at the peak; spread over P partitions, 1/P of it (one partition at a time).

Durability: the producer uses ``acks='all'``; :meth:`KafkaProducer.send_batch` sends everything,
flushes, then checks every future, so it returns only once the broker acknowledged each message.
Consumer-group offsets are committed only when the caller calls :meth:`KafkaConsumer.commit`
(auto-commit is off), through the group coordinator (works on 0.9 with manual assignment).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from workers.log.port import (
    Consumer,
    Log,
    LogError,
    LogUnavailableError,
    Message,
    Producer,
    Record,
    TopicExistsError,
    TopicNotFoundError,
    TopicPartition,
    TopicSpec,
    UnsupportedError,
    partition_for,
)

__all__ = ["KafkaConsumer", "KafkaLog", "KafkaProducer"]

_INTERNAL_TOPICS = {"__consumer_offsets"}


def _kafka_partitioner(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """kafka-python partitioner using the port's placement (send_batch passes explicit
    partitions anyway; this keeps any other send path consistent)."""
    if key is None:
        return (available or all_partitions)[0]
    return all_partitions[partition_for(key, len(all_partitions))]


def _ktp(tp: TopicPartition | tuple[str, int]) -> Any:
    from kafka import TopicPartition as KTopicPartition

    return KTopicPartition(tp[0], int(tp[1]))


def _unavailable(what: str, exc: BaseException) -> LogUnavailableError:
    return LogUnavailableError(f"{what}: {type(exc).__name__}: {exc}")


class KafkaLog(Log):
    """Kafka through kafka-python. ``api_version``: e.g. ``(0, 9)`` for an old broker; None to
    negotiate. Clients are created lazily (nothing connects at construction)."""

    def __init__(self, bootstrap_servers: str | Sequence[str], *, api_version: tuple[int, ...] | None = None,
                 client_id: str = "audience-rules", replication_factor: int = 1,
                 request_timeout_ms: int = 30_000) -> None:
        self.bootstrap_servers = [bootstrap_servers] if isinstance(bootstrap_servers, str) else list(bootstrap_servers)
        self.api_version = tuple(api_version) if api_version else None
        self.client_id = client_id
        self.replication_factor = replication_factor
        self.request_timeout_ms = request_timeout_ms
        self._meta_client: Any = None
        self._lock = threading.RLock()
        self._partition_counts: dict[str, int] = {}

    # -- plumbing ----------------------------------------------------------------------------
    def _common(self) -> dict[str, Any]:
        conf: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers, "client_id": self.client_id,
                                "request_timeout_ms": self.request_timeout_ms}
        if self.api_version is not None:
            conf["api_version"] = self.api_version
        else:  # negotiating must not outlast a request
            conf["bootstrap_timeout_ms"] = self.request_timeout_ms
        return conf

    def _meta(self) -> Any:
        """A group-less consumer used for metadata only."""
        if self._meta_client is None:
            from kafka import KafkaConsumer as KConsumer

            try:
                self._meta_client = KConsumer(**self._common(), enable_auto_commit=False)
            except Exception as exc:
                hint = "" if self.api_version else " (a broker older than 0.10 cannot negotiate: add ?api_version=0.9)"
                raise _unavailable(f"cannot reach Kafka at {self.bootstrap_servers}{hint}", exc) from exc
        return self._meta_client

    def _refresh_metadata(self) -> Any:
        """A metadata round trip for every topic, bounded by ``request_timeout_ms`` (kafka-python's
        own ``topics()`` waits forever when no broker answers). Returns the cluster metadata."""
        meta = self._meta()
        try:
            cluster = meta._cluster
            stash = cluster.need_all_topic_metadata
            cluster.need_all_topic_metadata = True
            try:
                future = cluster.request_update()
                meta._net.run(meta._manager.wait_for, future, self.request_timeout_ms)
            finally:
                cluster.need_all_topic_metadata = stash
        except AttributeError:  # kafka-python internals moved: fall back to the unbounded call
            meta.topics()
            cluster = meta._cluster
        return cluster

    def broker_version(self) -> tuple[int, ...]:
        """The configured ``api_version``, else the one negotiated with the broker."""
        if self.api_version is not None:
            return self.api_version
        with self._lock:
            return tuple(self._meta().config["api_version"])

    def is_old_broker(self) -> bool:
        """True for brokers before 0.10 (no topic admin, no timestamps)."""
        return self.broker_version() < (0, 10)

    def partition_count(self, topic: str, refresh: bool = False) -> int:
        """Partitions of ``topic``; raises TopicNotFoundError."""
        if not refresh and topic in self._partition_counts:
            return self._partition_counts[topic]
        with self._lock:
            try:
                parts = self._refresh_metadata().partitions_for_topic(topic)
            except LogError:
                raise
            except Exception as exc:
                raise _unavailable(f"reading metadata of {topic!r} from {self.bootstrap_servers}", exc) from exc
        if not parts:
            raise TopicNotFoundError(f"topic {topic!r} does not exist on {self.bootstrap_servers}")
        self._partition_counts[topic] = len(parts)
        return len(parts)

    # -- admin -------------------------------------------------------------------------------
    def create_topic(self, spec: TopicSpec, exist_ok: bool = True) -> None:
        if self.is_old_broker():
            if spec.name in self.list_topics():
                if exist_ok:
                    return
                raise TopicExistsError(f"topic {spec.name!r} already exists")
            configs = " ".join(f"--config {k}={v}" for k, v in _topic_configs(spec).items())
            raise UnsupportedError(
                f"Kafka {'.'.join(map(str, self.broker_version()))} cannot create topics through its protocol "
                f"(CreateTopics needs >= 0.10). Create {spec.name!r} with: java -cp 'kafka/libs/*' "
                f"kafka.admin.TopicCommand --zookeeper <zookeeper:2181> --create --topic {spec.name} "
                f"--partitions {spec.partitions} --replication-factor {self.replication_factor} {configs}".rstrip())
        from kafka.admin import KafkaAdminClient
        from kafka.errors import IncompatibleBrokerVersion, TopicAlreadyExistsError

        try:
            admin = KafkaAdminClient(**self._common())
        except Exception as exc:
            raise _unavailable(f"cannot reach Kafka at {self.bootstrap_servers}", exc) from exc
        try:
            admin.create_topics({spec.name: {"num_partitions": spec.partitions,
                                             "replication_factor": self.replication_factor,
                                             "configs": _topic_configs(spec)}},
                                wait_for_metadata=True)
        except TopicAlreadyExistsError:
            if not exist_ok:
                raise TopicExistsError(f"topic {spec.name!r} already exists") from None
        except IncompatibleBrokerVersion as exc:
            raise UnsupportedError(f"this broker cannot create topics ({exc}); use kafka.admin.TopicCommand") from exc
        except Exception as exc:
            raise _unavailable(f"creating topic {spec.name!r}", exc) from exc
        finally:
            admin.close()

    def describe_topic(self, name: str) -> TopicSpec:
        partitions = self.partition_count(name, refresh=True)
        if self.is_old_broker():
            return TopicSpec(name=name, partitions=partitions)
        from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

        try:
            admin = KafkaAdminClient(**self._common())
            try:
                result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name)], config_filter="all")
            finally:
                admin.close()
            configs = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in result["topic"][name].items()}
        except Exception as exc:
            raise _unavailable(f"describing topic {name!r}", exc) from exc
        policy = "compact" if "compact" in str(configs.get("cleanup.policy", "delete")) else "delete"
        retention = _int_or_none(configs.get("retention.ms"))
        return TopicSpec(name=name, partitions=partitions, cleanup_policy=policy,  # type: ignore[arg-type]
                         retention_ms=None if retention is not None and retention < 0 else retention,
                         segment_ms=_int_or_none(configs.get("segment.ms")),
                         min_cleanable_dirty_ratio=_float_or_none(configs.get("min.cleanable.dirty.ratio")))

    def list_topics(self) -> list[str]:
        with self._lock:
            try:
                topics = self._refresh_metadata().topics()
            except LogError:
                raise
            except Exception as exc:
                raise _unavailable("listing topics", exc) from exc
        return sorted(t for t in topics if t not in _INTERNAL_TOPICS)

    def producer(self) -> KafkaProducer:
        return KafkaProducer(self)

    def consumer(self, group_id: str | None,
                 auto_offset_reset: Literal["earliest", "latest"] = "earliest") -> KafkaConsumer:
        if auto_offset_reset not in ("earliest", "latest"):
            raise LogError(f"auto_offset_reset must be 'earliest' or 'latest', got {auto_offset_reset!r}")
        return KafkaConsumer(self, group_id, auto_offset_reset)

    def close(self) -> None:
        with self._lock:
            if self._meta_client is not None:
                self._meta_client.close()
                self._meta_client = None


def _topic_configs(spec: TopicSpec) -> dict[str, str]:
    configs: dict[str, str] = {"cleanup.policy": str(spec.cleanup_policy)}
    if spec.retention_ms is not None:
        configs["retention.ms"] = str(spec.retention_ms)
    if spec.segment_ms is not None:
        configs["segment.ms"] = str(spec.segment_ms)
    if spec.min_cleanable_dirty_ratio is not None:
        configs["min.cleanable.dirty.ratio"] = str(spec.min_cleanable_dirty_ratio)
    return configs


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class KafkaProducer(Producer):
    """``acks='all'``; ``send_batch`` waits for every acknowledgement. Thread-safe."""

    def __init__(self, log: KafkaLog) -> None:
        self._log = log
        self._client: Any = None
        self._round_robin: dict[str, itertools.count] = {}
        self._lock = threading.Lock()

    def _producer(self) -> Any:
        if self._client is None:
            from kafka import KafkaProducer as KProducer

            try:
                self._client = KProducer(**self._log._common(), acks="all", partitioner=_kafka_partitioner,
                                         linger_ms=5, retries=5, max_block_ms=self._log.request_timeout_ms,
                                         max_request_size=8 * 1024 * 1024)
            except Exception as exc:
                raise _unavailable(f"cannot reach Kafka at {self._log.bootstrap_servers}", exc) from exc
        return self._client

    def send_batch(self, topic: str, messages: Sequence[Message]) -> list[tuple[int, int]]:
        return self._send(topic, [(m.key, m.value, m.timestamp_ms, m.partition) for m in messages])

    def send_rows(self, topic: str, rows: Sequence[tuple[bytes | None, bytes | None, int | None]]
                  ) -> list[tuple[int, int]]:
        return self._send(topic, [(key, value, ts, None) for key, value, ts in rows])

    def _send(self, topic: str, messages: Sequence[tuple[bytes | None, bytes | None, int | None, int | None]]
              ) -> list[tuple[int, int]]:
        """Send (key, value, timestamp_ms, partition) rows; see send_batch."""
        if not messages:
            return []
        from kafka.errors import KafkaError, UnknownTopicOrPartitionError

        n = self._log.partition_count(topic)
        with self._lock:
            producer = self._producer()
            futures = []
            try:
                for i, (key, value, timestamp_ms, p) in enumerate(messages):
                    if p is None:
                        if key is not None:
                            p = partition_for(key, n)
                        else:
                            counter = self._round_robin.setdefault(topic, itertools.count())
                            p = next(counter) % n
                    elif not 0 <= p < n:
                        raise LogError(f"topic {topic!r} has {n} partitions; message {i} asks for partition {p}")
                    futures.append(producer.send(topic, value=value, key=key, partition=p,
                                                 timestamp_ms=timestamp_ms))
                producer.flush(timeout=self._log.request_timeout_ms / 1000)
                out = []
                for future in futures:
                    md = future.get(timeout=self._log.request_timeout_ms / 1000)
                    out.append((int(md.partition), int(md.offset)))
                return out
            except LogError:
                raise
            except UnknownTopicOrPartitionError as exc:
                raise TopicNotFoundError(f"topic {topic!r}: {exc}") from exc
            except KafkaError as exc:
                raise _unavailable(f"sending {len(messages)} messages to {topic!r} (not acknowledged)", exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.flush()
                self._client.close()
                self._client = None


class KafkaConsumer(Consumer):
    """A kafka-python consumer with manual assignment and explicit commits."""

    def __init__(self, log: KafkaLog, group_id: str | None, auto_offset_reset: str) -> None:
        from kafka import KafkaConsumer as KConsumer

        self._log = log
        self._group_id = group_id
        try:
            self._c = KConsumer(**log._common(), group_id=group_id, enable_auto_commit=False,
                                auto_offset_reset=auto_offset_reset, fetch_max_wait_ms=100,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
        except Exception as exc:
            raise _unavailable(f"cannot reach Kafka at {log.bootstrap_servers}", exc) from exc

    def _targets(self, partitions: Iterable[TopicPartition] | None) -> list[Any]:
        if partitions is None:
            return list(self._c.assignment())
        return [_ktp(tp) for tp in partitions]

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kafka.errors import IllegalStateError, KafkaError

        try:
            return fn(*args, **kwargs)
        except (AssertionError, IllegalStateError, ValueError) as exc:  # e.g. a partition not assigned
            raise LogError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except KafkaError as exc:
            raise _unavailable(what, exc) from exc

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        wanted = [_ktp(tp) for tp in partitions]
        for tp in wanted:
            n = self._log.partition_count(tp.topic)
            if not 0 <= tp.partition < n:
                raise LogError(f"topic {tp.topic!r} has no partition {tp.partition}")
        self._call("assign", self._c.assign, wanted)

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition(tp.topic, tp.partition) for tp in self._c.assignment()}

    def poll(self, max_records: int = 500, timeout_ms: int = 0) -> list[Record]:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            batches = self._call("poll", self._c.poll, timeout_ms=remaining, max_records=max_records)
            out = [
                Record(r.topic, r.partition, r.offset, r.key, r.value,
                       r.timestamp if r.timestamp is not None and r.timestamp >= 0 else -1)
                for records in batches.values() for r in records
            ]
            if out or time.monotonic() >= deadline:
                return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        ktp = _ktp(tp)
        begin = self.beginning_offsets([tp])[TopicPartition(*tp)]
        end = self.end_offsets([tp])[TopicPartition(*tp)]
        self._call("seek", self._c.seek, ktp, min(max(int(offset), begin), end))

    def seek_to_beginning(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self._call("seek_to_beginning", self._c.seek_to_beginning, *self._targets(partitions))

    def seek_to_end(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        self._call("seek_to_end", self._c.seek_to_end, *self._targets(partitions))

    def seek_to_time(self, timestamp_ms: int, partitions: Iterable[TopicPartition] | None = None) -> None:
        if self._log.is_old_broker():
            raise UnsupportedError("seek_to_time needs message timestamps (Kafka >= 0.10.1); this broker is "
                                   f"{'.'.join(map(str, self._log.broker_version()))}")
        targets = self._targets(partitions)
        found = self._call("offsets_for_times", self._c.offsets_for_times, {tp: int(timestamp_ms) for tp in targets})
        ends = self._call("end_offsets", self._c.end_offsets, targets)
        for tp in targets:
            hit = found.get(tp)
            self._call("seek", self._c.seek, tp, ends[tp] if hit is None else hit.offset)

    def position(self, tp: TopicPartition) -> int:
        return int(self._call("position", self._c.position, _ktp(tp)))

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        targets = [_ktp(tp) for tp in partitions]
        found = self._call("beginning_offsets", self._c.beginning_offsets, targets)
        return {TopicPartition(tp.topic, tp.partition): int(o) for tp, o in found.items()}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        targets = [_ktp(tp) for tp in partitions]
        found = self._call("end_offsets", self._c.end_offsets, targets)
        return {TopicPartition(tp.topic, tp.partition): int(o) for tp, o in found.items()}

    def commit(self, offsets: Mapping[TopicPartition, int] | None = None) -> None:
        from kafka.structs import OffsetAndMetadata

        if self._group_id is None:
            raise LogError("commit needs a consumer with a group_id")
        if offsets is None:
            items = {tp: self._c.position(tp) for tp in self._c.assignment()}
        else:
            items = {_ktp(tp): int(o) for tp, o in offsets.items()}
        if not items:
            return
        self._call("commit", self._c.commit, offsets={tp: OffsetAndMetadata(o, "", -1) for tp, o in items.items()})

    def committed(self, tp: TopicPartition) -> int | None:
        if self._group_id is None:
            return None
        value = self._call("committed", self._c.committed, _ktp(tp))
        return None if value is None else int(value)

    def close(self) -> None:
        self._c.close(autocommit=False)
