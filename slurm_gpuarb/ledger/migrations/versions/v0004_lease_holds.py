"""lease holds

Adds ``leases.holds``, nullable: the holder-mode reservation a holder job's lease holds, so the
capacity model counts that reservation's processes inside the lease instead of twice. Additive
only (expand/contract): existing rows read NULL (they hold nothing), and a writer that does not
know the column leaves it NULL. On SQLite the column is added in place (``ALTER TABLE … ADD
COLUMN``): ``leases`` keeps its WITHOUT ROWID layout and its partial indexes.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # recreate="never": a nullable column without a default needs no table copy on SQLite, and a copy
    # would have to rebuild WITHOUT ROWID and the partial unique index on live jobs by hand.
    with op.batch_alter_table("leases", recreate="never") as batch:
        batch.add_column(sa.Column("holds", sa.Text, nullable=True))


def downgrade() -> None:
    # SQLite ≥ 3.35 drops a column in place (Python 3.11's sqlite3 is newer); no index names it.
    with op.batch_alter_table("leases", recreate="never") as batch:
        batch.drop_column("holds")
