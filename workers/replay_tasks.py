"""Celery tasks of replays, and the worker bootstep that triggers them.

* ``replays.run_pending``: one :class:`~workers.replay_coordinator.ReplayCoordinator` run: every
  pending request shares one scan, interrupted scans resume from their checkpoint. When another
  coordinator holds the lock the task returns at once (that coordinator loops until no work is
  left, and the watcher triggers again if it dies).
* :class:`ReplayWatcherStep`: while the worker runs, a thread checks every
  :data:`WATCH_INTERVAL_S` seconds for work (new messages on the ``replays`` topic, or unfinished
  replays with no coordinator running, e.g. after a crash) and enqueues ``replays.run_pending``.
  It checks once right at worker start: that is the recovery of replays interrupted by a crash.
  A short-lived ``replays:trigger`` key keeps it from flooding the queue.

``workers.celery_app.create_celery`` imports this module and calls :func:`register_tasks`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps

from rules_service.config import Settings, load_settings

logger = logging.getLogger(__name__)

TASK_NAME = "replays.run_pending"
WATCH_INTERVAL_S = 2.0
TRIGGER_TTL_S = 30


def run_pending(settings: Settings) -> dict[str, Any]:
    """The task body: one coordinator run; returns a JSON summary."""
    from workers.replay_coordinator import ReplayCoordinator

    coordinator = ReplayCoordinator(settings)
    try:
        coordinator.state.redis.delete(coordinator.state._k("replays", "trigger"))
        result = coordinator.run_pending()
    finally:
        coordinator.close()
    return {"busy": result.busy, "scans": result.scans, "finished": result.finished}


def work_waiting(settings: Settings, redis: Any = None, log: Any = None) -> bool:
    """True when replays wait for a coordinator: unread requests on the topic, or unfinished
    replays / interrupted scans while no coordinator holds the lock."""
    from rules_service.domain import REPLAYS_TOPIC
    from workers.replay_coordinator import COORDINATOR_GROUP
    from workers.replay_state import ReplayState

    if redis is None:
        from rules_service.redis_conn import connect_redis

        redis = connect_redis(settings)
    state = ReplayState(redis)
    if state.lock_held():
        return False
    if state.unfinished() or state.running_scans():
        return True
    if log is None:
        from workers.log.factory import create_log

        log = create_log(settings)
    if REPLAYS_TOPIC not in log.list_topics():
        return False
    consumer = log.consumer(COORDINATOR_GROUP, auto_offset_reset="earliest")
    try:
        parts = log.partitions(REPLAYS_TOPIC)
        consumer.assign(parts)
        return any(lag > 0 for lag in consumer.lag().values())
    finally:
        consumer.close()


class ReplayWatcherStep(bootsteps.StartStopStep):
    """Worker bootstep: enqueue ``replays.run_pending`` whenever replays wait (see module doc)."""

    label = "replay watcher"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        app = worker.app
        settings = app.conf.get("rules_settings") or load_settings()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(app, settings), name="replay-watcher", daemon=True)
        self._thread.start()

    def _loop(self, app: Celery, settings: Settings) -> None:
        from rules_service.redis_conn import connect_redis
        from workers.log.factory import create_log

        redis = connect_redis(settings)
        log = create_log(settings)
        try:
            while not self._stop.is_set():
                try:
                    if work_waiting(settings, redis, log) and redis.set("rs:replays:trigger", "1", nx=True,
                                                                        ex=TRIGGER_TTL_S):
                        app.send_task(TASK_NAME)
                        logger.info("replays waiting: %s enqueued", TASK_NAME)
                except Exception:  # the watcher must survive a Redis or log hiccup
                    logger.exception("replay watcher check failed")
                self._stop.wait(WATCH_INTERVAL_S)
        finally:
            log.close()

    def stop(self, worker: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)


def register_tasks(app: Celery) -> None:
    """Bind the replay task to ``app`` and add the watcher to its workers."""

    @app.task(name=TASK_NAME, ignore_result=False)
    def run_pending_task() -> dict[str, Any]:
        return run_pending(app.conf.get("rules_settings") or load_settings())

    app.steps["worker"].add(ReplayWatcherStep)
