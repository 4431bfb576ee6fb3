"""Holder jobs: standing reservations (``mode = "holder"``) held in Slurm while their service is up.

Slurm cannot change a file-bound GRES count at run time, so a reservation whose memory should be
lent to batch while its service (an Ollama on the host, a vLLM outside Slurm) is down is *held* by
a job instead (DESIGN.md, "Standing reservations under Slurm"). Each tick, per holder reservation:

* **service up** (probe state ``up``, ``degraded`` or ``busy``) and no holder job → submit one;
  while one is pending or running → nothing;
* **service down** → the holder stays through the reservation's grace period (``grace``; a restart
  or a model swap is not an outage), then is cancelled: its shards become leasable to batch;
* **back up** → a new holder is submitted; Slurm's QoS preemption requeues the batch jobs in its way.
* the probe could not be asked (``probe_fn`` answered ``None``) → nothing changes.

The holder job is ``sbatch -J gpuarb-hold-<name> -p <partition> -w <node> --qos <class QoS> --time
<holder_time_limit> --no-requeue`` with a script that only sleeps, and the comment
``gpuarb-holder=<name> gpuarb/1: vram=<N × quantum>MiB prio=<class> shards=N``: the canonical lease
job_submit.lua maps to ``gres:shard:N`` (it sets the GRES; the holder asks for none itself), where
N covers the reservation's size, max(declared, observed) (:meth:`.Reservation.held_mib`). The class
is ``holder_class`` or else the non-preemptible class of highest priority (``llm``); the partition
``holder_partition`` or else the first partition holding the node that admits the class, one whose
mode is the GPU's own preferred (a shard GPU is held with shards, not whole). Shards on a node with
several GPUs may come from any of them: holders pin exactly on single-GPU nodes (DESIGN.md). A
holder is sized when it is submitted and not resized while it runs (a running job's GRES is fixed):
declare the size the service's largest model needs.

Nothing is kept only in memory: a holder is found each tick by its job name, its comment's
``gpuarb-holder=<name>`` and the agent's uid in the job listing, and when the service went down is
read back from the ledger's last ``service``/``unhold`` row after a restart. Each action is a
decision row (``hold`` submitted, ``service`` down, ``unhold`` cancelled) naming the reservation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .. import spec as specmod
from ..errors import ConfigError, GpuArbError
from ..holder import HOLDER_PREFIX, holder_of
from ..logsink import log
from ..lua import map_lease
from ..model import LeaseSpec, Reservation, Vram
from ..units import format_duration, human_size
from .common import Context, ProbeFn, ProbeStatus

if TYPE_CHECKING:
    from ..config import Config
    from ..lua import SubmitTables
    from ..slurm.base import JobInfo

__all__ = [
    "HOLDER_PREFIX",
    "HOLDER_SCRIPT",
    "UP_STATES",
    "HolderPlan",
    "Holders",
    "holder_job_name",
    "holder_of",
    "plan_holder",
]

HOLDER_SCRIPT: Final = ("#!/bin/sh\n# gpuarb holder job: holds a standing reservation's GPU memory in Slurm while its "
                        "service is up\nexec sleep infinity\n")
#: probe states in which the service is there (degraded: a model partly on the CPU; busy: overloaded)
UP_STATES: Final = frozenset({"up", "degraded", "busy"})
_ROW_ACTIONS: Final = ("hold", "service", "unhold")
_RESTORE_ROWS: Final = 200


def holder_job_name(reservation: str) -> str:
    """The job name of a reservation's holder (``gpuarb-hold-ollama``)."""
    return f"gpuarb-hold-{reservation}"


# --------------------------------------------------------------------------- what to submit


@dataclass(frozen=True)
class HolderPlan:
    """The holder job of one reservation: where, as what, for how much, and its sbatch arguments."""

    reservation: str
    node: str
    partition: str
    cls: str
    qos: str
    size_mib: int  # what it holds: shards × quantum, or the size on a whole GPU / MIG slice
    shards: int | None
    comment: str
    args: tuple[str, ...]


def _holder_class(cfg: Config, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in cfg.policy.classes:
            raise ConfigError(f"[controller] holder_class {wanted!r} is not a declared class "
                              f"(declared: {', '.join(cfg.policy.classes)})")
        return wanted
    fixed = [c for c in cfg.policy.classes.values() if not c.preemptible]
    if not fixed:
        raise ConfigError("holder jobs need a non-preemptible class (a holder must not be requeued for batch): "
                          "declare one, or set [controller] holder_class")
    return max(fixed, key=lambda c: c.priority).name


def _holder_partition(cfg: Config, res: Reservation, node: str, cls: str, wanted: str | None) -> str:
    if wanted is not None:
        return wanted
    gpu_mode = next((g.mode for n in cfg.nodes if n.name == node for g in n.gpus if g.index == res.gpu), None)
    fits = [p for p in cfg.partitions if node in p.nodes and cls in p.classes]
    for p in sorted(fits, key=lambda p: p.mode != gpu_mode):  # stable: the inventory's order otherwise
        return p.name
    raise ConfigError(f"reservation '{res.name}': no partition holds node {node} and admits prio={cls} for its holder "
                      f"job; add one to [[partitions]] or set [controller] holder_partition")


def plan_holder(cfg: Config, tables: SubmitTables, res: Reservation, size_mib: int, *,
                holder_class: str | None = None, holder_partition: str | None = None,
                time_limit: str = "UNLIMITED") -> HolderPlan:
    """The holder job for ``res`` holding ``size_mib``. Raises :class:`~slurm_gpuarb.errors.ConfigError`
    (no node, no class, no partition) or :class:`~slurm_gpuarb.errors.LeaseSpecError` (too big for one
    GPU of the partition), each saying what to change."""
    if res.node is None:
        raise ConfigError(f"reservation '{res.name}' has mode = \"holder\" but no node: a holder job runs on one "
                          f"node; set node = \"…\" (or use mode = \"static\" for every node)")
    cls = _holder_class(cfg, holder_class)
    partition = _holder_partition(cfg, res, res.node, cls, holder_partition)
    lease = LeaseSpec(vram=Vram(mib=size_mib), prio=cls)
    choice = map_lease(tables, lease, partition=partition)
    if choice.shards is not None:
        lease = LeaseSpec(vram=Vram(mib=choice.shards * tables.quantum_mib), prio=cls, shards=choice.shards)
    held = lease.vram.mib if lease.vram is not None and lease.vram.mib is not None else size_mib
    comment = f"{HOLDER_PREFIX}{res.name} {specmod.format_spec(lease)}"
    qos = cfg.policy.classes[cls].qos or cls
    args = ("--job-name", holder_job_name(res.name), "--partition", partition, "--nodelist", res.node,
            "--qos", qos, "--time", time_limit, "--no-requeue", "--ntasks", "1", "--output", "/dev/null",
            "--chdir", "/", "--comment", comment)
    return HolderPlan(res.name, res.node, partition, cls, qos, held, choice.shards, comment, args)


# --------------------------------------------------------------------------- the step


class Holders:
    """The holder step (see the module docstring). State that must survive a restart lives in Slurm and
    the ledger; what is kept here (when a service went down, problems already recorded) is rebuilt."""

    def __init__(self, ctx: Context, probe_fn: ProbeFn) -> None:
        self.ctx = ctx
        self.probe_fn = probe_fn
        self._down_since: dict[str, float] = {}
        self._restored: set[str] = set()
        self._noted: dict[str, str] = {}  # reservation → the problem last recorded for it

    def reservations(self) -> list[Reservation]:
        """The reservations this step keeps holders for."""
        return [r for r in self.ctx.cfg.reservations if r.mode == "holder"]

    def step(self, jobs: list[JobInfo], now: float) -> list[str]:
        """One pass over the holder reservations; returns what was done for the tick's log."""
        done: list[str] = []
        for res in self.reservations():
            try:
                done += self._one(res, jobs, now)
            except GpuArbError as e:  # this reservation's problem; the others go on
                self._note(res, "error", str(e), now)
        return done

    def holders_of(self, res: Reservation, jobs: list[JobInfo]) -> list[JobInfo]:
        """The agent's holder jobs for ``res`` that Slurm has pending or running, running ones first."""
        name = holder_job_name(res.name)
        found = [j for j in jobs if j.name == name and holder_of(j.comment) == res.name and j.uid == self.ctx.uid
                 and (j.state == "PENDING" or j.holds_allocation)]
        return sorted(found, key=lambda j: (not j.holds_allocation, int(j.job_id.split("_")[0])))

    def _one(self, res: Reservation, jobs: list[JobInfo], now: float) -> list[str]:
        ctx = self.ctx
        if res.name not in self._restored:
            self._restore(res)
        status = self.probe_fn(res)
        holders = self.holders_of(res, jobs)
        done = [self._cancel(res, extra, "duplicate holder job: one is enough", now) for extra in holders[1:]]
        holder = holders[0] if holders else None
        if status is None:
            log(ctx.log_as, "holder: the service could not be probed; nothing changes", reservation=res.name)
            return done
        if status.state in UP_STATES:
            since = self._down_since.pop(res.name, None)
            if holder is None:
                done.append(self._submit(res, status, since, now))
            elif holder.state != "PENDING" and holder.gres_shards is None and self._plan(res, status).shards:
                # job_submit.lua gave it no GRES: it holds nothing, and a new one would not either.
                self._note(res, "error", f"holder job {holder.job_id} holds no shards: job_submit.lua did not map "
                           f"its lease (is JobSubmitPlugins=lua loaded? gpuarb render --lua)", now)
            return done
        if res.name not in self._down_since:
            self._down_since[res.name] = now
            kept = (f"holder job {holder.job_id} keeps its memory for the grace period ({_dur(res)})"
                    if holder is not None else "no holder job runs")
            ctx.record("service", "down", f"{res.name} down ({status.reason}): {kept}", node=res.node,
                       job_id=holder.job_id if holder else None, now=now,
                       inputs=self._inputs(res, status, down_since=now))
        down_for = now - self._down_since[res.name]
        if holder is not None and down_for >= _grace(res):
            plan = self._plan(res, status)
            done.append(self._cancel(res, holder, (
                f"{res.name} down for {format_duration(int(down_for))} (grace {_dur(res)}): holder job "
                f"{holder.job_id} cancelled; {_held(plan)} on {res.node} gpu{res.gpu} leasable to batch"), now,
                inputs=self._inputs(res, status, down_since=self._down_since[res.name])))
        return done

    def _plan(self, res: Reservation, status: ProbeStatus | None) -> HolderPlan:
        s = self.ctx.settings
        size = res.held_mib(status.observed_vram_mib if status is not None else None)
        return plan_holder(self.ctx.cfg, self.ctx.tables(), res, size, holder_class=s.holder_class,
                           holder_partition=s.holder_partition, time_limit=s.holder_time_limit)

    def _submit(self, res: Reservation, status: ProbeStatus, down_since: float | None, now: float) -> str:
        plan = self._plan(res, status)
        job_id = self.ctx.slurm.submit(plan.args, HOLDER_SCRIPT)
        back = f"; back after {format_duration(int(now - down_since))} down" if down_since is not None else ""
        self.ctx.record("hold", "submitted", (
            f"{res.name} {status.state} ({status.reason}){back}: holder job {job_id} submitted for {_held(plan)} on "
            f"{plan.node} gpu{res.gpu} (partition {plan.partition}, prio {plan.cls}); Slurm's QoS preemption "
            f"requeues batch jobs in its way"), node=res.node, job_id=job_id, prio=plan.cls,
            requested_mib=plan.size_mib, now=now,
            inputs={**self._inputs(res, status), "partition": plan.partition, "shards": plan.shards,
                    "comment": plan.comment})
        self._noted.pop(res.name, None)
        return f"hold {res.name} job {job_id}"

    def _cancel(self, res: Reservation, job: JobInfo, reason: str, now: float,
                inputs: Mapping[str, Any] | None = None) -> str:
        self.ctx.slurm.cancel(job.job_id)
        self.ctx.record("unhold", "cancelled", reason, node=res.node, job_id=job.job_id, now=now,
                        inputs={"reservation": res.name, **(inputs or {})})
        return f"unhold {res.name} job {job.job_id}"

    def _note(self, res: Reservation, outcome: str, problem: str, now: float) -> None:
        """Record a problem once (a tick every few seconds must not write the same row each time)."""
        if self._noted.get(res.name) == problem:
            return
        self._noted[res.name] = problem
        self.ctx.record("hold", outcome, f"{res.name}: {problem}", node=res.node, now=now,
                        inputs={"reservation": res.name})

    def _inputs(self, res: Reservation, status: ProbeStatus | None, *,
                down_since: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"reservation": res.name, "declared_mib": res.size_mib, "gpu": res.gpu,
                               "grace_s": _grace(res)}
        if status is not None:
            out.update(state=status.state, observed_mib=status.observed_vram_mib, probe=status.reason)
        if down_since is not None:
            out["down_since"] = down_since
        return out

    def _restore(self, res: Reservation) -> None:
        """After a restart: was the service down when the agent stopped? The ledger's last row says."""
        self._restored.add(res.name)
        rows = self.ctx.ledger.decisions(plane="agent", node=res.node, limit=_RESTORE_ROWS)
        for row in reversed(rows):
            # Only rows written on a probe's answer (they carry its state) say whether the service was up.
            if row.action not in _ROW_ACTIONS or row.inputs.get("reservation") != res.name or "state" not in row.inputs:
                continue
            since = row.inputs.get("down_since")
            if row.action in ("service", "unhold") and isinstance(since, int | float):
                self._down_since[res.name] = float(since)
            return


def _grace(res: Reservation) -> float:
    return float(res.grace_s)


def _dur(res: Reservation) -> str:
    return format_duration(int(_grace(res)))


def _held(plan: HolderPlan) -> str:
    size = human_size(plan.size_mib)
    return f"{plan.shards} shards ({size})" if plan.shards is not None else size
