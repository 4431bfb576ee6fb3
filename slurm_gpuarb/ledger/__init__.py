"""The lease ledger: leases, the append-only decision log, standing reservations and the inventory
snapshot, in SQLite (one host) or PostgreSQL (a cluster), through SQLAlchemy Core.

    from slurm_gpuarb.ledger import Ledger
    with Ledger.open("sqlite:////var/lib/gpuarb/ledger.db") as ledger:
        decision, lease = ledger.acquire(request, decide, spec_text="gpuarb/1: vram=6144MiB prio=batch")
        ledger.release(job_id="12", restart_count=0, node="n1")

Hooks never migrate: :meth:`Ledger.open` initialises a brand-new database, refuses one at another
revision with SchemaVersionError, and ``gpuarb db upgrade`` (:meth:`Ledger.upgrade`) migrates.
"""

from .schema import HEAD_REVISION, REVISIONS
from .store import MAX_INPUTS_CHARS, Ledger, new_lease_id

__all__ = ["HEAD_REVISION", "MAX_INPUTS_CHARS", "REVISIONS", "Ledger", "new_lease_id"]
