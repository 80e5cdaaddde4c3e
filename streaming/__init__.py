"""Flink streaming engine: sliding windows over Kafka into the online store (issue 4)."""
