"""Matching engines: the percolator port, the embedded engine and the Elasticsearch backend."""
