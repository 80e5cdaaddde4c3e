"""Spark batch engine: backfills, offline store, point-in-time training sets (issue 3)."""
