"""The capacity model: who holds how much memory on each GPU (DESIGN.md, "Capacity model").

:func:`build_gpu_states` turns telemetry (GPUs and the processes on them), standing
reservations and live leases into one :class:`~slurm_gpuarb.model.GpuState` per GPU, whose
tenants are

- one per live lease on that GPU (``LEASE``), observing the processes of its Slurm job
  (through ``/proc/PID/cgroup``) or its host-plane PID;
- one per standing reservation of that node and GPU (``RESERVATION``), observing the
  processes its :class:`~slurm_gpuarb.model.Matcher` recognises;
- one per remaining process (``FOREIGN``, id ``pid:N``).

A process is attributed at most once, to a lease first, then to a reservation. A tenant
holds max(declared size, observed usage), so an Ollama reserved at 12 GiB and using 10.8 GiB
is counted once, as 12 GiB.

A *holder-mode* reservation (``mode = "holder"``) is held in Slurm by the controller's holder job
while its service is up, so it is never counted at its declared size here:

- while a live lease of that node *holds* it on its GPU (``Lease.holds``: the holder job's lease,
  recorded by the daemon), the reservation has no tenant of its own and the processes its matcher
  recognises count in that lease's observed usage (the lease's tenant has ``reservation`` set);
- otherwise (the holder was cancelled, or has not started yet) it is a tenant of size 0: only what
  its processes use counts, and the rest of its declared size is leasable to batch.

Static reservations always count at max(declared, observed).

Process details (name, uid, user, Slurm job) come from the telemetry record when it has them
(the fake backend fills them in) and otherwise from a :class:`ProcReader`, asked lazily and
at most once per PID per call: on a real host that means reading ``/proc``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from . import procfs
from .model import GpuInfo, GpuProcess, GpuState, Lease, LeaseState, Matcher, Reservation, Tenant, TenantKind

__all__ = [
    "LinuxProcReader",
    "ProcInfo",
    "ProcReader",
    "build_gpu_states",
    "describe_state",
    "job_id_from_cgroup",
    "matcher_matches",
    "no_proc_reader",
]

# /proc/PID/comm holds at most TASK_COMM_LEN - 1 = 15 bytes of the executable name (proc(5)).
_COMM_LEN = 15
_PIDFILE_MAX_BYTES = 64


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcInfo:
    """What ``/proc`` says about one process. Fields that could not be read are None."""

    pid: int
    name: str | None = None  # comm
    uid: int | None = None
    user: str | None = None
    job_id: str | None = None  # Slurm job, from the cgroup path


class ProcReader(Protocol):
    """Looks a PID up; returns None when the process is gone or cannot be read."""

    def __call__(self, pid: int) -> ProcInfo | None: ...


def job_id_from_cgroup(text: str) -> str | None:
    """The Slurm job id in the content of ``/proc/PID/cgroup``, or None for a process outside Slurm.

    Slurm puts a job's processes under a ``job_N`` directory below a Slurm-owned one:

    - cgroup v1: ``4:devices:/slurm/uid_1000/job_12/step_0/task_0``; a host running several
      slurmd (``--enable-multiple-slurmd``) uses ``/slurm_<nodename>/…`` instead of ``/slurm/``;
    - cgroup v2: ``0::/system.slice/slurmstepd.scope/job_12/step_batch/user/task_0``
      (``<nodename>_slurmstepd.scope`` with several slurmd).

    A ``job_N`` component counts only below a component naming slurm, so a container or
    service that happens to call a directory ``job_3`` is not taken for a Slurm job.
    """
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        seen_slurm = False
        for component in parts[2].split("/"):
            if seen_slurm and component.startswith("job_"):
                digits = component[4:]
                if digits.isascii() and digits.isdigit():
                    return digits
            if "slurm" in component:
                seen_slurm = True
    return None


class LinuxProcReader:
    """Reads ``/proc/PID/{comm,status,cgroup}``. A process that vanished (it may exit at any
    moment between NVML listing it and us reading it) gives None, never an exception."""

    def __init__(self, proc_root: str | os.PathLike[str] = "/proc") -> None:
        self.proc_root = Path(proc_root)

    def __call__(self, pid: int) -> ProcInfo | None:
        name, uid, user = procfs.identity(pid, self.proc_root)
        if name is None:
            return None
        text = procfs.cgroup(pid, self.proc_root)
        return ProcInfo(pid=pid, name=name, uid=uid, user=user,
                        job_id=job_id_from_cgroup(text) if text is not None else None)


def no_proc_reader(pid: int) -> ProcInfo | None:
    """A reader that knows nothing: for fake telemetry, whose PIDs are not this host's."""
    return None


_DEFAULT_READER = LinuxProcReader()


# --------------------------------------------------------------------------- matching


class _Proc:
    """A GPU process with lazily completed details (telemetry first, ``/proc`` for the gaps)."""

    __slots__ = ("_info", "_looked_up", "_reader", "rec")

    def __init__(self, rec: GpuProcess, reader: ProcReader) -> None:
        self.rec = rec
        self._reader = reader
        self._info: ProcInfo | None = None
        self._looked_up = False

    def _proc(self) -> ProcInfo | None:
        if not self._looked_up:
            self._looked_up = True
            self._info = self._reader(self.rec.pid)
        return self._info

    @property
    def name(self) -> str | None:
        if self.rec.name:
            # NVML reports a path (/usr/local/bin/ollama); matchers name the executable.
            return os.path.basename(self.rec.name) or self.rec.name
        info = self._proc()
        return info.name if info else None

    @property
    def uid(self) -> int | None:
        if self.rec.uid is not None:
            return self.rec.uid
        info = self._proc()
        return info.uid if info else None

    @property
    def user(self) -> str | None:
        if self.rec.user is not None:
            return self.rec.user
        if self.rec.uid is not None:
            return procfs.user_name(self.rec.uid)
        info = self._proc()
        return info.user if info else None

    @property
    def job_id(self) -> str | None:
        if self.rec.job_id is not None:
            return self.rec.job_id
        info = self._proc()
        return info.job_id if info else None

    def label(self) -> str:
        parts = [self.name or "?"]
        user = self.user
        if user is not None:
            parts.append(f"user={user}")
        elif self.uid is not None:
            parts.append(f"uid={self.uid}")
        job = self.job_id
        if job is not None:
            parts.append(f"job={job}")
        return " ".join(parts)


def _name_matches(wanted: str, actual: str | None) -> bool:
    if actual is None:
        return False
    if actual == wanted:
        return True
    # comm is truncated to 15 characters: "text-generation-launcher" reads "text-generation".
    return len(actual) == _COMM_LEN and wanted[:_COMM_LEN] == actual


def _user_matches(wanted: str, proc: _Proc) -> bool:
    if wanted.isdigit():  # a numeric user is a uid
        return proc.uid == int(wanted)
    return proc.user == wanted


def _read_pidfile(path: str) -> int | None:
    """The PID in a pidfile; None when missing, unreadable or not a PID (it then matches nothing)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_PIDFILE_MAX_BYTES)
    except OSError:
        return None
    tokens = head.split()
    if not tokens or not tokens[0].isdigit():
        return None
    pid = int(tokens[0])
    return pid if pid > 0 else None


def _matches(matcher: Matcher, proc: _Proc, pidfile_pid: int | None) -> bool:
    # A matcher with no field set matches nothing: such a reservation is a fixed size only.
    if matcher.process is None and matcher.user is None and matcher.pidfile is None:
        return False
    if matcher.pidfile is not None and (pidfile_pid is None or pidfile_pid != proc.rec.pid):
        return False
    if matcher.process is not None and not _name_matches(matcher.process, proc.name):
        return False
    return matcher.user is None or _user_matches(matcher.user, proc)


def matcher_matches(matcher: Matcher, process: GpuProcess, proc_reader: ProcReader | None = None) -> bool:
    """Whether ``matcher`` recognises ``process``: every field that is set must match
    (process name exactly, user name or numeric uid, the PID in the pidfile). A matcher with
    no field set, or whose pidfile is missing, unreadable or garbage, matches nothing."""
    pid = _read_pidfile(matcher.pidfile) if matcher.pidfile is not None else None
    return _matches(matcher, _Proc(process, proc_reader or _DEFAULT_READER), pid)


# --------------------------------------------------------------------------- GPU states


class _Acc:
    """Observed usage accumulating for one tenant while processes are attributed."""

    __slots__ = ("observed", "pids")

    def __init__(self) -> None:
        self.observed = 0
        self.pids: list[int] = []

    def add(self, rec: GpuProcess) -> None:
        self.observed += rec.used_mib
        self.pids.append(rec.pid)


def _lease_label(lease: Lease, holds: str | None = None) -> str:
    if lease.job_id is not None:
        label = f"job={lease.job_id}" + (f" restart={lease.restart_count}" if lease.restart_count else "")
    elif lease.pid is not None:
        label = f"pid={lease.pid}"
    else:
        label = ""
    if holds is None:
        return label
    return f"{label} holds={holds}" if label else f"holds={holds}"


def _matcher_label(matcher: Matcher) -> str:
    fields = (("process", matcher.process), ("user", matcher.user), ("pidfile", matcher.pidfile))
    return " ".join(f"{k}={v}" for k, v in fields if v is not None) or "fixed size"


#: the label prefix of a holder-mode reservation's tenant while no holder job holds it
UNHELD_LABEL = "holder mode, no holder job"

UNATTRIBUTED = "unattributed"
#: Memory in use that no listed process accounts for, below which it is rounding and per-context
#: overhead rather than a tenant (NVML rounds each process's usage to whole MiB).
UNATTRIBUTED_SLACK_MIB = 64


def _unattributed_mib(gpu: GpuInfo, seen_mib: int) -> int:
    """Memory the GPU reports in use beyond what its visible processes hold: processes in another
    PID namespace (a container), or a driver that hides them. It is real and must not be leased
    twice. A MIG GPU's usage cannot be placed in an instance from the parent's total, so it is
    left to the per-instance processes there."""
    if gpu.mig_enabled:
        return 0
    hidden = gpu.used_mib - seen_mib
    return hidden if hidden > UNATTRIBUTED_SLACK_MIB else 0


def build_gpu_states(
    node: str,
    gpus: Sequence[GpuInfo],
    processes: Sequence[GpuProcess],
    reservations: Sequence[Reservation],
    leases: Sequence[Lease],
    margin_mib: int,
    proc_reader: ProcReader | None = None,
    *,
    holding: str | None = None,
) -> list[GpuState]:
    """One :class:`GpuState` per GPU of ``node``, in the order of ``gpus``.

    Only leases of ``node`` in state GRANTED count; a lease spanning several GPUs becomes a
    tenant on each of them. Processes are attributed to a lease by the lease's PID
    (host plane) or Slurm job id (the process's own ``job_id`` or its cgroup), then to the
    first reservation whose matcher recognises them; the rest are foreign. Reservations with
    ``node=None`` apply to every node. A holder-mode reservation is counted as the module
    docstring says (in its holder's lease, else at size 0). ``holding``: the name of a
    holder-mode reservation that the request being decided will hold (a holder job's Prolog):
    unless a live lease already holds it, it gets no tenant and its processes count nowhere,
    since the requested size covers them. ``proc_reader`` defaults to reading ``/proc``; pass
    :func:`no_proc_reader` for fake telemetry. Runs in O(GPUs + leases + processes ×
    reservations-per-GPU).
    """
    reader: ProcReader = proc_reader if proc_reader is not None else _DEFAULT_READER
    present = {g.index for g in gpus}

    # Lease tenants per GPU, with lookup tables keyed by (pid, gpu) and (job id, gpu).
    lease_slots: dict[int, list[tuple[Lease, _Acc]]] = {i: [] for i in present}
    by_pid: dict[tuple[int, int], _Acc] = {}
    by_job: dict[tuple[str, int], _Acc] = {}
    # (reservation name, GPU) → the accumulator of the first live lease holding it there (Lease.holds).
    holders: dict[tuple[str, int], _Acc] = {}
    seen_leases: set[str] = set()
    for lease in leases:
        if lease.state is not LeaseState.GRANTED or lease.node != node or lease.id in seen_leases:
            continue
        seen_leases.add(lease.id)
        for index in dict.fromkeys(lease.gpus):  # a GPU listed twice is still one tenant
            if index not in present:
                continue
            acc = _Acc()
            lease_slots[index].append((lease, acc))
            if lease.holds is not None:
                holders.setdefault((lease.holds, index), acc)
            # The first lease wins a shared key (deterministic; two live leases of one job on one
            # GPU would be a ledger bug, and the arbiter then sees the others at their size).
            if lease.pid is not None:
                by_pid.setdefault((lease.pid, index), acc)
            if lease.job_id is not None:
                by_job.setdefault((lease.job_id, index), acc)

    # Per GPU: (reservation, where its processes count, their pidfile's PID, how it is counted: "static" at
    # max(declared, observed), "unheld" at what its processes use, "held" not at all: a lease or the
    # request being decided holds it).
    res_slots: dict[int, list[tuple[Reservation, _Acc, int | None, str]]] = {i: [] for i in present}
    held_by: set[int] = set()  # id() of the holder leases' accumulators, to mark those leases' tenants
    pidfiles: dict[str, int | None] = {}
    for r in reservations:
        if r.gpu not in present or (r.node is not None and r.node != node):
            continue
        pid = None
        if r.match.pidfile is not None:
            if r.match.pidfile not in pidfiles:
                pidfiles[r.match.pidfile] = _read_pidfile(r.match.pidfile)
            pid = pidfiles[r.match.pidfile]
        how = "static"
        acc = _Acc()
        if r.mode == "holder":
            holder = holders.get((r.name, r.gpu))
            if holder is not None:
                acc, how = holder, "held"
                held_by.add(id(holder))
            elif holding == r.name:
                how = "held"  # the request's size covers its processes: they count nowhere
            else:
                how = "unheld"
        res_slots[r.gpu].append((r, acc, pid, how))

    # NVML may list one PID twice on a GPU (as a compute and as a graphics process) with the
    # same process-wide usage: keep one record, the larger, so it is not counted twice.
    unique: dict[tuple[int, int], GpuProcess] = {}
    for rec in processes:
        if rec.gpu_index not in present:
            continue
        key = (rec.gpu_index, rec.pid)
        seen = unique.get(key)
        if seen is None or rec.used_mib > seen.used_mib:
            unique[key] = rec

    foreign: dict[int, list[Tenant]] = {i: [] for i in present}
    has_job_leases = bool(by_job)
    seen_mib: dict[int, int] = {}
    for (index, pid), rec in unique.items():
        seen_mib[index] = seen_mib.get(index, 0) + rec.used_mib
        owner: _Acc | None = by_pid.get((pid, index))
        proc = _Proc(rec, reader)
        if owner is None and has_job_leases:
            job = proc.job_id
            if job is not None:
                owner = by_job.get((job, index))
        if owner is None:
            for r, racc, pidfile_pid, _ in res_slots[index]:
                if _matches(r.match, proc, pidfile_pid):
                    owner = racc
                    break
        if owner is not None:
            owner.add(rec)
            continue
        foreign[index].append(
            Tenant(
                kind=TenantKind.FOREIGN,
                id=f"pid:{pid}",
                size_mib=0,
                observed_mib=rec.used_mib,
                pids=(pid,),
                label=proc.label(),
                mig_uuid=rec.mig_uuid,
            )
        )

    states: list[GpuState] = []
    for gpu in gpus:
        # Only a lease a holder-mode reservation here counts in is marked (a stale or foreign claim is not).
        tenants = [
            Tenant(
                kind=TenantKind.LEASE,
                id=lease.id,
                size_mib=lease.vram_mib,
                observed_mib=acc.observed,
                pids=tuple(acc.pids),
                prio=lease.prio,
                priority=lease.priority,
                preemptible=lease.preemptible,
                label=_lease_label(lease, holds),
                mig_uuid=lease.mig_uuid,
                reservation=holds,
            )
            for lease, acc in lease_slots[gpu.index]
            for holds in (lease.holds if held_by and id(acc) in held_by else None,)
        ]
        for r, acc, _, how in res_slots[gpu.index]:
            if how == "held":
                continue
            unheld = how == "unheld"
            label = _matcher_label(r.match)
            tenants.append(Tenant(
                kind=TenantKind.RESERVATION,
                id=r.name,
                size_mib=0 if unheld else r.size_mib,
                observed_mib=acc.observed,
                pids=tuple(acc.pids),
                label=f"{UNHELD_LABEL}: {label}" if unheld else label,
                reservation=r.name if unheld else None,
            ))
        tenants.extend(sorted(foreign[gpu.index], key=lambda t: t.pids))
        hidden = _unattributed_mib(gpu, seen_mib.get(gpu.index, 0))
        if hidden:
            tenants.append(Tenant(kind=TenantKind.FOREIGN, id=UNATTRIBUTED, size_mib=0, observed_mib=hidden,
                                  label="in use by no process telemetry can see"))
        states.append(GpuState(node=node, gpu=gpu, margin_mib=margin_mib, tenants=tuple(tenants)))
    return states


def describe_state(state: GpuState) -> dict[str, Any]:
    """A JSON-serialisable snapshot of one GPU's capacity, as stored in decision rows and read
    back by ``gpuarb explain``. Derived numbers (usable, held, free) are included so that an
    explanation never has to recompute them with today's code. The shape is the arbiter's
    ``{"node", "index", "uuid", "name", "total_mib", "reserved_mib", "margin_mib", "usable_mib",
    "held_mib", "free_mib", "tenants": [...]}`` plus a few fields for people (sku, used, priority).
    A tenant that accounts for a holder-mode reservation carries ``"reservation": NAME`` (a lease:
    the holder job's lease holding it; a reservation: itself, held by no holder job, counted at
    what its processes use); other tenants have no such key.
    """
    held = 0
    tenants: list[dict[str, Any]] = []
    for t in state.tenants:
        # Tenant.held_mib and GpuState.held_mib inlined: one pass, this runs on every decision.
        t_held = t.size_mib if t.size_mib >= t.observed_mib else t.observed_mib
        held += t_held
        snap: dict[str, Any] = {
            "kind": t.kind.value,
            "id": t.id,
            "size_mib": t.size_mib,
            "observed_mib": t.observed_mib,
            "held_mib": t_held,
            "pids": list(t.pids),
            "prio": t.prio,
            "priority": t.priority,
            "preemptible": t.preemptible,
            "label": t.label,
            "mig_uuid": t.mig_uuid,
        }
        if t.reservation is not None:
            snap["reservation"] = t.reservation
        tenants.append(snap)
    gpu = state.gpu
    usable = state.usable_mib
    return {
        "node": state.node,
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "sku": gpu.sku,
        "mig_enabled": gpu.mig_enabled,
        "total_mib": gpu.total_mib,
        "reserved_mib": gpu.reserved_mib,
        "margin_mib": state.margin_mib,
        "used_mib": gpu.used_mib,
        "usable_mib": usable,
        "held_mib": held,
        "free_mib": max(0, usable - held),
        "tenants": tenants,
    }
