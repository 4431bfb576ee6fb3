"""The daemon's upkeep: reconcile the ledger with Slurm, and sample per-lease GPU usage.

**Reconcile** (at start, then every ``--reconcile-every`` seconds). The ledger, not the daemon, is
the source of truth, and hooks write it even while the daemon is down; but an Epilog that never
ran (the daemon and the fallback both failed, a node rebooted) leaves a lease live after its job
is gone. Each round expires, with a decision row saying why, every live lease of a served node
whose Slurm job

* Slurm no longer knows, or knows as not holding an allocation (pending again, finished);
* now runs as another restart (the lease of run 0 after a requeue: run 1 has its own);
* holds its allocation on other nodes only.

Leases without a job id (the host plane) are left to their TTL; TTL-expired leases of the served
nodes are ended in the same round so their rows appear without waiting for the next request. If
Slurm cannot be asked (slurmctld down), the round is skipped and logged: a lease is never expired
on a guess.

**Sampling** (every ``--sample-every`` seconds): per-process usage from telemetry is attributed to
leases (by PID, or by the job's cgroup) as :func:`slurm_gpuarb.capacity.build_gpu_states` does for
every decision; a lease's highest observation is stored (``lease_peaks``), and the Epilog's
release row reports it against the grant.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING

from ..errors import GpuArbError
from ..ledger import Ledger
from ..logsink import log
from ..model import Lease, TenantKind

if TYPE_CHECKING:
    from ..service import Arbitration
    from ..slurm.base import JobInfo, SlurmAdapter

__all__ = ["Upkeep", "reconcile", "sample_peaks", "stale_reason"]


def stale_reason(lease: Lease, job: JobInfo | None) -> str | None:
    """Why ``lease`` outlived its Slurm job (``job`` as Slurm reports it now), or ``None`` if it still runs."""
    if job is None:
        return f"job {lease.job_id} is no longer running: Slurm no longer knows it"
    if not job.holds_allocation:
        return f"job {lease.job_id} is no longer running: Slurm reports it {job.state}"
    if job.restart_count != lease.restart_count:
        return (f"job {lease.job_id} is no longer running as run {lease.restart_count}: it was requeued and runs as "
                f"run {job.restart_count}")
    if lease.node not in job.nodes:
        return f"job {lease.job_id} is no longer running on {lease.node}: it holds {','.join(job.nodes)}"
    return None


def reconcile(ledger: Ledger, slurm: SlurmAdapter, nodes: Sequence[str], *, now: float | None = None,
              log_as: str = "gpuarbd", only: Collection[str | None] | None = None) -> list[Lease] | None:
    """One reconcile round over ``nodes``; returns the leases it expired, ``None`` if Slurm could not be asked.

    ``only``: check just these lease ids (a Prolog refused because of them), not every live lease."""
    ts = time.time() if now is None else now
    for node in nodes:
        ledger.expire(ts, node=node, plane="agent")
    live = [le for node in nodes for le in ledger.live(node)
            if le.job_id is not None and (only is None or le.id in only)]
    if not live:
        return []
    try:
        found = slurm.jobs(sorted({le.job_id for le in live if le.job_id is not None}))
    except Exception as e:  # slurmctld down, squeue hung: never expire on a guess
        log(log_as, "reconcile skipped: Slurm could not be asked", level="warning",
            error=str(e) if isinstance(e, GpuArbError) else type(e).__name__, leases=len(live))
        return None
    by_id = {j.job_id: j for j in found}
    expired: list[Lease] = []
    for lease in live:
        job = by_id.get(lease.job_id or "")
        why = stale_reason(lease, job)
        if why is None:
            continue
        inputs = {"slurm_state": None if job is None else job.state,
                  "slurm_restart_count": None if job is None else job.restart_count}
        ended = ledger.expire_lease(lease.id, reason=f"reconcile: {why}", plane="agent", inputs=inputs, now=ts)
        if ended is not None:
            expired.append(ended)
            log(log_as, "reconcile expired a lease", op="reconcile", job=lease.job_id, node=lease.node,
                lease=lease.id, reason=why)
    return expired


def sample_peaks(arbitrations: Sequence[Arbitration], ledger: Ledger, seen: dict[str, int]) -> dict[str, int]:
    """Observe each live lease's usage on ``arbitrations``' nodes; store the peaks that grew.

    ``seen`` (lease id → highest MiB stored so far) is updated in place, and forgets leases no longer
    observed, so a long-running daemon keeps no history of its own. Returns what was written.
    """
    now_peaks: dict[str, int] = {}
    for arb in arbitrations:
        for state in arb.snapshot().states:
            for t in state.tenants:
                if t.kind is TenantKind.LEASE and t.observed_mib > now_peaks.get(t.id, 0):
                    now_peaks[t.id] = t.observed_mib
    grown = {k: v for k, v in now_peaks.items() if v > seen.get(k, 0)}
    ledger.record_peaks(grown)
    for key in [k for k in seen if k not in now_peaks]:
        del seen[key]
    seen.update(grown)
    return grown


class Upkeep(threading.Thread):
    """A background thread running ``reconcile`` (at once, then every ``reconcile_every`` s) and
    ``sample`` (every ``sample_every`` s); an error in one round is logged and the next round runs.
    :meth:`stop` ends it promptly."""

    def __init__(self, *, reconcile: Callable[[], object] | None, sample: Callable[[], object] | None,
                 reconcile_every: float, sample_every: float, log_as: str = "gpuarbd") -> None:
        super().__init__(name="gpuarbd-upkeep", daemon=True)
        self._jobs: list[tuple[str, Callable[[], object], float]] = []
        if reconcile is not None and reconcile_every > 0:
            self._jobs.append(("reconcile", reconcile, reconcile_every))
        if sample is not None and sample_every > 0:
            self._jobs.append(("sample", sample, sample_every))
        self._stop_event = threading.Event()
        self.log_as = log_as
        self.rounds: dict[str, int] = {name: 0 for name, _, _ in self._jobs}

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the thread to end and wait for the round in progress (at most ``timeout`` s)."""
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        due = {name: time.monotonic() if name == "reconcile" else time.monotonic() + every
               for name, _, every in self._jobs}
        while self._jobs and not self._stop_event.is_set():
            now = time.monotonic()
            for name, fn, every in self._jobs:
                if now >= due[name]:
                    self._run_one(name, fn)
                    due[name] = time.monotonic() + every
            wait = min(due.values()) - time.monotonic()
            if wait > 0:
                self._stop_event.wait(wait)

    def _run_one(self, name: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # the ledger or telemetry failed this round; the next one may work
            log(self.log_as, f"{name} round failed", level="warning",
                error=str(e) if isinstance(e, GpuArbError) else type(e).__name__)
        finally:
            self.rounds[name] += 1
