"""Audience rule engine: the domain, configuration, counters and the REST API."""
