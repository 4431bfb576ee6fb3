"""schema compat

Adds ``schema_compat``: one row, ``min_reader``, the oldest revision whose gpuarb can still use this
schema. A rolling upgrade migrates the ledger first (``gpuarb db upgrade``) and then the hosts one
by one; a host whose gpuarb knows ``min_reader`` keeps working on a schema newer than its own,
instead of refusing it. Every later migration keeps the row true: an additive one (a nullable
column, a table) leaves it; one that older code cannot live with sets it to its own revision.
gpuarb 0004 predates the row and refuses any revision it does not know, so this starts at 0005.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table("schema_compat", sa.Column("min_reader", sa.Text, nullable=False))
    op.bulk_insert(table, [{"min_reader": "0005"}])


def downgrade() -> None:
    op.drop_table("schema_compat")
