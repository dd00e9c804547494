"""Audience counters in Redis: unique users (HyperLogLog) and matched bids, in UTC time buckets."""
