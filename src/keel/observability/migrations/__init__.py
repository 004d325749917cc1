"""Alembic migrations of the request log schema; run by `RecordStore.migrate()`."""
