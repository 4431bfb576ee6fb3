"""lease peaks

Adds ``lease_peaks``: per lease, the most VRAM its processes were seen holding (gpuarbd samples
per-process usage and attributes it to leases), so the Epilog's release row records peak vs
granted. Additive only (expand/contract): nothing earlier revisions created or wrote is altered.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "lease_peaks",
        sa.Column("lease_id", sa.Text, primary_key=True),
        sa.Column("peak_mib", sa.Integer, nullable=False),
        sa.Column("sampled_at", sa.Double, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("lease_peaks")
