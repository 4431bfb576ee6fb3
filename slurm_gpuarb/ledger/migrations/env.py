"""Alembic environment for the ledger. Run programmatically only (see ``slurm_gpuarb.ledger.migrate``):
the caller passes an open connection, already inside the transaction (and lock) the migration must
run under, as ``config.attributes["connection"]``. There is no alembic.ini."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("gpuarb's migrations run through `gpuarb db upgrade` (Ledger.upgrade), not the alembic CLI")

context.configure(
    connection=connection,
    target_metadata=None,
    # SQLite cannot ALTER most things in place: a revision that alters a table uses
    # op.batch_alter_table (copy-and-move on SQLite, plain ALTER elsewhere); autogenerate renders that too.
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
