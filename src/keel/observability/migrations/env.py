"""Alembic's entry point for the request log schema.

`RecordStore.migrate()` passes an open connection in `config.attributes["connection"]`.
Run by hand, Alembic needs the database URL:
`alembic -c /dev/null -x url=sqlite:///keel.db upgrade head` with `script_location` set to this folder.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine, pool

from keel.observability.store import VERSION_TABLE, metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no database URL: pass -x url=sqlite:///PATH (or postgresql+psycopg://...)")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=metadata, version_table=VERSION_TABLE, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        _run(conn)
    engine.dispose()


main()
