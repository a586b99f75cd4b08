"""A key-value store served as a REST API, seeded from input.db and durable across restarts."""

__version__ = "1.0.0"
