"""The lease protocol's request handlers, shared by ``gpuarbd`` and the hooks' in-process fallback.

``Handlers(cfg).handle(msg, peer)`` answers one parsed request with a protocol response dict and
never raises for anything a caller caused: errors become :func:`protocol.error` answers. The
daemon keeps one :class:`Handlers` for its life (the ledger engine and telemetry stay open);
a hook whose daemon is down or hung builds one in-process and sends the same message::

    Handlers(load()).handle(msg, Peer(0, 0, os.getpid()))

**Who may do what** (the peer comes from ``SO_PEERCRED``). Privileged peers are root and the
daemon's own uid: the config does not know Slurm's ``SlurmUser``, and slurmd runs its hooks as
root anyway. They may do anything. Other users may ``ping``, ``status`` and ``explain``, and
``renew`` or ``release`` leases they own (``owner_uid``); ``job_start``, ``job_end`` and
``health`` are for the hooks only. A user may ``request`` a lease only on a host-plane node:
on a node some ``[[partitions]]`` entry lists (a Slurm node), leases are created by the Prolog.
An unprivileged peer may only name nodes this daemon serves or the inventory declares.

**job_start** (the Prolog) verifies and records the allocation (:mod:`.jobs` sizes it). A job
without GPUs answers at once with no lease and no ledger row: CPU jobs stay cheap. A malformed
spec in the comment never fails the handler or drains the node: the job is *refused* with the
parser's message, which the TaskProlog prints into the job's output (a user who wrote a lease
spec wants it honoured, not silently replaced by a default), and a ``deny`` decision row records
it. A lease the arbiter cannot grant (live telemetry shows the memory taken) is also a refusal,
never an error; but first the daemon asks Slurm whether the leases in the way still have running
jobs, and expires those that do not (an Epilog that never ran), then asks the arbiter again. A
replayed job_start for the same (job, restart, node) returns the lease the first one recorded.
Leases of this job's *earlier* runs still live on this node are expired first: a requeued job
must not be refused by its own previous run.

**Holder jobs.** A job whose raw comment starts with ``gpuarb-holder=<name>`` claims to be the
controller's holder job for the holder-mode reservation ``<name>`` (:mod:`slurm_gpuarb.holder`). The
claim is honoured only when the job runs as a privileged uid (root, or the daemon's own: the
controller submits holders as root), ``<name>`` is a ``mode = "holder"`` reservation of this node,
and the job got that reservation's GPU: its lease then records ``holds=<name>``, so the capacity
model counts the reservation's processes inside it, not twice, and the holder's own request is
checked with the reservation's processes inside its size. Anyone may write the prefix in a comment:
any other job with it gets an ordinary lease and a warning in the log, never a refusal or a drain.

**job_end** (the Epilog) releases by (job, restart count, node), idempotently, recording the
observed peak the daemon sampled and the exit code in the release row.
"""

from __future__ import annotations

import os
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .. import __version__, protocol
from .. import spec as specmod
from ..config import Config, node_config, reservations_for
from ..errors import GpuArbError, LeaseSpecError, NotFoundError, ProtocolError
from ..holder import holder_of
from ..ledger import Ledger
from ..logsink import log
from ..model import Decision, Lease, LeaseSpec, LeaseState, TenantKind
from ..protocol import Grant, PermissionDeniedError
from ..service import Arbitration, apply_ttl_policy
from . import jobs
from .reconcile import reconcile

if TYPE_CHECKING:
    from ..slurm.base import SlurmAdapter

__all__ = ["Handlers", "Peer", "is_slurm_node"]

_BAD_SPEC_CHARS = 200  # how much of a refused comment the decision row keeps
_HOLDER_NAME_CHARS = 64  # a reservation name from a comment is the user's text: logged at most this long


@dataclass(frozen=True)
class Peer:
    """Who is asking: the credentials the kernel reports for the connecting process (SO_PEERCRED)."""

    uid: int
    gid: int
    pid: int


def is_slurm_node(cfg: Config, node: str) -> bool:
    """Whether Slurm schedules onto ``node`` (a ``[[partitions]]`` entry lists it)."""
    return any(node in p.nodes for p in cfg.partitions)


class Handlers:
    """One handler per protocol op, over one ledger and one :class:`Arbitration` per node (made lazily).

    ``nodes``: the node names this daemon serves (default: ``cfg.node``); ``status`` without a node
    covers all of them. ``slurm``: the adapter the daemon asks for a shard job's GRES when its comment
    does not carry it (``None`` in the hooks' fallback: the Prolog may not call Slurm). ``ledger``:
    an open ledger to use (default: opened on first use, never migrated). ``log_as`` names the
    writer in log lines. Thread-safe: the daemon calls :meth:`handle` from many threads.
    """

    def __init__(self, cfg: Config, *, slurm: SlurmAdapter | None = None, nodes: Iterable[str] | None = None,
                 ledger: Ledger | None = None, log_as: str = "arbiter") -> None:
        self.cfg = cfg
        self.slurm = slurm
        self.nodes: tuple[str, ...] = tuple(dict.fromkeys(nodes or (cfg.node,)))
        self.log_as = log_as
        self._ledger = ledger
        self._own_ledger = ledger is None
        self._lock = threading.Lock()
        self._arbs: dict[str, Arbitration] = {}
        self._slots: dict[str, tuple[jobs.GresSlot, ...] | None] = {}
        self._privileged = {0, os.geteuid()}
        self._ops: dict[str, Callable[[Any, Peer], dict[str, Any]]] = {
            "ping": self._ping, "status": self._status, "explain": self._explain, "request": self._request,
            "renew": self._renew, "release": self._release, "job_start": self._job_start,
            "job_end": self._job_end, "health": self._health,
        }

    # ------------------------------------------------------------------ plumbing

    @property
    def ledger(self) -> Ledger:
        """The ledger, opened on first use (a fresh database is created; an old schema is refused)."""
        if self._ledger is None:
            with self._lock:
                if self._ledger is None:
                    pw = self.cfg.pg_password_file
                    self._ledger = Ledger.open(self.cfg.ledger_url, create=True,
                                               password_file=None if pw is None else str(pw))
        return self._ledger

    def arbitration(self, node: str) -> Arbitration:
        """The service of ``node``, sharing this handler's ledger; its telemetry opens on first use."""
        arb = self._arbs.get(node)
        if arb is None:
            ledger = self.ledger
            with self._lock:
                arb = self._arbs.get(node)
                if arb is None:
                    arb = Arbitration(self.cfg, ledger=ledger, node=node)
                    _ = arb.telemetry  # opened here, under the lock: two threads must not both open NVML
                    self._arbs[node] = arb
        return arb

    def warm(self, node: str) -> None:
        """Open ``node``'s telemetry and map its GRES now, so its first job does not pay for it (the daemon
        does this at start). Raises what opening raises."""
        self.arbitration(node)
        self._gres_slots(node)

    def close(self) -> None:
        """Close every telemetry backend and (when this handler opened it) the ledger."""
        with self._lock:
            arbs, self._arbs = list(self._arbs.values()), {}
        for arb in arbs:
            arb.close()
        if self._own_ledger and self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    def __enter__(self) -> Handlers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def handle(self, msg: protocol.Message, peer: Peer) -> dict[str, Any]:
        """Answer one request. Never raises for a caller's mistake: errors become error answers."""
        try:
            self._authorize(msg, peer)
            return self._ops[msg.op](msg, peer)
        except (GpuArbError, PermissionError) as e:
            return protocol.error(e)
        except Exception as e:  # a bug: the caller gets a generic answer, the log the details
            log(self.log_as, "internal error", level="error", op=msg.op, error=type(e).__name__,
                detail=traceback.format_exc(limit=6))
            return protocol.error(e)

    def _authorize(self, msg: protocol.Message, peer: Peer) -> None:
        if peer.uid in self._privileged:
            return
        op = msg.op
        if op in ("job_start", "job_end", "health"):
            raise PermissionDeniedError(f"uid {peer.uid} may not send '{op}': only the Slurm hooks (root) may")
        node = getattr(msg, "node", None)
        if node is not None and node not in self.nodes and node_config(self.cfg, node) is None:
            raise NotFoundError(f"node {node!r} is not served here (this gpuarbd serves {', '.join(self.nodes)})")
        if op == "request" and is_slurm_node(self.cfg, node or self.cfg.node):
            raise PermissionDeniedError(
                f"uid {peer.uid} may not create leases on Slurm node {node or self.cfg.node}: submit a job with "
                "--comment 'gpuarb: vram=…' instead (its Prolog records the lease)")
        # renew and release check ownership once the lease is known

    def _own(self, lease: Lease, peer: Peer, verb: str) -> None:
        if peer.uid not in self._privileged and lease.owner_uid != peer.uid:
            raise PermissionDeniedError(f"uid {peer.uid} may not {verb} lease {lease.id}: it belongs to "
                                        f"{'uid ' + str(lease.owner_uid) if lease.owner_uid is not None else 'root'}")

    # ------------------------------------------------------------------ host-plane ops

    def _ping(self, msg: protocol.PingMsg, peer: Peer) -> dict[str, Any]:
        return protocol.ok("ping", version=__version__)

    def _status(self, msg: protocol.StatusMsg, peer: Peer) -> dict[str, Any]:
        nodes = (msg.node,) if msg.node is not None else self.nodes
        gpus = [protocol.gpu_state_to_json(s) for n in nodes for s in self.arbitration(n).snapshot().states]
        return protocol.ok("status", gpus=gpus)

    def _explain(self, msg: protocol.ExplainMsg, peer: Peer) -> dict[str, Any]:
        target = msg.job_id if msg.job_id is not None else msg.lease_id
        assert target is not None  # ExplainMsg guarantees exactly one
        records = Arbitration(self.cfg, ledger=self.ledger).explain_records(target)  # no telemetry needed
        from ..explain import explain_history

        return protocol.ok("explain", text=explain_history(records),
                           records=[protocol.record_to_json(r) for r in records])

    def _request(self, msg: protocol.LeaseRequestMsg, peer: Peer) -> dict[str, Any]:
        spec = _parse_host_spec(msg.spec)
        specmod.check_classes(spec, self.cfg.policy.classes)
        if msg.ttl_s is not None:
            spec = replace(spec, ttl_s=msg.ttl_s)
        spec = apply_ttl_policy(spec, self.cfg.policy.default_ttl_s, self.cfg.policy.max_ttl_s)
        node = msg.node or self.cfg.node
        decision, lease = self.arbitration(node).request_spec(
            spec, gpu=msg.gpu, job_id=msg.job_id, restart_count=msg.restart_count, pid=msg.pid,
            owner_uid=peer.uid, plane=msg.plane or "host")
        log(self.log_as, _outcome_text(decision.outcome.value, lease), op="request", node=node,
            lease=lease.id if lease else None, uid=peer.uid, outcome=decision.outcome.value)
        return protocol.ok("request", **protocol.decision_to_json(decision, lease))

    def _renew(self, msg: protocol.RenewMsg, peer: Peer) -> dict[str, Any]:
        lease = self.ledger.get(msg.lease_id)
        self._own(lease, peer, "renew")
        ttl = msg.ttl_s
        if ttl is None:
            ttl = _spec_ttl(lease.spec)
        policy = self.cfg.policy
        ttl = apply_ttl_policy(LeaseSpec(ttl_s=ttl), policy.default_ttl_s, policy.max_ttl_s).ttl_s
        if ttl is None:
            raise ProtocolError(f"lease {lease.id} has no TTL to start again: give ttl_s (seconds)")
        renewed = self.ledger.renew(lease.id, ttl, plane="host")
        return protocol.ok("renew", lease=protocol.lease_to_json(renewed))

    def _release(self, msg: protocol.ReleaseMsg, peer: Peer) -> dict[str, Any]:
        reason = msg.reason or "released"
        current: Lease | None
        if msg.lease_id is not None:
            lease = self.ledger.get(msg.lease_id)
            self._own(lease, peer, "release")
            done = self.ledger.release(lease.id, reason=reason, plane="host")
            current = done[0] if done else lease
        else:
            assert msg.job_id is not None and msg.node is not None
            live = self._job_leases(msg.job_id, msg.node, msg.restart_count)
            for le in live:
                self._own(le, peer, "release")
            done = self.ledger.release(job_id=msg.job_id, restart_count=msg.restart_count, node=msg.node,
                                       reason=reason, plane="host") if live else []
            current = done[0] if done else None
        return protocol.ok("release", lease=None if current is None else protocol.lease_to_json(current),
                           released=bool(done))

    # ------------------------------------------------------------------ run-plane ops

    def _job_start(self, msg: protocol.JobStartMsg, peer: Peer) -> dict[str, Any]:
        started = time.monotonic()
        base = Grant(job_id=msg.job_id, restart_count=msg.restart_count, node=msg.node)
        indices = jobs.parse_gres(msg.gres)
        if not indices:
            return protocol.ok("job_start", **protocol.job_start_to_json(base, None, None))
        fields: dict[str, object] = {"op": "job_start", "job": msg.job_id, "restart": msg.restart_count or None,
                                     "node": msg.node}
        try:
            user = specmod.parse(msg.comment)
            if user is not None:
                specmod.check_classes(user, self.cfg.policy.classes)
        except LeaseSpecError as e:
            return self._refuse_spec(msg, base, e, fields)

        arb = self.arbitration(msg.node)
        gpus = arb.telemetry.gpus()
        chosen = jobs.pick(self._gres_slots(msg.node), indices, msg.node, gpus)
        slurm_asked, slurm_shards = False, None
        if self.slurm is not None and jobs.needs_slurm(user, chosen):
            slurm_asked, slurm_shards = self._slurm_shards(msg.job_id, fields)
        sizing = jobs.size_job(self.cfg, msg.node, user, chosen, gpus, partition=msg.partition,
                               slurm_asked=slurm_asked, slurm_shards=slurm_shards)
        holds = self._holds(msg, sizing.pinned, fields)
        self._end_earlier_runs(msg)

        def ask() -> tuple[Decision, Lease | None]:
            return arb.request_spec(
                sizing.spec, pinned=sizing.pinned, pinned_mig_uuid=sizing.pinned_mig_uuid, preempt=False,
                job_id=msg.job_id, restart_count=msg.restart_count, owner_uid=msg.uid, plane="prolog", gpus=gpus,
                context=sizing.context(), holds=holds)

        decision, lease = ask()
        if lease is None and self._cleared_stale_leases(msg.node, decision):
            decision, lease = ask()  # a finished job's lease was in the way; the ledger now says so
        grant = jobs.make_grant(base, sizing, decision, lease)
        log(self.log_as, _outcome_text(decision.outcome.value, lease), **fields, lease=grant.lease_id,
            gpus=",".join(map(str, sizing.pinned)), mode=sizing.mode, holds=holds, outcome=decision.outcome.value,
            reason=decision.reason if lease is None else None, notes="; ".join(sizing.notes) or None,
            ms=round((time.monotonic() - started) * 1000, 1))
        return protocol.ok("job_start", **protocol.job_start_to_json(grant, decision, lease))

    def _refuse_spec(self, msg: protocol.JobStartMsg, base: Grant, err: LeaseSpecError,
                     fields: dict[str, object]) -> dict[str, Any]:
        reason = f"invalid lease spec in the job's --comment: {err}"
        comment = msg.comment or ""
        self.ledger.record(plane="prolog", action="request", outcome="deny", node=msg.node, reason=reason,
                           job_id=msg.job_id, restart_count=msg.restart_count,
                           inputs={"comment": specmod.quote(comment, _BAD_SPEC_CHARS), "gres": msg.gres})
        log(self.log_as, "refused: bad spec", **fields, outcome="deny", reason=str(err))
        grant = replace(base, refused=f"gpuarb: {reason}")
        return protocol.ok("job_start", **protocol.job_start_to_json(grant, None, None))

    def _holds(self, msg: protocol.JobStartMsg, pinned: tuple[int, ...], fields: dict[str, object]) -> str | None:
        """The holder-mode reservation this job's lease holds, or None (see the module docstring)."""
        name = holder_of(msg.comment)
        if name is None:
            return None
        if msg.uid not in self._privileged:
            log(self.log_as, "holder comment from an unprivileged job: an ordinary lease", level="warning", **fields,
                uid=msg.uid, reservation=name[:_HOLDER_NAME_CHARS])
            return None
        for r in reservations_for(self.cfg, msg.node):
            if r.name == name and r.mode == "holder" and r.gpu in pinned:
                return name
        log(self.log_as, "holder job for no holder-mode reservation on its GPUs here: an ordinary lease",
            level="warning", **fields, reservation=name[:_HOLDER_NAME_CHARS], gpus=",".join(map(str, pinned)))
        return None

    def _gres_slots(self, node: str) -> tuple[jobs.GresSlot, ...] | None:
        if node not in self._slots:
            slots = jobs.gres_slots(self.cfg, node)
            with self._lock:
                self._slots[node] = slots
        return self._slots[node]

    def _slurm_shards(self, job_id: str, fields: dict[str, object]) -> tuple[bool, int | None]:
        assert self.slurm is not None
        try:
            found = self.slurm.jobs([job_id])
        except Exception as e:  # slurmctld down or slow: size from what the job itself says
            log(self.log_as, "could not ask Slurm for the job's shards", level="warning", **fields,
                error=str(e) if isinstance(e, GpuArbError) else type(e).__name__)
            return False, None
        if not found:
            return False, None
        return True, found[0].gres_shards

    def _cleared_stale_leases(self, node: str, decision: Decision) -> bool:
        """After a refusal, ask Slurm whether the leases in the way belong to jobs that still run; expire
        those that do not (an Epilog that never ran). Whether any was expired. Only the daemon does
        this: the Prolog's fallback may not call Slurm, and waits for the daemon's reconcile."""
        if self.slurm is None:
            return False
        blockers = {t.get("id") for g in decision.inputs.get("gpus", ()) for t in g.get("tenants", ())
                    if t.get("kind") == TenantKind.LEASE.value}
        if not blockers:
            return False
        expired = reconcile(self.ledger, self.slurm, [node], log_as=self.log_as, only=blockers)
        return bool(expired)

    def _job_leases(self, job_id: str, node: str, restart_count: int | None) -> list[Lease]:
        live = self.ledger.leases(state=LeaseState.GRANTED, node=node, job_id=job_id)
        return [le for le in live if restart_count is None or le.restart_count == restart_count]

    def _end_earlier_runs(self, msg: protocol.JobStartMsg) -> None:
        for le in self._job_leases(msg.job_id, msg.node, None):
            if le.restart_count < msg.restart_count:
                self.ledger.expire_lease(
                    le.id, plane="prolog",
                    reason=f"job {msg.job_id} was requeued: run {msg.restart_count} started on {msg.node}, so the "
                           f"lease of run {le.restart_count} ended (its Epilog did not release it)")

    def _job_end(self, msg: protocol.JobEndMsg, peer: Peer) -> dict[str, Any]:
        # Slurm 22.05 raises a requeued job's restart count *before* the first run's Epilog runs, so
        # that Epilog arrives as run N+1: release this job's leases of runs up to N on this node. A
        # late replay of run 0's Epilog (N=0) still cannot touch run 1's lease.
        live = [le for le in self._job_leases(msg.job_id, msg.node, None) if le.restart_count <= msg.restart_count]
        if not live:
            return protocol.ok("job_end", released=[])
        peaks = self.ledger.peaks(le.id for le in live)
        parts = [f"epilog: job {msg.job_id} run {msg.restart_count} ended on {msg.node}"]
        if msg.exit_code is not None:
            parts.append(f"exit code {msg.exit_code}")
        for le in live:
            peak = peaks.get(le.id)
            seen = f"peak {peak}MiB" if peak is not None else "no usage sampled"
            parts.append(f"lease {le.id}: {seen} of {le.vram_mib}MiB granted")
        if any(le.restart_count < msg.restart_count for le in live):
            parts.append(f"Slurm counts this Epilog as run {msg.restart_count} because the job was requeued")
        inputs = {"exit_code": msg.exit_code, "peak_mib": peaks, "granted_mib": {le.id: le.vram_mib for le in live}}
        released = [le for lease in live
                    for le in self.ledger.release(lease.id, reason="; ".join(parts), plane="epilog", inputs=inputs)]
        log(self.log_as, "released", op="job_end", job=msg.job_id, restart=msg.restart_count or None,
            node=msg.node, lease=",".join(le.id for le in released) or None, exit=msg.exit_code,
            peak=",".join(f"{k}={v}" for k, v in sorted(peaks.items())) or None)
        return protocol.ok("job_end", released=[le.id for le in released])

    def _health(self, msg: protocol.HealthMsg, peer: Peer) -> dict[str, Any]:
        if self.cfg.nodes and node_config(self.cfg, msg.node) is None:
            # A node the inventory does not list (a CPU node): no GPU of it is ours to judge, and
            # asking its telemetry would only fail on every HealthCheckInterval.
            return protocol.ok("health", node=msg.node, foreign=[])
        foreign = [{"pid": t.pids[0], "gpu": s.gpu.index, "mib": t.observed_mib, "name": t.label}
                   for s in self.arbitration(msg.node).snapshot().states
                   # memory no process accounts for has no PID to name: it never drains a node
                   for t in s.tenants if t.kind is TenantKind.FOREIGN and t.pids]
        return protocol.ok("health", node=msg.node, foreign=foreign)


# --------------------------------------------------------------------------- helpers


def _parse_host_spec(text: str) -> LeaseSpec:
    """A host-plane spec, with or without the ``gpuarb:`` marker (``vram=6GiB prio=llm``)."""
    spec = specmod.parse(text)
    if spec is None:
        spec = specmod.parse_body(text, canonical=False)
    return spec


def _spec_ttl(text: str) -> int | None:
    try:
        spec = specmod.parse(text)
    except LeaseSpecError:
        return None  # written by an older gpuarb: fall back to the policy's default
    return None if spec is None else spec.ttl_s


def _outcome_text(outcome: str, lease: Lease | None) -> str:
    return f"{outcome} {lease.vram_mib}MiB" if lease is not None else outcome
