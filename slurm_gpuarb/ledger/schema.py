"""The ledger's tables at the head revision, as SQLAlchemy Core objects for the queries in
:mod:`.store`. The migrations under ``migrations/versions/`` create them and are the truth;
``tests/ledger`` checks that the two agree.

Migrations never import this module: a migration is a frozen snapshot of one step.

Schema history (expand/contract: a revision only adds tables, columns, indexes and triggers, so
an upgrade never rewrites or loses what an older gpuarb wrote; ALTERs use op.batch_alter_table):

* ``0001`` initial: ``leases`` and the ``decisions`` log.
* ``0002`` reservations, inventory, append-only: ``reservations``, ``inventory``, ``nodes`` (the
  row PostgreSQL locks to serialise one node's acquires) and triggers that refuse UPDATE and
  DELETE on ``decisions``.
* ``0003`` lease peaks: ``lease_peaks``, the most VRAM a lease's processes were seen holding
  (sampled by gpuarbd), so a release row can say granted vs used. A table of its own rather than
  a column of ``leases``: the lease hot path (insert, end, read) stays exactly as it was.
* ``0004`` lease holds: ``leases.holds``, nullable, the holder-mode reservation a holder job's lease
  holds (its processes count in that lease). A column, not a table: the capacity model needs it
  with every live lease it reads, and older rows and writers simply leave it NULL.
* ``0005`` schema compat: ``schema_compat.min_reader``, the oldest revision whose gpuarb can use
  the schema. A gpuarb that finds a revision newer than its own opens it anyway when it knows
  ``min_reader`` (a rolling upgrade: the ledger first, then the hosts); each later migration keeps
  the row true (additive: leave it; breaking: set it to its own revision).
"""

from __future__ import annotations

import sqlalchemy as sa

REVISIONS: tuple[str, ...] = ("0001", "0002", "0003", "0004", "0005")  # oldest first; must match migrations/versions
HEAD_REVISION = REVISIONS[-1]

metadata = sa.MetaData()

# Lease states as stored; the values of model.LeaseState.
GRANTED, RELEASED, EXPIRED, REVOKED = "granted", "released", "expired", "revoked"

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("node", sa.Text, nullable=False),
    sa.Column("gpus", sa.Text, nullable=False),  # "0,1"
    sa.Column("vram_mib", sa.Integer, nullable=False),
    sa.Column("min_mib", sa.Integer),
    sa.Column("prio", sa.Text, nullable=False),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("preemptible", sa.Boolean, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("spec", sa.Text, nullable=False),
    sa.Column("mig_uuid", sa.Text),
    sa.Column("job_id", sa.Text),
    sa.Column("restart_count", sa.Integer, nullable=False),
    sa.Column("owner_uid", sa.Integer),
    sa.Column("pid", sa.Integer),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double),
    sa.Column("ended_at", sa.Double),
    sa.Column("end_reason", sa.Text),
    sa.Column("holds", sa.Text),  # 0004: the holder-mode reservation this lease holds
    sqlite_with_rowid=False,
)

decisions = sa.Table(
    "decisions",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("ts", sa.Double, nullable=False),
    sa.Column("plane", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("node", sa.Text),
    sa.Column("lease_id", sa.Text),
    sa.Column("job_id", sa.Text),
    sa.Column("restart_count", sa.Integer, nullable=False),
    sa.Column("prio", sa.Text),
    sa.Column("requested_mib", sa.Integer),
    sa.Column("granted_mib", sa.Integer),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("inputs", sa.Text),  # JSON object, NULL when empty
)

reservations = sa.Table(
    "reservations",
    metadata,
    sa.Column("node", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("gpu", sa.Integer, nullable=False),
    sa.Column("size_mib", sa.Integer, nullable=False),
    sa.Column("match", sa.Text, nullable=False),  # JSON object of the Matcher fields that are set
    sa.Column("mode", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

inventory = sa.Table(
    "inventory",
    metadata,
    sa.Column("node", sa.Text, primary_key=True),
    sa.Column("gpu_index", sa.Integer, primary_key=True),
    sa.Column("uuid", sa.Text, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("total_mib", sa.Integer, nullable=False),
    sa.Column("reserved_mib", sa.Integer, nullable=False),
    sa.Column("minor", sa.Integer),
    sa.Column("updated_at", sa.Double, nullable=False),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
)

schema_compat = sa.Table(
    "schema_compat",
    metadata,
    sa.Column("min_reader", sa.Text, nullable=False),
)

lease_peaks = sa.Table(
    "lease_peaks",
    metadata,
    sa.Column("lease_id", sa.Text, primary_key=True),
    sa.Column("peak_mib", sa.Integer, nullable=False),
    sa.Column("sampled_at", sa.Double, nullable=False),
)
