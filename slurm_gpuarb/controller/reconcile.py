"""The controller's cluster-wide reconcile: preempted runs recorded as revoked, and orphaned leases expired.

**Preemption record.** When an ``llm`` job needs the memory, Slurm's QoS preemption requeues the batch
job holding it (``PreemptMode=REQUEUE``, after ``GraceTime``): the run ends, its Epilog releases the
lease (the Epilog cannot know why its job ended), and the job waits to run again with a higher
restart count. The agent sees that restart count in the job listing and records what happened to
each earlier run's lease of a *preemptible* class: it becomes ``revoked`` (from ``released`` or
``expired`` by :meth:`~slurm_gpuarb.ledger.Ledger.revoke_ended`; a lease still live, whose Epilog never
ran, by :meth:`~slurm_gpuarb.ledger.Ledger.revoke`) with a reason naming the preemptor where it can
be established: a job of a class with a higher priority that started on the lease's node within
:data:`PREEMPTOR_BEFORE_S` before to :data:`PREEMPTOR_AFTER_S` after the run's lease ended, and not
before that run began (the preemptor starts once the victim's Epilog has freed the node; the slack
before covers node and controller clocks a little apart; a job already running when the victim
started did not need its GPUs — on the test cluster an llm job that ended just before a short batch
run was otherwise named). Among several, one whose own lease shares a GPU with the victim's wins,
then the one that started closest to the end. Until :data:`PREEMPTOR_AFTER_S` has passed the agent
waits for the preemptor to appear; then it records "requeued by Slurm (preempted, or requeued by an
admin; …)": an admin's ``scontrol requeue`` reads the same in Slurm's listing.

**Orphans.** The node daemon's reconcile (:mod:`slurm_gpuarb.daemon.reconcile`) expires the leases of
the nodes it serves whose job no longer runs there; a node whose daemon is down, or that no daemon
serves, is left with live leases of jobs long gone. The agent applies the same rule
(:func:`~slurm_gpuarb.daemon.reconcile.stale_reason`) to every live lease with a job id, cluster
wide, from the tick's one listing, plus the ledger's TTL expiry. Leases recorded less than
:data:`ORPHAN_MIN_AGE_S` before the listing are left alone: their job may have started after Slurm
was asked. Rows do not double: a lease both expire is ended once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from ..daemon.reconcile import stale_reason
from ..logsink import log
from ..model import Lease, LeaseState
from .common import Context, job_class, job_lease

if TYPE_CHECKING:
    from ..slurm.base import JobInfo

__all__ = ["ORPHAN_MIN_AGE_S", "PREEMPTOR_AFTER_S", "PREEMPTOR_BEFORE_S", "Reconciler", "find_preemptor"]

PREEMPTOR_BEFORE_S: Final = 5.0
PREEMPTOR_AFTER_S: Final = 120.0
ORPHAN_MIN_AGE_S: Final = 60.0


def find_preemptor(ctx: Context, lease: Lease, ended_at: float, jobs: list[JobInfo]) -> tuple[JobInfo, str] | None:
    """The job (and its class) that most likely preempted ``lease``'s run, ended at ``ended_at``; else None."""
    cfg = ctx.cfg
    found: list[tuple[JobInfo, str]] = []
    for j in jobs:
        # A job that was already running when the victim's run began did not need its GPUs.
        if (j.job_id == lease.job_id or lease.node not in j.nodes or j.state == "PENDING" or j.start_time is None
                or j.start_time < lease.created_at
                or not ended_at - PREEMPTOR_BEFORE_S <= j.start_time <= ended_at + PREEMPTOR_AFTER_S):
            continue
        cls = job_class(cfg, j, job_lease(j))
        if cls is not None and cfg.policy.classes[cls].priority > lease.priority:
            found.append((j, cls))
    if len(found) > 1:
        victim = set(lease.gpus)
        sharing = [(j, c) for j, c in found
                   if any(le.node == lease.node and victim & set(le.gpus) for le in ctx.ledger.leases(job_id=j.job_id))]
        found = sharing or found
    if not found:
        return None
    return min(found, key=lambda jc: (abs((jc[0].start_time or 0.0) - ended_at), jc[0].job_id))


class Reconciler:
    """The reconcile step (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._settled: set[tuple[str, int]] = set()  # (job, restart count) whose earlier runs are all recorded

    def step(self, jobs: list[JobInfo], now: float, listed_at: float) -> list[str]:
        """Record preempted runs, then expire orphans; returns what was done for the tick's log."""
        return self.record_preemptions(jobs, now) + self.expire_orphans(jobs, now, listed_at)

    def record_preemptions(self, jobs: list[JobInfo], now: float) -> list[str]:
        done = []
        self._settled &= {(j.job_id, j.restart_count) for j in jobs}  # forget jobs Slurm has forgotten
        for job in jobs:
            key = (job.job_id, job.restart_count)
            if job.restart_count == 0 or key in self._settled:
                continue
            waiting = False
            for lease in self.ctx.ledger.leases(job_id=job.job_id):
                earlier = lease.restart_count < job.restart_count
                if not earlier or lease.state is LeaseState.REVOKED or not lease.preemptible:
                    continue
                outcome = self._record_one(lease, job, jobs, now)
                if outcome is None:
                    waiting = True
                elif outcome:
                    done.append(f"revoke {lease.id} of job {job.job_id}")
            if not waiting:
                self._settled.add(key)
        return done

    def _record_one(self, lease: Lease, job: JobInfo, jobs: list[JobInfo], now: float) -> bool | None:
        """Revoke one earlier run's lease; None: not yet (the preemptor may still start)."""
        ctx = self.ctx
        # A lease still live (its Epilog has not run yet) ends now; it keeps waiting for its preemptor until
        # the orphan step expires it, which gives it an end time to measure the window from.
        ended_at = lease.ended_at if lease.ended_at is not None else now
        found = find_preemptor(ctx, lease, ended_at, jobs)
        if found is None and now < ended_at + PREEMPTOR_AFTER_S:
            return None
        run = f"run {lease.restart_count} of job {lease.job_id}"
        inputs: dict[str, object] = {"requeued_to_run": job.restart_count, "ended_at": ended_at,
                                     "ended_as": lease.state.value}
        if found is not None:
            by, cls = found
            reason = (f"preempted by job {by.job_id} (prio {cls}, started on {lease.node} "
                      f"{(by.start_time or ended_at) - ended_at:+.0f}s from the end of {run}): Slurm requeued job "
                      f"{lease.job_id}, which runs again as run {job.restart_count}")
            inputs.update(by_job=by.job_id, by_prio=cls, by_start=by.start_time)
        else:
            reason = (f"requeued by Slurm (preempted, or requeued by an admin; no higher-class job started on "
                      f"{lease.node} around its end): {run} ended and the job runs again as run {job.restart_count}")
        if lease.state is LeaseState.GRANTED:
            ended = ctx.ledger.revoke(lease.id, reason=reason, plane="agent", now=now)
        else:
            ended = ctx.ledger.revoke_ended(lease.id, reason=reason, plane="agent", now=now, inputs=inputs)
        if ended is not None:
            log(ctx.log_as, "preempted run recorded", job=lease.job_id, restart=lease.restart_count,
                lease=lease.id, node=lease.node, by=inputs.get("by_job"), reason=reason)
        return ended is not None

    def expire_orphans(self, jobs: list[JobInfo], now: float, listed_at: float) -> list[str]:
        ctx = self.ctx
        done = [f"expire {le.id} (ttl)" for le in ctx.ledger.expire(now, plane="agent")]
        by_id = {j.job_id: j for j in jobs}
        for lease in ctx.ledger.live():
            if lease.job_id is None or lease.created_at > listed_at - ORPHAN_MIN_AGE_S:
                continue
            job = by_id.get(lease.job_id)
            why = stale_reason(lease, job)
            if why is None:
                continue
            inputs = {"slurm_state": None if job is None else job.state,
                      "slurm_restart_count": None if job is None else job.restart_count, "by": "controller"}
            if ctx.ledger.expire_lease(lease.id, reason=f"reconcile: {why}", plane="agent", inputs=inputs,
                                       now=now) is not None:
                log(ctx.log_as, "reconcile expired a lease", job=lease.job_id, node=lease.node, lease=lease.id,
                    reason=why)
                done.append(f"expire {lease.id} of job {lease.job_id}")
        return done
