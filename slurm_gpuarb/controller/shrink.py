"""Shrink pending jobs to their ``min=`` once they have waited ``wait=`` (the controller's *degrade*).

Under Slurm a lease is decided before the allocation: a job that cannot start at its ``vram=``
waits in the queue, and only a *pending* job's GRES can change (``scontrol update JobId=X
TresPerNode=…``; a running job answers "Job is no longer pending execution"). So the agent, each
tick, shrinks every job that

* is ``PENDING`` because it cannot start (reason ``Resources`` or ``Priority``; not one held, waiting
  for a dependency or its begin time: a smaller job would not start any sooner);
* has a *canonical* lease spec (``gpuarb/1: …``: job_submit mapped its GRES from the spec, so the
  spec is what the job holds) with ``min=`` in a class that ``may_degrade``;
* was submitted at least ``wait=`` ago (no ``wait=``: at once, as the host plane degrades at once);
* would take less at ``min=`` than it asks for now, in its partition.

The new GRES is what job_submit would map a lease of ``vram=<min>`` to in the job's partition
(:func:`slurm_gpuarb.lua.map_lease`, the Python twin of the Lua): **shards** — ``shard:ceil(min /
quantum)``; **MIG** — the smallest profile of the partition holding ``min`` (a named ``mig=`` is
dropped: the degrade is to the smallest slice that fits); **MPS** — the smaller share; **whole
GPUs** — the same GPUs, so there is nothing to shrink and the job is left alone. The comment is
rewritten to the canonical spec of what the job now asks for (``vram=<min>``, ``shards=`` of the new
count, ``min=``/``wait=`` dropped: it cannot degrade further), keeping any text before the marker.
Both change in one ``scontrol update``, so the Prolog (which sizes a shard lease as ``shards ×
quantum`` from the comment) leases exactly ``min``: the job runs with ``GPUARB_VRAM_MB`` = min.
job_submit.lua's modify hook lets the change through for its privileged uids (root by default; a
site running the agent as SlurmUser renders job_submit.lua with that uid among ``privileged_uids``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from .. import spec as specmod
from ..errors import LeaseSpecError
from ..logsink import log
from ..lua import GPU_GRES, map_lease
from ..slurm.base import JobInfo, JobNotPending, SlurmError
from ..units import format_duration, human_size
from .common import Context, job_lease

if TYPE_CHECKING:
    from ..config import Config
    from ..lua import SubmitTables

__all__ = ["WAITING_REASONS", "ShrinkPlan", "Shrinker", "plan_shrink", "replace_gpu_gres"]

#: pending reasons under which a smaller request could start sooner
WAITING_REASONS: Final = frozenset({"Resources", "Priority"})


@dataclass(frozen=True)
class ShrinkPlan:
    """What one pending job becomes: its new comment and GRES, and the numbers behind the decision."""

    job: JobInfo
    cls: str
    comment: str
    tres: str  # the new TresPerNode
    asked_mib: int  # vram= resolved in the job's partition
    floor_mib: int  # min= resolved there
    waited_s: float
    wait_s: int
    shards: int | None


def replace_gpu_gres(tres: str, gres: str) -> str:
    """``tres`` with its GPU items (gpu, shard, mps) replaced by ``gres``; other GRES stay, and the new item
    is spelled as the job's own (``gres:`` in 22.05, ``gres/`` later)."""
    kept: list[str] = []
    slash = False
    for item in (t.strip() for t in tres.split(",")):
        if not item:
            continue
        body = item[5:] if item.startswith(("gres:", "gres/")) else item
        if body.split(":")[0] in GPU_GRES:
            slash = slash or item.startswith("gres/")
            continue
        kept.append(item)
    if slash and gres.startswith("gres:"):
        gres = "gres/" + gres[5:]
    return ",".join([*kept, gres])


def plan_shrink(cfg: Config, tables: SubmitTables, job: JobInfo, now: float) -> ShrinkPlan | None:
    """The shrink ``job`` is due for at ``now`` (see the module docstring), or ``None``. Pure."""
    if job.state != "PENDING" or job.state_reason not in WAITING_REASONS or job.submit_time is None:
        return None
    lease = job_lease(job)
    if lease is None or not lease.canonical:
        return None
    spec = lease.spec
    if spec.min is None or spec.vram is None:
        return None
    cls = spec.prio or cfg.policy.default_class
    policy = cfg.policy.classes.get(cls)
    if policy is None or not policy.may_degrade:
        return None
    waited = now - job.submit_time
    if waited < (spec.wait_s or 0):
        return None
    partition = job.partition or None
    floor = replace(spec, vram=spec.min, min=None, wait_s=None, mig=None, shards=None)
    try:
        now_choice = map_lease(tables, replace(spec, shards=None), partition=partition)
        choice = map_lease(tables, floor, partition=partition)
    except LeaseSpecError:
        return None  # the job's partition or class changed since submission: not ours to guess
    if choice.shards is not None:
        held = job.gres_shards if job.gres_shards is not None else now_choice.shards
        if held is not None and choice.shards >= held:
            return None
    elif choice.gres == now_choice.gres:
        return None  # whole GPUs (or a slice already the smallest that holds min): nothing to shrink
    total = choice.partition.gpu_total_mib
    comment = lease.prefix + specmod.format_spec(replace(floor, shards=choice.shards))
    return ShrinkPlan(job=job, cls=cls, comment=comment, tres=replace_gpu_gres(job.tres_per_node, choice.gres),
                      asked_mib=spec.vram.resolve(total), floor_mib=spec.min.resolve(total), waited_s=waited,
                      wait_s=spec.wait_s or 0, shards=choice.shards)


class Shrinker:
    """The shrink step: one ``scontrol update`` and one decision row per job due (see the module docstring).

    A failed update is recorded once per job and message (the next tick tries again without a new row);
    a job that started meanwhile is only logged.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._failed: dict[str, str] = {}

    def step(self, jobs: list[JobInfo], now: float) -> list[str]:
        """Shrink every job due; returns what was done (``shrink job 42``) for the tick's log."""
        if not self.ctx.settings.shrink:
            return []
        tables = self.ctx.tables()
        done = []
        listed = {j.job_id for j in jobs}
        self._failed = {k: v for k, v in self._failed.items() if k in listed}
        for job in jobs:
            plan = plan_shrink(self.ctx.cfg, tables, job, now)
            if plan is not None and self._apply(plan, now):
                done.append(f"shrink job {job.job_id}")
        return done

    def _apply(self, plan: ShrinkPlan, now: float) -> bool:
        job, ctx = plan.job, self.ctx
        try:
            ctx.slurm.update_job(job.job_id, Comment=plan.comment, TresPerNode=plan.tres)
        except JobNotPending:
            log(ctx.log_as, "shrink skipped: the job started meanwhile", job=job.job_id, tres=job.tres_per_node)
            return False
        except SlurmError as e:
            if self._failed.get(job.job_id) != str(e):
                self._failed[job.job_id] = str(e)
                ctx.record("shrink", "error", f"could not shrink pending job {job.job_id} to min="
                           f"{human_size(plan.floor_mib)}: {e}", job_id=job.job_id, restart_count=job.restart_count,
                           prio=plan.cls, requested_mib=plan.asked_mib, granted_mib=plan.floor_mib,
                           inputs={"from": job.tres_per_node, "to": plan.tres}, now=now)
            return False
        self._failed.pop(job.job_id, None)
        waited = format_duration(int(plan.waited_s))
        wait = f"wait={format_duration(plan.wait_s)}" if plan.wait_s else "no wait="
        floor = human_size(plan.floor_mib)
        ctx.record(
            "shrink", "degrade",
            f"job {job.job_id} pending ({job.state_reason}) for {waited}, past its {wait}: shrunk from "
            f"{job.tres_per_node or '?'} ({human_size(plan.asked_mib)}) to {plan.tres} (min={floor}); its Prolog "
            f"leases {floor}",
            job_id=job.job_id, restart_count=job.restart_count, prio=plan.cls, requested_mib=plan.asked_mib,
            granted_mib=plan.floor_mib, now=now,
            inputs={"from": job.tres_per_node, "to": plan.tres, "comment": plan.comment, "waited_s": int(plan.waited_s),
                    "wait_s": plan.wait_s, "state_reason": job.state_reason, "partition": job.partition,
                    "shards": plan.shards})
        return True
