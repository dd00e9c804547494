"""Stream processing: the Celery app, the bid stream consumer, replays and the log adapters."""
