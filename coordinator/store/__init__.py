"""Postgres: migrations, named queries, the pool, the embedded server."""
