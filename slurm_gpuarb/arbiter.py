"""The arbiter: one pure function from (request, GPU states, policy) to a :class:`Decision`.

:func:`decide` does no I/O and reads no clock (``request.now`` is the time). It runs inside
the ledger's lock for every job, so it touches each tenant a constant number of times:
O(GPUs + tenants), plus O(k log n) when it has to pick k leases to revoke among n.

The rules, in the order they are tried:

1. **Refusals that can never change** → ``DENY``: an unknown class, a pinned GPU that does
   not exist, ``mig=`` on a node without MIG GPUs, a size of zero, more GPUs than the node
   has, or a size above what a GPU could ever lease with every lease gone
   (total − driver reserve − margin − standing reservations). The reason says the most that
   could ever fit and what to ask for instead.
2. **Fit now** → ``GRANT``. A GPU fits when ``size ≤ free`` (the margin is already inside
   ``usable``, so this is ``used + requested + margin ≤ total``). Among fitting GPUs the
   arbiter takes the *best fit*: the GPU with the least free memory that still fits, ties to
   the lowest index, so the big holes stay for big requests. On a MIG GPU the hole is a free
   instance: the smallest one that holds the size (``mig=any``), or one of exactly the asked
   profile; the grant is the instance's whole memory.
3. **Preempt** → ``GRANT`` with ``revoke``: only for a non-preemptible class (LLM serving),
   only LEASE tenants that are preemptible *and* of strictly lower priority, never
   reservations or foreign processes. Per GPU the leases are taken lowest priority first,
   then largest first (fewest revocations), and a final pass gives back any lease the
   grant turned out not to need. Among GPUs, the one that revokes the fewest MiB wins.
4. **Degrade** → ``DEGRADE``: when the spec has ``min=`` and the class may degrade, the GPU
   with the most free memory gives ``min(size, free)`` rounded down to the policy quantum,
   never below ``min``.
5. Otherwise ``WAIT``, with what is free where, who holds the rest, and what would help.

``gpus=N>1`` asks for N distinct whole (non-MIG) GPUs, each with the size free; a MIG lease
is always one instance.

Under Slurm the allocation is already made, and the Prolog says so: ``request.pinned`` (NVML
indices) makes the lease cover exactly those GPUs (``gpus=`` is then ignored: the lease is what
Slurm gave), ``request.pinned_mig_uuid`` makes it exactly that MIG instance (granted whole, as
every MIG grant; a ``vram=`` above its memory is a DENY), and a pinned GPU or instance that does
not exist is a DENY naming it. ``request.preempt=False`` skips rule 3: Slurm's QoS already preempted what it
would, and a Prolog never revokes another job's lease. A percent size is resolved on each GPU; a multi-GPU grant is the
smallest of the per-GPU resolutions, so every GPU of the lease carries the same cap.

``decision.inputs`` (JSON-serialisable, stored in the ledger, read by :mod:`explain`)::

    {"request": {<spec key>: <canonical string>, …, "node", "gpu", "job_id", "restart_count"},
     "class":   {"name", "priority", "preemptible", "may_degrade"},   # only "name" if unknown
     "policy":  {"margin_mib", "quantum_mib"},
     "gpus":    [<GPU snapshot>, …],   # every GPU of the node the request could use
     "chosen":  [gpu index, …],
     "revoked": [{"id", "prio", "held_mib"}, …],
     "mig":     [{"gpu", "uuid", "profile", "memory_mib", "tenant"}, …],  # only with MIG GPUs
     "mig_uuid": <granted instance uuid or None>}

A GPU snapshot (see :func:`describe_state`)::

    {"node", "index", "uuid", "name", "total_mib", "reserved_mib", "margin_mib",
     "usable_mib", "held_mib", "free_mib",
     "tenants": [{"kind", "id", "size_mib", "observed_mib", "held_mib", "pids", "prio",
                  "label", "mig_uuid"}, …]}
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from slurm_gpuarb.capacity import describe_state
from slurm_gpuarb.model import (
    ClassPolicy,
    Decision,
    GpuState,
    LeaseSpec,
    MigInstance,
    Outcome,
    Policy,
    Request,
    Tenant,
    TenantKind,
)
from slurm_gpuarb.units import format_duration, human_size

__all__ = ["decide", "describe_state", "spec_size", "tenant_phrase"]

_MAX_NAMED = 3  # tenants / GPUs named in one reason: enough to act on, short enough to read


# --------------------------------------------------------------------------- naming helpers


def tenant_phrase(kind: str, tenant_id: str, prio: str | None = None, label: str = "",
                  pids: Sequence[int] = ()) -> str:
    """How a reason names a tenant: ``ollama (reservation)``, ``lease L1 (batch)``, ``foreign pid 7 (python3)``."""
    if kind == TenantKind.RESERVATION:
        return f"{tenant_id} (reservation)"
    if kind == TenantKind.LEASE:
        return f"lease {tenant_id} ({prio})" if prio else f"lease {tenant_id}"
    if not pids and not tenant_id.startswith("pid:"):  # capacity.UNATTRIBUTED: no process to name
        return f"memory {label}" if label else f"{tenant_id} memory"
    pid = str(pids[0]) if pids else tenant_id.removeprefix("pid:")
    return f"foreign pid {pid} ({label})" if label else f"foreign pid {pid}"


def _phrase(t: Tenant) -> str:
    return tenant_phrase(t.kind, t.id, t.prio, t.label, t.pids)


def _gpu_name(state: GpuState) -> str:
    return f"GPU {state.gpu.index} ({state.gpu.name})"


def spec_size(mib: int) -> str:
    """A size for a spec token that parses back to exactly ``mib``: ``4GiB``, ``2.5GiB``, ``10952MiB``.

    ``human_size`` rounds (10.7GiB may be more than what is free), so a suggested token uses
    GiB only when a decimal with at most three places is exact (multiples of 128MiB), else MiB.
    """
    mib = max(mib, 0)
    if mib < 1024 or mib % 128:
        return f"{mib}MiB"
    whole, rest = divmod(mib, 1024)
    frac = f"{rest * 1000 // 1024:03d}".rstrip("0")
    return f"{whole}.{frac}GiB" if frac else f"{whole}GiB"


# --------------------------------------------------------------------------- inputs


def _spec_inputs(spec: LeaseSpec) -> dict[str, str]:
    fields: list[tuple[str, object]] = [
        ("vram", spec.vram), ("gpus", spec.gpus), ("prio", spec.prio), ("min", spec.min), ("mig", spec.mig),
        ("share", spec.share), ("ttl", None if spec.ttl_s is None else format_duration(spec.ttl_s)),
        ("wait", None if spec.wait_s is None else format_duration(spec.wait_s)), ("engine", spec.engine),
        ("shards", spec.shards),
    ]
    return {k: str(v) for k, v in fields if v is not None}


def _class_inputs(name: str, cls: ClassPolicy | None) -> dict[str, Any]:
    if cls is None:
        return {"name": name}
    return {"name": cls.name, "priority": cls.priority, "preemptible": cls.preemptible,
            "may_degrade": cls.may_degrade}


def _mig_inputs(states: Iterable[GpuState]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for s in states:
        if not s.gpu.mig_enabled:
            continue
        by_uuid = {t.mig_uuid: t.id for t in s.tenants if t.mig_uuid is not None}
        out.extend({"gpu": s.gpu.index, "uuid": i.uuid, "profile": i.profile, "memory_mib": i.memory_mib,
                    "tenant": by_uuid.get(i.uuid)} for i in s.gpu.mig_instances)
    return out


# --------------------------------------------------------------------------- per-GPU view


@dataclass(slots=True)
class _View:
    """What one candidate GPU offers this request, computed in one pass over its tenants."""

    state: GpuState
    index: int
    size: int  # the request resolved on this GPU (0: undefined here, e.g. no instance of the profile)
    usable: int
    held: int
    reserved_held: int
    free: int  # whole GPU: free MiB; MIG: memory of the largest free eligible instance
    ever: int  # the most this request could ever get here, with every lease and foreign process gone
    mig: bool = False
    instances: list[MigInstance] = field(default_factory=list)  # eligible instances (MIG only)
    occupants: dict[str, list[Tenant]] = field(default_factory=dict)  # MIG uuid → tenants in it
    fit: MigInstance | None = None  # the free instance a MIG grant would take now

    @property
    def fits(self) -> bool:
        if self.mig:
            return self.fit is not None
        return 0 < self.size <= self.free

    @property
    def hole(self) -> int:
        """The free space a grant would go into (best fit minimises it)."""
        return self.fit.memory_mib if self.fit is not None else self.free


def _view(state: GpuState, snap: dict[str, Any], spec: LeaseSpec, profile: str | None,
          only_uuid: str | None = None) -> _View:
    """``snap`` is ``describe_state(state)``: its sums are reused rather than recomputed.
    ``only_uuid`` restricts a MIG GPU to the one instance Slurm allocated."""
    held: int = snap["held_mib"]
    usable: int = snap["usable_mib"]
    reserved = sum(t["held_mib"] for t in snap["tenants"] if t["kind"] == TenantKind.RESERVATION)
    mig = state.gpu.mig_enabled
    occupants: dict[str, list[Tenant]] = {}
    if mig:
        for t in state.tenants:
            if t.mig_uuid is not None:
                occupants.setdefault(t.mig_uuid, []).append(t)
    total = state.gpu.total_mib
    if not mig:
        size = spec.vram.resolve(total) if spec.vram is not None else 0
        return _View(state, state.gpu.index, size, usable, held, reserved, max(0, usable - held),
                     max(0, usable - reserved))
    if only_uuid is not None:
        eligible = [i for i in state.gpu.mig_instances if i.uuid == only_uuid]
    else:
        eligible = [i for i in state.gpu.mig_instances if profile is None or i.profile == profile]
    if spec.vram is not None:
        size = spec.vram.resolve(total)
    elif eligible:
        # mig=<profile> without vram asks for the profile's memory; mig=any for the smallest instance
        size = min(i.memory_mib for i in eligible)
    else:
        size = 0
    fit: MigInstance | None = None
    free = ever = 0
    for inst in eligible:
        occ = occupants.get(inst.uuid)
        if not occ:
            free = max(free, inst.memory_mib)
            if inst.memory_mib >= size and (fit is None or inst.memory_mib < fit.memory_mib):
                fit = inst
        if not occ or all(t.kind != TenantKind.RESERVATION for t in occ):
            ever = max(ever, inst.memory_mib)
    return _View(state, state.gpu.index, size, usable, held, reserved, free, ever, True, eligible, occupants,
                 fit if size > 0 else None)


def _revocable(t: Tenant, cls: ClassPolicy) -> bool:
    return t.kind == TenantKind.LEASE and t.preemptible and t.priority < cls.priority


def _revocation_plan(v: _View, cls: ClassPolicy) -> tuple[int, list[Tenant], MigInstance | None] | None:
    """The cheapest set of leases whose revocation makes the request fit on this GPU, or None."""
    if v.mig:
        best: tuple[int, int, MigInstance, list[Tenant]] | None = None
        for inst in v.instances:
            occ = v.occupants.get(inst.uuid)
            if not occ or inst.memory_mib < v.size or not all(_revocable(t, cls) for t in occ):
                continue
            cost = sum(t.held_mib for t in occ)
            if best is None or (cost, inst.memory_mib) < (best[0], best[1]):
                best = (cost, inst.memory_mib, inst, occ)
        return None if best is None else (best[0], best[3], best[2])
    need = v.size - (v.usable - v.held)
    pool = [(t.priority, -t.held_mib, n, t) for n, t in enumerate(v.state.tenants) if _revocable(t, cls)]
    if sum(-p[1] for p in pool) < need:
        return None
    # a heap, not a sort: revocations are few, tenants may be thousands
    heapq.heapify(pool)
    chosen: list[Tenant] = []
    got = 0
    while got < need:
        t = heapq.heappop(pool)[3]
        chosen.append(t)
        got += t.held_mib
    # give back what the grant does not need, highest priority and smallest first
    kept: list[Tenant] = []
    for t in reversed(chosen):
        if got - t.held_mib >= need:
            got -= t.held_mib
        else:
            kept.append(t)
    kept.reverse()
    return got, kept, None


# --------------------------------------------------------------------------- decide


@dataclass(slots=True)
class _Answer:
    """Collects the decision's inputs so every exit path records them the same way."""

    request: Request
    prio: str
    inputs: dict[str, Any]

    def make(self, outcome: Outcome, reason: str, requested: int | None, granted: int = 0,
             chosen: Sequence[_View] = (), mig_uuid: str | None = None, revoke: Sequence[Tenant] = ()) -> Decision:
        gpus = tuple(sorted(v.index for v in chosen))
        self.inputs["chosen"] = list(gpus)
        self.inputs["revoked"] = [{"id": t.id, "prio": t.prio, "held_mib": t.held_mib} for t in revoke]
        self.inputs["mig_uuid"] = mig_uuid
        return Decision(outcome=outcome, node=self.request.node, reason=reason, prio=self.prio,
                        requested_mib=requested, granted_mib=granted, gpus=gpus, mig_uuid=mig_uuid,
                        revoke=tuple(t.id for t in revoke), inputs=self.inputs)


def decide(request: Request, states: Sequence[GpuState], policy: Policy) -> Decision:
    """Decide one lease request against the GPU states of its node; pure and O(GPUs + tenants).

    ``states`` may hold other nodes' GPUs: only those of ``request.node`` are candidates. The
    returned decision's ``reason`` is one or two sentences a person can act on; its ``inputs``
    hold everything :mod:`slurm_gpuarb.explain` needs to retell the decision later.
    """
    spec = request.spec
    cname = spec.prio or policy.default_class
    cls = policy.classes.get(cname)
    req_inputs: dict[str, Any] = _spec_inputs(spec)
    req_inputs.update(node=request.node, gpu=request.gpu, job_id=request.job_id,
                      restart_count=request.restart_count)
    # Only when set, so host-plane decisions keep their shape.
    if request.pinned:
        req_inputs["pinned"] = list(request.pinned)
    if request.pinned_mig_uuid is not None:
        req_inputs["pinned_mig_uuid"] = request.pinned_mig_uuid
    if not request.preempt:
        req_inputs["preempt"] = False
    inputs: dict[str, Any] = {
        "request": req_inputs,
        "class": _class_inputs(cname, cls),
        "policy": {"margin_mib": policy.margin_mib, "quantum_mib": policy.quantum_mib},
        "gpus": [],
    }
    ans = _Answer(request, cname, inputs)
    node = request.node

    if cls is None:
        known = ", ".join(sorted(policy.classes)) or "none configured"
        return ans.make(Outcome.DENY, f"unknown class '{cname}'; classes: {known}. Ask for prio= with one of them.",
                        None)

    on_node = [s for s in states if s.node == node]
    if not on_node:
        return ans.make(Outcome.DENY, f"node {node} has no GPUs known to gpuarb; submit to a GPU node "
                        "or check the inventory.", None)
    cands = on_node
    pin_uuid = request.pinned_mig_uuid
    if pin_uuid is not None:
        cands = [s for s in on_node if any(i.uuid == pin_uuid for i in s.gpu.mig_instances)]
        if not cands:
            return ans.make(Outcome.DENY, f"MIG instance {pin_uuid}, which Slurm allocated, does not exist on node "
                            f"{node}; check the node's gres.conf against its MIG layout (gpuarb render).", None)
    elif request.pinned:
        pinned = set(request.pinned)
        cands = [s for s in on_node if s.gpu.index in pinned]
        missing = sorted(pinned - {s.gpu.index for s in cands})
        if missing:
            names = ", ".join(_gpu_name(s) for s in sorted(on_node, key=lambda s: s.gpu.index))
            return ans.make(Outcome.DENY, f"GPU {', '.join(map(str, missing))}, which Slurm allocated, does not "
                            f"exist on node {node} (GPUs: {names}); check the node's gres.conf (gpuarb render).",
                            None)
    elif request.gpu is not None:
        cands = [s for s in on_node if s.gpu.index == request.gpu]
        if not cands:
            names = ", ".join(_gpu_name(s) for s in sorted(on_node, key=lambda s: s.gpu.index))
            return ans.make(Outcome.DENY, f"GPU {request.gpu} does not exist on node {node} (GPUs: {names}); "
                            "pin one of those.", None)
    snaps = {id(s): describe_state(s) for s in cands}
    inputs["gpus"] = list(snaps.values())
    if any(s.gpu.mig_enabled for s in cands):
        inputs["mig"] = _mig_inputs(cands)

    # Under Slurm the allocation is made: the lease covers every GPU (or the one instance) it holds.
    if pin_uuid is not None:
        n = 1
    elif request.pinned:
        n = len(cands)
    else:
        n = 1 if spec.gpus is None else spec.gpus
    if n < 1:
        return ans.make(Outcome.DENY, f"gpus={n} asks for no GPU; ask for gpus=1 or more.", None)
    if spec.vram is None and spec.mig is None and pin_uuid is None:
        return ans.make(Outcome.DENY, "the lease spec has neither vram= nor mig=; add vram=<size> "
                        "(e.g. vram=4GiB) or mig=<profile>.", None)
    profile = None if spec.mig in (None, "any") or pin_uuid is not None else spec.mig
    if pin_uuid is not None:
        pass  # cands is the GPU holding that instance, in MIG mode by construction
    elif spec.mig is not None:
        if n > 1:
            return ans.make(Outcome.DENY, f"a MIG lease is one instance, but the spec asks for gpus={n} with "
                            f"mig={spec.mig}; ask for gpus=1, or drop mig= to lease whole GPUs.", None)
        cands = [s for s in cands if s.gpu.mig_enabled]
        if not cands:
            where = f"GPU {request.gpu}" if request.gpu is not None else "no GPU"
            verb = "is not" if request.gpu is not None else "is"
            return ans.make(Outcome.DENY, f"mig={spec.mig} asks for a MIG instance, but {where} on node {node} "
                            f"{verb} in MIG mode; drop mig= and ask for vram= instead.", None)
    elif n > 1:
        # a MIG GPU is only usable through one instance, and a lease carries one instance
        cands = [s for s in cands if not s.gpu.mig_enabled]

    views = [_view(s, snaps[id(s)], spec, profile, pin_uuid) for s in cands]
    if profile is not None and not any(v.instances for v in views):
        here = sorted({i.profile for s in cands for i in s.gpu.mig_instances})
        return ans.make(Outcome.DENY, f"no GPU on node {node} has a MIG instance of profile '{profile}' "
                        f"(profiles here: {', '.join(here) or 'none'}); ask for one of those or mig=any.", None)
    live = [v for v in views if v.size > 0]
    if spec.vram is not None and not live:
        return ans.make(Outcome.DENY, f"vram={spec.vram} is not a positive size here; ask for at least 1MiB, "
                        "e.g. vram=4GiB.", None)
    pinned_one = request.gpu if request.gpu is not None else (request.pinned[0] if len(request.pinned) == 1 else None)
    denial = _never_fits(live, n, profile, node, len(on_node), pinned_one)
    if denial is not None:
        return ans.make(Outcome.DENY, denial, min((v.size for v in live), default=None))
    possible = [v for v in live if v.size <= v.ever]

    # 2. fit now: best fit
    fitting = sorted((v for v in possible if v.fits), key=lambda v: (v.hole, v.index))
    if len(fitting) >= n:
        chosen = fitting[:n]
        return _grant(ans, chosen, cname, len(possible) > 1)

    # 3. preempt lower-priority preemptible leases (never for a preemptible class, nor where the
    #    caller says no: under Slurm the QoS already preempted what it had to)
    if not cls.preemptible and request.preempt:
        options: list[tuple[int, int, int, _View, list[Tenant], MigInstance | None]] = []
        for v in possible:
            if v.fits:
                options.append((0, v.hole, v.index, v, [], v.fit))
                continue
            plan = _revocation_plan(v, cls)
            if plan is not None:
                options.append((plan[0], v.hole, v.index, v, plan[1], plan[2]))
        if len(options) >= n:
            options.sort(key=lambda o: o[:3])
            picked = options[:n]
            return _preempt(ans, picked, cname)

    # 4. degrade to what is free, down to min
    if spec.min is not None and cls.may_degrade and profile is None:
        d = _degrade(ans, possible, n, spec, policy, cname)
        if d is not None:
            return d

    # 5. wait
    requested = min(v.size for v in possible)
    return ans.make(Outcome.WAIT, _wait_reason(possible, n, requested, cname, cls, spec, policy, profile),
                    requested)


def _never_fits(live: list[_View], n: int, profile: str | None, node: str, node_gpus: int,
                pinned: int | None) -> str | None:
    """The DENY reason when the request could not fit even with every lease gone, else None."""
    if not live:
        return (f"the MIG GPUs of node {node} have no MIG instances to lease; ask the admin to create them "
                "(gpuarb render mig), or drop mig= on a node without MIG.")
    if n > len(live):
        kind = "whole (non-MIG) GPUs" if n > 1 else "GPUs"
        where = f"the pinned GPU {pinned}" if pinned is not None else f"{len(live)} {kind}"
        return (f"gpus={n} but only {where} of node {node} ({node_gpus} GPUs in all) can take this request; "
                f"ask for gpus={len(live)} or fewer, or use a bigger node.")
    ok = [v for v in live if v.size <= v.ever]
    if len(ok) >= n:
        return None
    best = max(live, key=lambda v: (v.ever, -v.index))
    size = best.size
    if best.mig:
        if profile is not None and best.instances:
            inst = best.instances[0]
            return (f"{human_size(size)} does not fit a {profile} MIG instance ({human_size(inst.memory_mib)}) on "
                    f"node {node}; ask for vram={spec_size(best.ever)} or less, or a bigger profile, or mig=any.")
        return (f"{human_size(size)} does not fit any MIG instance on node {node}: the largest is "
                f"{human_size(best.ever)} on {_gpu_name(best.state)}; ask for vram={spec_size(best.ever)} or less, "
                "or use a node whose GPUs are not split by MIG.")
    g = best.state.gpu
    parts = [f"{human_size(g.total_mib)} total", f"{human_size(g.reserved_mib)} driver reserve",
             f"{human_size(best.state.margin_mib)} safety margin"]
    res = [t for t in best.state.tenants if t.kind == TenantKind.RESERVATION]
    if res:
        names = ", ".join(t.id for t in res[:_MAX_NAMED]) + (" …" if len(res) > _MAX_NAMED else "")
        parts.append(f"{human_size(best.reserved_held)} reserved for {names}")
    if n > 1:
        nth = sorted((v.ever for v in live), reverse=True)[n - 1]
        return (f"{human_size(size)} on each of {n} GPUs can never fit on node {node}: only {len(ok)} of its GPUs "
                f"could ever hold that much (at most {human_size(best.ever)} on {_gpu_name(best.state)}); ask for "
                f"vram={spec_size(nth)} or less per GPU, or gpus={max(len(ok), 1)}.")
    return (f"{human_size(size)} can never fit on node {node}: the most {_gpu_name(best.state)} can ever lease is "
            f"{human_size(best.ever)} ({' − '.join(parts)}). Ask for vram={spec_size(best.ever)} or less, "
            "or use a node with more GPU memory.")


def _where(chosen: Sequence[_View]) -> str:
    return ", ".join(_gpu_name(v.state) for v in sorted(chosen, key=lambda v: v.index))


def _grant(ans: _Answer, chosen: list[_View], cname: str, had_choice: bool) -> Decision:
    size = min(v.size for v in chosen)
    if chosen[0].mig:
        v = chosen[0]
        inst = v.fit
        assert inst is not None
        reason = (f"Granted MIG instance {inst.profile} ({human_size(inst.memory_mib)}) on {_gpu_name(v.state)} "
                  f"for {human_size(size)} of class {cname}; it was the smallest free instance that holds it.")
        return ans.make(Outcome.GRANT, reason, size, inst.memory_mib, chosen, inst.uuid)
    if len(chosen) == 1:
        v = chosen[0]
        reason = (f"Granted {human_size(size)} of class {cname} on {_gpu_name(v.state)}: {human_size(v.free)} was "
                  f"free, {human_size(v.free - size)} remains")
        reason += "; best fit, to keep bigger holes for bigger requests." if had_choice else "."
    else:
        reason = (f"Granted {human_size(size)} of class {cname} on each of {len(chosen)} GPUs: {_where(chosen)} "
                  "(the fullest GPUs that fit, to keep bigger holes for bigger requests).")
    return ans.make(Outcome.GRANT, reason, size, size, chosen)


def _preempt(ans: _Answer, picked: list[tuple[int, int, int, _View, list[Tenant], MigInstance | None]],
             cname: str) -> Decision:
    chosen = [p[3] for p in picked]
    # a multi-GPU lease is a tenant of each of its GPUs: revoke it once
    revoke = list({t.id: t for p in picked for t in p[4]}.values())
    size = min(v.size for v in chosen)
    names = ", ".join(f"{_phrase(t)} {human_size(t.held_mib)}" for t in revoke)
    classes = sorted({t.prio or "?" for t in revoke})
    mig_inst = picked[0][5]
    if mig_inst is not None:
        granted = mig_inst.memory_mib
        what = f"MIG instance {mig_inst.profile} ({human_size(granted)})"
    else:
        granted = size
        what = human_size(size)
    reason = (f"Granted {what} of class {cname} on {_where(chosen)} by revoking {names}: {cname} outranks "
              f"{', '.join(classes)}, which is preemptible, and the free memory was not enough.")
    return ans.make(Outcome.GRANT, reason, size, granted, chosen, mig_inst.uuid if mig_inst else None, revoke)


def _degrade(ans: _Answer, possible: list[_View], n: int, spec: LeaseSpec, policy: Policy,
             cname: str) -> Decision | None:
    assert spec.min is not None
    q = policy.quantum_mib
    opts: list[tuple[int, int, _View, int, MigInstance | None]] = []
    for v in possible:
        floor = min(spec.min.resolve(v.state.gpu.total_mib), v.size)
        if floor <= 0 or v.free < floor:
            continue
        if v.mig:
            # the largest free instance: a degraded grant should be as close to the ask as possible
            big = max((i for i in v.instances if not v.occupants.get(i.uuid)), key=lambda i: i.memory_mib)
            opts.append((-v.free, v.index, v, big.memory_mib, big))
        else:
            g = min(v.size, v.free)
            if q > 0:
                g = g // q * q
            opts.append((-v.free, v.index, v, max(g, floor), None))
    if len(opts) < n:
        return None
    opts.sort(key=lambda o: o[:2])
    picked = opts[:n]
    chosen = [o[2] for o in picked]
    granted = min(o[3] for o in picked)
    size = min(v.size for v in chosen)
    inst = picked[0][4]
    what = f"MIG instance {inst.profile} ({human_size(granted)})" if inst else human_size(granted)
    free = human_size(-picked[-1][0])
    reason = (f"Degraded to {what} of the {human_size(size)} asked (class {cname} may degrade, min={spec.min}) on "
              f"{_where(chosen)}, which had the most free ({free}); the full size did not fit.")
    return ans.make(Outcome.DEGRADE, reason, size, granted, chosen, inst.uuid if inst else None)


def _wait_reason(views: list[_View], n: int, size: int, cname: str, cls: ClassPolicy, spec: LeaseSpec,
                 policy: Policy, profile: str | None) -> str:
    shown = sorted(views, key=lambda v: (-v.free, v.index))
    frees = []
    for v in shown[:_MAX_NAMED]:
        if v.mig:
            kind = f"{profile} " if profile else ""
            frees.append(f"{_gpu_name(v.state)} has no free {kind}MIG instance of {human_size(v.size)} or more"
                         + (f" (largest free: {human_size(v.free)})" if v.free else ""))
        else:
            frees.append(f"{_gpu_name(v.state)} has {human_size(v.free)} free")
    if len(shown) > _MAX_NAMED:
        frees.append(f"{len(shown) - _MAX_NAMED} more GPUs have less")
    many = len(views) > 1
    top = heapq.nlargest(_MAX_NAMED, ((t.held_mib, -v.index, t) for v in views for t in v.state.tenants),
                         key=lambda x: (x[0], x[1]))
    holders = ", ".join(f"{_phrase(t)} {human_size(h)}" + (f" on GPU {-neg}" if many else "") for h, neg, t in top)
    ask = human_size(size) + (f" on each of {n} GPUs" if n > 1 else "")
    first = f"{ask} of class {cname} does not fit now: {'; '.join(frees)}"
    first += f"; held by {holders}." if holders else "."

    advice = []
    kinds = {t.kind for v in views for t in v.state.tenants}
    if TenantKind.LEASE in kinds:
        advice.append("retry after a lease is released")
    elif TenantKind.FOREIGN in kinds:
        advice.append("retry after the foreign processes exit")
    else:
        advice.append("retry later")
    best = shown[min(n, len(shown)) - 1].free if shown else 0
    if cls.may_degrade and profile is None and best > 0:
        offer = best // policy.quantum_mib * policy.quantum_mib if best >= policy.quantum_mib > 0 else best
        if spec.min is None:
            advice.append(f"add min={spec_size(offer)} to accept less")
        else:
            advice.append(f"lower min= to {spec_size(offer)} to accept what is free")
    elif not cls.may_degrade and spec.min is not None:
        advice.append(f"note that class {cname} may not degrade, so min= does not apply")
    second = " or ".join(advice)
    return f"{first} {second[0].upper()}{second[1:]}."
