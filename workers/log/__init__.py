"""The log port and its implementations (embedded file-backed log, Kafka)."""
