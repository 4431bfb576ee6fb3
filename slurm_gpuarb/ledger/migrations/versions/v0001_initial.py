"""initial: leases and the decision log

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_LIVE = "state = 'granted'"


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("node", sa.Text, nullable=False),
        sa.Column("gpus", sa.Text, nullable=False, server_default=""),
        sa.Column("vram_mib", sa.Integer, nullable=False),
        sa.Column("min_mib", sa.Integer),
        sa.Column("prio", sa.Text, nullable=False),
        sa.Column("priority", sa.Integer, nullable=False, server_default="0"),
        sa.Column("preemptible", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("spec", sa.Text, nullable=False, server_default=""),
        sa.Column("mig_uuid", sa.Text),
        sa.Column("job_id", sa.Text),
        sa.Column("restart_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("owner_uid", sa.Integer),
        sa.Column("pid", sa.Integer),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("expires_at", sa.Double),
        sa.Column("ended_at", sa.Double),
        sa.Column("end_reason", sa.Text),
        sa.CheckConstraint("state IN ('granted', 'released', 'expired', 'revoked')", name="ck_leases_state"),
        # The text primary key is the table's own b-tree: no hidden rowid, no second index to write.
        sqlite_with_rowid=False,
    )
    op.create_index("ix_leases_node_state", "leases", ["node", "state"])
    # A Slurm job run holds at most one live lease per node: a retried Prolog gets the same lease back.
    live_job = sa.text(f"{_LIVE} AND job_id IS NOT NULL")
    op.create_index("uq_leases_live_job", "leases", ["job_id", "restart_count", "node"], unique=True,
                    sqlite_where=live_job, postgresql_where=live_job)
    # TTL garbage collection scans live leases only.
    op.create_index("ix_leases_live_expiry", "leases", ["expires_at"],
                    sqlite_where=sa.text(_LIVE), postgresql_where=sa.text(_LIVE))

    op.create_table(
        "decisions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Double, nullable=False),
        sa.Column("plane", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("node", sa.Text),
        sa.Column("lease_id", sa.Text),
        sa.Column("job_id", sa.Text),
        sa.Column("restart_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("prio", sa.Text),
        sa.Column("requested_mib", sa.Integer),
        sa.Column("granted_mib", sa.Integer),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("inputs", sa.Text),
    )
    op.create_index("ix_decisions_lease", "decisions", ["lease_id"])
    op.create_index("ix_decisions_job", "decisions", ["job_id"])


def downgrade() -> None:
    op.drop_table("decisions")
    op.drop_table("leases")
