"""Domains defined only in tests: the product must run them without a change to its code."""
