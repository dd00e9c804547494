"""Child processes for the embedded log's multi-process and kill -9 tests.

    python -m tests.log.embedded_child produce ROOT TOPIC WRITER COUNT BATCH
    python -m tests.log.embedded_child produce-forever ROOT TOPIC WRITER BATCH

Each acknowledged batch prints one line per message, ``partition offset key value``, and flushes,
so the parent knows exactly what was acknowledged before it kills us.
"""

from __future__ import annotations

import itertools
import sys

from workers.log.embedded import EmbeddedLog
from workers.log.port import Message


def produce(root: str, topic: str, writer: str, count: int | None, batch: int) -> None:
    log = EmbeddedLog(root)
    producer = log.producer()
    numbers = itertools.count() if count is None else iter(range(count))
    out = sys.stdout
    while True:
        chunk = list(itertools.islice(numbers, batch))
        if not chunk:
            break
        messages = [Message(f"{writer}:{i}".encode() + b"." * 200, key=f"{writer}-k{i % 7}".encode()) for i in chunk]
        acks = producer.send_batch(topic, messages)
        out.write("".join(f"{p} {o} {m.key.decode()} {m.value.decode().rstrip('.')}\n"  # type: ignore[union-attr]
                          for (p, o), m in zip(acks, messages, strict=True)))
        out.flush()
    producer.close()


def main(argv: list[str]) -> None:
    command, root, topic, writer = argv[:4]
    if command == "produce":
        produce(root, topic, writer, int(argv[4]), int(argv[5]))
    elif command == "produce-forever":
        produce(root, topic, writer, None, int(argv[4]))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
