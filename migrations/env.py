"""Alembic environment: imgstore passes the connection in via config.attributes['connection']."""

from alembic import context

from imgstore.schema import metadata

config = context.config
target_metadata = metadata

connection = config.attributes.get("connection")
if connection is None:
    from sqlalchemy import create_engine

    with create_engine(config.get_main_option("sqlalchemy.url") or "").connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
