"""Alembic environment: imgstore passes the connection in via config.attributes['connection'].

The migrations are the only description of the schema (imgstore's queries are plain SQL, imgstore/db.py),
so there is no metadata to autogenerate from: write each migration by hand.
"""

from alembic import context

config = context.config
target_metadata = None

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
