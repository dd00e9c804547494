"""The Celery application: the broker is Redis, and every worker process streams ``bids``.

``create_celery(settings)`` builds the app (no app and no client exists at import time; the
module attribute ``celery`` is created on first access, for the ``celery -A workers.celery_app``
command line). Broker and result backend are ``RULES_CELERY_BROKER_URL``, else the counters'
Redis (``rules_service.redis_conn.redis_url``: ``RULES_REDIS_URL`` or the embedded server's unix
socket).

The stream consumer runs inside the Celery worker through the :class:`StreamConsumerStep`
bootstep: when the worker starts, the step starts a :class:`~workers.stream_runner.StreamSupervisor`
(one consumer process per share of the ``bids`` partitions, restarted if it dies); when the worker
shuts down (warm shutdown, SIGTERM), the consumers finish their batch and stop. Options come from
``app.conf.stream``: ``{"enabled": bool, "processes": int, "partitions": [int] | None,
"batch_size": int | None}`` (``manage.py worker`` sets them from its flags).

Tasks: replay tasks live in ``workers/replay*.py``. Every such module is imported by
:func:`create_celery`; a module may define ``register_tasks(app)`` (called with the app) or use
``@shared_task`` (bound to every app).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Any

from celery import Celery, bootsteps

from rules_service.config import Settings, load_settings

logger = logging.getLogger(__name__)

APP_NAME = "audience_rules"


def kombu_url(url: str) -> str:
    """A redis-py URL as kombu/Celery spell it: ``unix:///s.sock?db=0`` -> ``redis+socket:///s.sock?virtual_host=0``."""
    if url.startswith("unix://"):
        path, _, query = url[len("unix://"):].partition("?")
        params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        db = params.get("db", "0")
        return f"redis+socket://{path}?virtual_host={db}"
    return url


def broker_url(settings: Settings) -> str:
    if settings.CELERY_BROKER_URL:
        return kombu_url(settings.CELERY_BROKER_URL)
    from rules_service.redis_conn import redis_url

    return kombu_url(redis_url(settings))


def replay_modules() -> list[str]:
    """``workers.replay*`` modules present in the package (the replay engineer's tasks)."""
    import workers

    return sorted(f"workers.{m.name}" for m in pkgutil.iter_modules(workers.__path__) if m.name.startswith("replay"))


class StreamConsumerStep(bootsteps.StartStopStep):
    """Worker bootstep: run the stream consumers for as long as the worker runs."""

    label = "stream consumer"

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.supervisor: Any = None

    def include_if(self, worker: Any) -> bool:
        return bool((worker.app.conf.get("stream") or {}).get("enabled"))

    def start(self, worker: Any) -> None:
        from workers.stream_runner import StreamSupervisor

        options = worker.app.conf.get("stream") or {}
        settings = worker.app.conf.get("rules_settings") or load_settings()
        self.supervisor = StreamSupervisor(settings, processes=int(options.get("processes") or 1),
                                           partitions=options.get("partitions"),
                                           batch_size=options.get("batch_size"))
        self.supervisor.start()

    def stop(self, worker: Any) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)


def create_celery(settings: Settings | None = None, *, stream: dict[str, Any] | None = None) -> Celery:
    """The Celery app for ``settings`` (default: from the environment)."""
    settings = settings or load_settings()
    url = broker_url(settings)
    app = Celery(APP_NAME, broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        task_acks_late=True,  # a replay task interrupted by a crash is redelivered (replays checkpoint)
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        rules_settings=settings,
        stream=stream or {"enabled": False},
    )
    app.steps["worker"].add(StreamConsumerStep)
    for name in replay_modules():
        module = importlib.import_module(name)
        register = getattr(module, "register_tasks", None)
        if callable(register):
            register(app)
    return app


def __getattr__(name: str) -> Any:
    # ``celery -A workers.celery_app worker`` looks up ``celery``: build it on first access only.
    if name == "celery":
        app = create_celery(stream={"enabled": True})
        globals()["celery"] = app
        return app
    raise AttributeError(name)
