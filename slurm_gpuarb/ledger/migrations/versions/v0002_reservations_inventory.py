"""reservations, inventory, append-only

Adds the standing-reservation and inventory snapshots, the ``nodes`` table whose rows PostgreSQL
locks (``SELECT … FOR UPDATE``) to serialise one node's acquires, and triggers that make
``decisions`` append-only. Additive only (expand/contract): nothing revision 0001 created or
wrote is altered or dropped.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_PG_FUNCTION = """
CREATE FUNCTION gpuarb_decisions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'gpuarb: the decisions table is append-only (% refused)', TG_OP
        USING ERRCODE = 'restrict_violation';
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "reservations",
        sa.Column("node", sa.Text, primary_key=True),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("gpu", sa.Integer, nullable=False),
        sa.Column("size_mib", sa.Integer, nullable=False),
        sa.Column("match", sa.Text, nullable=False, server_default="{}"),
        sa.Column("mode", sa.Text, nullable=False, server_default="static"),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table(
        "inventory",
        sa.Column("node", sa.Text, primary_key=True),
        sa.Column("gpu_index", sa.Integer, primary_key=True),
        sa.Column("uuid", sa.Text, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("total_mib", sa.Integer, nullable=False),
        sa.Column("reserved_mib", sa.Integer, nullable=False),
        sa.Column("minor", sa.Integer),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    op.create_table("nodes", sa.Column("name", sa.Text, primary_key=True))

    if op.get_context().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute("CREATE TRIGGER decisions_append_only BEFORE UPDATE OR DELETE ON decisions "
                   "FOR EACH ROW EXECUTE FUNCTION gpuarb_decisions_append_only()")
        op.execute("CREATE TRIGGER decisions_no_truncate BEFORE TRUNCATE ON decisions "
                   "FOR EACH STATEMENT EXECUTE FUNCTION gpuarb_decisions_append_only()")
    else:
        for verb in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER decisions_no_{verb.lower()} BEFORE {verb} ON decisions BEGIN "
                       f"SELECT RAISE(ABORT, 'gpuarb: the decisions table is append-only ({verb} refused)'); END")


def downgrade() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("DROP TRIGGER decisions_no_truncate ON decisions")
        op.execute("DROP TRIGGER decisions_append_only ON decisions")
        op.execute("DROP FUNCTION gpuarb_decisions_append_only()")
    else:
        op.execute("DROP TRIGGER decisions_no_update")
        op.execute("DROP TRIGGER decisions_no_delete")
    op.drop_table("nodes")
    op.drop_table("inventory")
    op.drop_table("reservations")
