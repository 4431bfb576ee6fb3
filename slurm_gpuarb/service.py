"""The host-plane service: configuration + telemetry + ledger + the pure arbiter, wired together.

This is what ``gpuarb lease request`` and the node daemon call. The order of work in
:meth:`Arbitration.request` matters for correctness and speed:

1. parse and check the spec (cheap, no I/O);
2. read telemetry *before* taking the ledger lock (NVML can take milliseconds);
3. inside the ledger's write lock, build the GPU states from telemetry, the standing
   reservations and the live leases, and run the pure arbiter. Concurrent requesters on
   one node are serialised by that lock, so two of them never both see the same free MiB.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import arbiter, capacity
from . import spec as specmod
from .config import Config, reservations_for, telemetry_for
from .errors import LeaseSpecError, NotFoundError
from .explain import explain_history
from .ledger import Ledger
from .model import Decision, DecisionRecord, GpuInfo, GpuState, Lease, LeaseSpec, Request
from .telemetry import Telemetry, select
from .units import format_duration


@dataclass(frozen=True)
class Snapshot:
    """What one node's GPUs look like now: the states the arbiter would see."""

    node: str
    states: tuple[GpuState, ...]


class Arbitration:
    """One node's lease service. Owns its ledger and telemetry unless they are passed in."""

    def __init__(self, cfg: Config, *, ledger: Ledger | None = None, telemetry: Telemetry | None = None,
                 node: str | None = None) -> None:
        self.cfg = cfg
        self.node = node or cfg.node
        self._own_ledger = ledger is None
        self._own_telemetry = telemetry is None
        self._ledger = ledger
        self._telemetry = telemetry

    # Opened lazily: `lease check` and `capacity` need neither, and opening costs time.
    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            self._ledger = Ledger.open(self.cfg.ledger_url, password_file=_path_or_none(self.cfg.pg_password_file))
        return self._ledger

    @property
    def telemetry(self) -> Telemetry:
        if self._telemetry is None:
            self._telemetry = open_telemetry(self.cfg, self.node)
        return self._telemetry

    def close(self) -> None:
        if self._own_ledger and self._ledger is not None:
            self._ledger.close()
        if self._own_telemetry and self._telemetry is not None:
            self._telemetry.close()

    def __enter__(self) -> Arbitration:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _proc_reader(self) -> capacity.ProcReader | None:
        # Fake processes carry their own name/user/job; their PIDs must never be looked up in this
        # host's /proc, where they may belong to a real, unrelated process.
        return capacity.no_proc_reader if self.telemetry.name.startswith("fake") else None

    # ------------------------------------------------------------------ leases

    def request(self, spec_text: str, *, gpu: int | None = None, job_id: str | None = None,
                restart_count: int = 0, pid: int | None = None, owner_uid: int | None = None,
                plane: str = "host", now: float | None = None) -> tuple[Decision, Lease | None]:
        """Ask for a lease. Returns the decision and, when granted or degraded, the new lease."""
        spec = specmod.parse(spec_text)
        if spec is None:
            raise LeaseSpecError(
                f"no lease spec in {_quote(spec_text)}: a spec starts with the marker 'gpuarb:', e.g. "
                "'gpuarb: vram=6GiB prio=batch'")
        specmod.check_classes(spec, self.cfg.policy.classes)
        spec = apply_ttl_policy(spec, self.cfg.policy.default_ttl_s, self.cfg.policy.max_ttl_s)
        return self.request_spec(spec, gpu=gpu, job_id=job_id, restart_count=restart_count, pid=pid,
                                 owner_uid=owner_uid, plane=plane, now=now)

    def request_spec(self, spec: LeaseSpec, *, gpu: int | None = None, pinned: tuple[int, ...] = (),
                     pinned_mig_uuid: str | None = None, preempt: bool = True, job_id: str | None = None,
                     restart_count: int = 0, pid: int | None = None, owner_uid: int | None = None,
                     plane: str = "host", now: float | None = None, gpus: Sequence[GpuInfo] | None = None,
                     context: Mapping[str, Any] | None = None,
                     holds: str | None = None) -> tuple[Decision, Lease | None]:
        """Ask for a lease from a spec already parsed, checked and given its TTL (the daemon sizes a
        Slurm job's spec from its allocation; :meth:`request` parses a user's text first).

        ``pinned`` / ``pinned_mig_uuid`` / ``preempt`` go to the arbiter as :class:`Request` fields (the
        Prolog pins the GPUs Slurm gave and never preempts). ``gpus`` is a telemetry reading the caller
        has just made, reused rather than read twice; processes are always read here. ``context``
        (JSON-serialisable: how the Prolog sized the lease from Slurm's allocation) is stored with the
        decision's inputs under ``"slurm"``, for ``gpuarb explain``. ``holds``: the holder-mode reservation
        the new lease will hold (a holder job's Prolog; the daemon checked the claim): the lease records it,
        and the request is decided with that reservation's processes inside its own size, not on top.
        """
        specmod.check_classes(spec, self.cfg.policy.classes)
        if gpus is None:
            gpus = self.telemetry.gpus()
        procs = self.telemetry.processes()
        reservations = reservations_for(self.cfg, self.node)
        req = Request(spec=spec, node=self.node, now=time.time() if now is None else now, gpu=gpu,
                      job_id=job_id, restart_count=restart_count, owner_uid=owner_uid, pid=pid,
                      pinned=pinned, pinned_mig_uuid=pinned_mig_uuid, preempt=preempt, holds=holds)
        policy = self.cfg.policy

        reader = self._proc_reader()

        def decide(live: Sequence[Lease]) -> Decision:
            states = capacity.build_gpu_states(self.node, gpus, procs, reservations, live, policy.margin_mib,
                                               proc_reader=reader, holding=holds)
            decision = arbiter.decide(req, states, policy)
            if context or holds:
                extra: dict[str, Any] = {"slurm": dict(context)} if context else {}
                if holds:
                    extra["holds"] = holds
                decision = replace(decision, inputs={**decision.inputs, **extra})
            return decision

        return self.ledger.acquire(req, decide, spec_text=specmod.format_spec(spec), plane=plane)

    def release(self, lease_id: str | None = None, *, job_id: str | None = None,
                restart_count: int | None = None, reason: str = "released", plane: str = "host",
                node: str | None = None) -> list[Lease]:
        """Release a lease by id, or a job's leases on this node. Idempotent."""
        if lease_id is not None:
            return self.ledger.release(lease_id, reason=reason, plane=plane)
        return self.ledger.release(job_id=job_id, restart_count=restart_count, node=node or self.node,
                                   reason=reason, plane=plane)

    def snapshot(self) -> Snapshot:
        """The GPU states of this node as the arbiter would see them now (expired leases excluded)."""
        now = time.time()
        live = [le for le in self.ledger.live(self.node) if le.expires_at is None or le.expires_at > now]
        states = capacity.build_gpu_states(
            self.node, self.telemetry.gpus(), self.telemetry.processes(),
            reservations_for(self.cfg, self.node), live, self.cfg.policy.margin_mib,
            proc_reader=self._proc_reader())
        return Snapshot(node=self.node, states=tuple(states))

    def explain_records(self, target: str) -> list[DecisionRecord]:
        """The decisions about a Slurm job (``12``), a lease (``L…``) or one decision (``D17``), oldest first."""
        if target.isascii() and target.isdigit():
            records = self.ledger.decisions(job_id=target)
        elif target[:1] == "D" and target[1:].isascii() and target[1:].isdigit():
            records = [r for r in [self.ledger.decision(int(target[1:]))] if r is not None]
        else:
            records = self.ledger.decisions(lease_id=target)
        if not records:
            raise NotFoundError(f"the ledger has no decision for {_quote(target)}: give a Slurm job id, a lease id "
                                "(L…) or a decision id (D…); `gpuarb lease list --all` lists leases")
        return records

    def explain(self, target: str) -> str:
        """The story of :meth:`explain_records`, one paragraph per decision."""
        return explain_history(self.explain_records(target))


def apply_ttl_policy(spec: LeaseSpec, default_ttl_s: int | None, max_ttl_s: int | None) -> LeaseSpec:
    """A spec without ``ttl=`` gets the policy's default; one above ``max_ttl`` is refused, saying the limit."""
    ttl = spec.ttl_s if spec.ttl_s is not None else default_ttl_s
    if ttl is not None and max_ttl_s is not None and ttl > max_ttl_s:
        if spec.ttl_s is None:  # a default above the maximum is clamped, not the user's fault
            ttl = max_ttl_s
        else:
            raise LeaseSpecError(f"ttl={format_duration(spec.ttl_s)} is longer than this site allows "
                                 f"(max_ttl {format_duration(max_ttl_s)}); ask for a shorter ttl= or renew the lease")
    return spec if ttl == spec.ttl_s else replace(spec, ttl_s=ttl)


def open_telemetry(cfg: Config, node: str) -> Telemetry:
    """The node's telemetry backend; a fake one reads its overlay from ``cfg.fake_state`` when set
    (hooks get no environment, so ``$GPUARB_FAKE_STATE`` cannot reach them)."""
    choice = telemetry_for(cfg, node)
    if choice.startswith("fake:") and cfg.fake_state is not None:
        from .telemetry.fake import FakeTelemetry

        return FakeTelemetry(choice.split(":", 1)[1], node=node, state_dir=cfg.fake_state)
    return select(choice, node=node)


def _path_or_none(path: object) -> str | None:
    return None if path is None else str(path)


def _quote(text: str, limit: int = 40) -> str:
    """Quote user text safely for one line of output: escaped, and cut at ``limit`` characters."""
    shown = text if len(text) <= limit else text[:limit] + "…"
    return repr(shown)
