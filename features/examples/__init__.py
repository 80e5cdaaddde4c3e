"""Example domains built with the definition language (kept apart from the language itself)."""
