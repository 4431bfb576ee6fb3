"""The lease state machine and the decision log, on every backend (``ledger`` is parametrised)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pytest

from slurm_gpuarb.errors import NotFoundError
from slurm_gpuarb.ledger import MAX_INPUTS_CHARS, Ledger
from slurm_gpuarb.ledger.statements import LEASE_KEYS, lease_from_tuple, lease_params
from slurm_gpuarb.model import (
    Decision,
    GpuInfo,
    Lease,
    LeaseSpec,
    LeaseState,
    Matcher,
    Outcome,
    Request,
    Reservation,
    Vram,
)

Decide = Callable[[Sequence[Lease]], Decision]
MakeRequest = Callable[..., Request]
FitWithin = Callable[..., Decide]
GIB = 1024


def grant(mib: int, *, prio: str = "batch", revoke: tuple[str, ...] = (), inputs: Mapping[str, Any] | None = None,
          **more_inputs: Any) -> Decide:
    inputs = {**(inputs or {}), **more_inputs}

    def decide(live: Sequence[Lease]) -> Decision:
        return Decision(Outcome.GRANT, "n1", f"{mib}MiB fits", prio, mib, mib, (0,), revoke=revoke, inputs=inputs)

    return decide


def take(ledger: Ledger, request: Request, decide: Decide | None = None) -> Lease:
    """Acquire and insist on a lease."""
    _, lease = ledger.acquire(request, decide or grant(GIB), spec_text="s")
    assert lease is not None
    return lease


def actions(ledger: Ledger, **filters: Any) -> list[tuple[str, str]]:
    return [(r.action, r.outcome) for r in ledger.decisions(**filters)]


# --------------------------------------------------------------------------- acquire


def test_grant_records_lease_and_decision(ledger: Ledger, make_request: MakeRequest, fit_within: FitWithin) -> None:
    decision, lease = ledger.acquire(make_request(job_id="12", ttl_s=600), fit_within(8 * GIB, 4 * GIB),
                                     spec_text="gpuarb/1: vram=4096MiB prio=batch ttl=10m")
    assert decision.outcome is Outcome.GRANT
    assert lease is not None
    assert lease.id.startswith("L") and len(lease.id) == 13
    assert (lease.node, lease.gpus, lease.vram_mib, lease.prio, lease.job_id) == ("n1", (0,), 4096, "batch", "12")
    assert lease.state is LeaseState.GRANTED
    assert lease.expires_at == 1600.0
    assert ledger.get(lease.id) == lease
    [row] = ledger.decisions(lease_id=lease.id)
    assert (row.plane, row.action, row.outcome, row.job_id) == ("host", "request", "grant", "12")
    assert (row.requested_mib, row.granted_mib, row.ts) == (4096, 4096, 1000.0)
    assert row.inputs == {"spec": "gpuarb/1: vram=4096MiB prio=batch ttl=10m", "used_mib": 0, "capacity_mib": 8192}


def test_wait_records_decision_without_lease(ledger: Ledger, make_request: MakeRequest, fit_within: FitWithin) -> None:
    decision, lease = ledger.acquire(make_request(mib=16 * GIB, job_id="7"), fit_within(8 * GIB, 16 * GIB),
                                     spec_text="gpuarb/1: vram=16384MiB", plane="prolog")
    assert decision.outcome is Outcome.WAIT and lease is None
    assert ledger.live() == []
    [row] = ledger.decisions(job_id="7")
    assert (row.plane, row.outcome, row.lease_id, row.granted_mib) == ("prolog", "wait", None, None)
    assert "does not fit" in row.reason


def test_decide_sees_only_this_nodes_live_leases(ledger: Ledger, make_request: MakeRequest,
                                                 fit_within: FitWithin) -> None:
    seen: list[Sequence[Lease]] = []
    _, a = ledger.acquire(make_request("n1"), fit_within(8 * GIB, 4 * GIB), spec_text="s")
    ledger.acquire(make_request("n2"), fit_within(8 * GIB, 4 * GIB), spec_text="s")
    ledger.acquire(make_request("n1"), fit_within(8 * GIB, 4 * GIB, calls=seen), spec_text="s")
    assert a is not None
    assert [le.id for le in seen[0]] == [a.id]


def test_capacity_is_enforced_across_calls(ledger: Ledger, make_request: MakeRequest, fit_within: FitWithin) -> None:
    outcomes = [ledger.acquire(make_request(), fit_within(8 * GIB, 3 * GIB), spec_text="s")[0].outcome
                for _ in range(4)]
    assert outcomes == [Outcome.GRANT, Outcome.GRANT, Outcome.WAIT, Outcome.WAIT]
    assert len(ledger.live("n1")) == 2


def test_retried_acquire_returns_the_same_lease(ledger: Ledger, make_request: MakeRequest,
                                                fit_within: FitWithin) -> None:
    calls: list[Sequence[Lease]] = []
    decide = fit_within(16 * GIB, 4 * GIB, calls=calls)
    _, first = ledger.acquire(make_request(job_id="12"), decide, spec_text="s", plane="prolog")
    decision, again = ledger.acquire(make_request(job_id="12", now=1001.0), decide, spec_text="s", plane="prolog")
    assert first is not None and again == first
    assert decision.outcome is Outcome.GRANT and decision.granted_mib == 4096
    assert len(calls) == 1  # the retry did not ask the arbiter again
    assert len(ledger.live()) == 1
    rows = ledger.decisions(job_id="12")
    assert [r.lease_id for r in rows] == [first.id, first.id]
    assert "already holds lease" in rows[1].reason


def test_new_run_of_a_requeued_job_gets_its_own_lease(ledger: Ledger, make_request: MakeRequest,
                                                      fit_within: FitWithin) -> None:
    _, run0 = ledger.acquire(make_request(job_id="12", restart_count=0), fit_within(16 * GIB, 4 * GIB),
                             spec_text="s")
    _, run1 = ledger.acquire(make_request(job_id="12", restart_count=1), fit_within(16 * GIB, 4 * GIB),
                             spec_text="s")
    assert run0 is not None and run1 is not None and run0.id != run1.id
    assert run1.restart_count == 1


def test_lease_fields_from_inputs_and_arguments(ledger: Ledger) -> None:
    req = Request(spec=LeaseSpec(vram=Vram(mib=6144), min=Vram(mib=4096), ttl_s=60), node="n1", now=10.0,
                  job_id="5", owner_uid=1000, pid=4242)
    _, lease = ledger.acquire(req, grant(6144, prio="llm", priority=100, preemptible=False, ttl_s=120),
                              spec_text="s")
    assert lease is not None
    assert (lease.priority, lease.preemptible, lease.min_mib, lease.expires_at) == (100, False, 4096, 130.0)
    assert (lease.owner_uid, lease.pid) == (1000, 4242)
    _, lease2 = ledger.acquire(Request(spec=LeaseSpec(), node="n1", now=10.0), grant(512),
                               spec_text="s", priority=7, preemptible=True)
    assert lease2 is not None
    assert (lease2.priority, lease2.preemptible, lease2.expires_at, lease2.min_mib) == (7, True, None, None)
    arbiter_style = grant(512, inputs={"class": {"name": "batch", "priority": 10, "preemptible": True}})
    _, lease3 = ledger.acquire(Request(spec=LeaseSpec(), node="n1", now=10.0), arbiter_style, spec_text="s")
    assert lease3 is not None
    assert (lease3.priority, lease3.preemptible) == (10, True)


def test_preempting_grant_revokes_named_leases(ledger: Ledger, make_request: MakeRequest) -> None:
    _, batch = ledger.acquire(make_request(job_id="1"), grant(8 * GIB), spec_text="s")
    _, other = ledger.acquire(make_request("n2", job_id="2"), grant(8 * GIB), spec_text="s")
    assert batch is not None and other is not None
    _, llm = ledger.acquire(make_request(job_id="3", now=1005.0),
                            grant(8 * GIB, prio="llm", revoke=(batch.id, other.id)), spec_text="s")
    assert llm is not None
    assert ledger.get(batch.id).state is LeaseState.REVOKED
    assert ledger.get(batch.id).ended_at == 1005.0
    assert ledger.get(other.id).state is LeaseState.GRANTED  # another node's lease is not this arbiter's to take
    [row] = [r for r in ledger.decisions(lease_id=batch.id) if r.action == "revoke"]
    assert row.outcome == "revoke" and llm.id in row.reason and "prio llm" in row.reason
    assert row.inputs == {"by_lease": llm.id, "by_job": "3", "by_prio": "llm"}
    assert actions(ledger, job_id="3") == [("request", "grant")]


def test_an_exception_in_decide_rolls_back(ledger: Ledger, make_request: MakeRequest) -> None:
    def broken(live: Sequence[Lease]) -> Decision:
        raise ZeroDivisionError("arbiter bug")

    ledger.acquire(make_request(ttl_s=5), grant(GIB), spec_text="s")
    with pytest.raises(ZeroDivisionError):
        ledger.acquire(make_request(now=2000.0), broken, spec_text="s")
    assert ledger.decisions() != [] and [r.action for r in ledger.decisions()] == ["request"]
    assert len(ledger.live()) == 1  # the expiry done before decide() was rolled back too


def test_huge_inputs_are_replaced_by_a_stub(ledger: Ledger, make_request: MakeRequest) -> None:
    _, lease = ledger.acquire(make_request(), grant(GIB, blob="x" * (MAX_INPUTS_CHARS + 1)), spec_text="s")
    assert lease is not None
    [row] = ledger.decisions(lease_id=lease.id)
    assert row.inputs["keys"] == ["blob", "spec"] and row.inputs["truncated_chars"] > MAX_INPUTS_CHARS


# --------------------------------------------------------------------------- release, revoke, expire


def test_release_is_idempotent(ledger: Ledger, make_request: MakeRequest) -> None:
    _, lease = ledger.acquire(make_request(job_id="12"), grant(GIB), spec_text="s")
    assert lease is not None
    [released] = ledger.release(lease.id, reason="epilog", plane="epilog", now=2000.0)
    assert (released.state, released.ended_at, released.end_reason) == (LeaseState.RELEASED, 2000.0, "epilog")
    assert ledger.release(lease.id, now=2001.0) == []
    assert ledger.release(job_id="12", restart_count=0, node="n1") == []
    assert actions(ledger, lease_id=lease.id) == [("request", "grant"), ("release", "released")]
    assert ledger.get(lease.id).ended_at == 2000.0


def test_epilog_twice_by_job_leaves_one_release_row(ledger: Ledger, make_request: MakeRequest) -> None:
    ledger.acquire(make_request(job_id="12"), grant(GIB), spec_text="s")
    for _ in range(2):
        ledger.release(job_id="12", restart_count=0, node="n1", plane="epilog")
    assert [a for a, _ in actions(ledger, job_id="12")].count("release") == 1


def test_late_epilog_of_run_0_leaves_run_1_alone(ledger: Ledger, make_request: MakeRequest) -> None:
    _, run0 = ledger.acquire(make_request(job_id="12", restart_count=0), grant(GIB), spec_text="s")
    _, run1 = ledger.acquire(make_request(job_id="12", restart_count=1), grant(GIB), spec_text="s")
    assert run0 is not None and run1 is not None
    released = ledger.release(job_id="12", restart_count=0, node="n1")
    assert [le.id for le in released] == [run0.id]
    assert ledger.get(run1.id).state is LeaseState.GRANTED


def test_release_by_job_respects_node(ledger: Ledger, make_request: MakeRequest) -> None:
    take(ledger, make_request("n1", job_id="12"))
    on_n2 = take(ledger, make_request("n2", job_id="12"))
    assert len(ledger.release(job_id="12", node="n1")) == 1
    assert [le.id for le in ledger.live()] == [on_n2.id]
    assert len(ledger.release(job_id="12")) == 1  # no node, no restart count: every live lease of the job


def test_release_unknown_lease_and_bad_arguments(ledger: Ledger) -> None:
    with pytest.raises(NotFoundError, match="no lease 'Lnope'"):
        ledger.release("Lnope")
    with pytest.raises(ValueError, match="lease id or a job id"):
        ledger.release()
    assert ledger.release(job_id="404") == []


def test_revoke(ledger: Ledger, make_request: MakeRequest) -> None:
    _, lease = ledger.acquire(make_request(), grant(GIB), spec_text="s")
    assert lease is not None
    revoked = ledger.revoke(lease.id, reason="admin: node maintenance", plane="cli", now=1500.0)
    assert revoked is not None and revoked.state is LeaseState.REVOKED
    assert ledger.revoke(lease.id, reason="again", plane="cli") is None
    assert ledger.release(lease.id) == []  # a revoked lease stays revoked
    rows = ledger.decisions(lease_id=lease.id)
    assert [(r.action, r.outcome, r.plane, r.reason) for r in rows[1:]] == [
        ("revoke", "revoke", "cli", "admin: node maintenance")]
    with pytest.raises(NotFoundError):
        ledger.revoke("Lnope", reason="x", plane="cli")


def test_ttl_expiry_on_acquire(ledger: Ledger, make_request: MakeRequest, fit_within: FitWithin) -> None:
    _, old = ledger.acquire(make_request(job_id="1", ttl_s=10), fit_within(8 * GIB, 8 * GIB), spec_text="s")
    assert old is not None
    decision, _ = ledger.acquire(make_request(job_id="2", now=1009.0), fit_within(8 * GIB, 8 * GIB), spec_text="s")
    assert decision.outcome is Outcome.WAIT  # not yet expired
    decision, new = ledger.acquire(make_request(job_id="3", now=1010.0), fit_within(8 * GIB, 8 * GIB),
                                   spec_text="s")
    assert decision.outcome is Outcome.GRANT and new is not None  # expires_at <= now: gone
    expired = ledger.get(old.id)
    assert (expired.state, expired.ended_at, expired.end_reason) == (LeaseState.EXPIRED, 1010.0, "ttl")
    [row] = [r for r in ledger.decisions(lease_id=old.id) if r.action == "expire"]
    assert row.outcome == "expired" and "TTL ran out" in row.reason


def test_expire_gc(ledger: Ledger, make_request: MakeRequest) -> None:
    short = [take(ledger, make_request(node, ttl_s=10)) for node in ("n1", "n2")]
    forever = take(ledger, make_request("n1"))
    longer = take(ledger, make_request("n2", ttl_s=100))
    assert ledger.expire(1005.0) == []
    assert [le.id for le in ledger.expire(1010.0, node="n2")] == [short[1].id]
    assert [le.id for le in ledger.expire(1050.0)] == [short[0].id]
    assert ledger.expire(1050.0) == []
    assert {le.id for le in ledger.live()} == {forever.id, longer.id}
    assert sum(1 for r in ledger.decisions() if r.action == "expire") == 2


# --------------------------------------------------------------------------- reading


def test_leases_filters_and_limit(ledger: Ledger, make_request: MakeRequest) -> None:
    made = [take(ledger, make_request(node, job_id=str(i), now=1000.0 + i))
            for i, node in enumerate(["n1", "n2", "n1", "n3"])]
    ledger.release(made[0].id)
    assert [le.id for le in ledger.leases()] == [le.id for le in made]
    assert [le.id for le in ledger.leases(limit=2)] == [made[2].id, made[3].id]
    assert [le.id for le in ledger.leases(state=LeaseState.RELEASED)] == [made[0].id]
    assert [le.id for le in ledger.leases(node="n1")] == [made[0].id, made[2].id]
    assert [le.id for le in ledger.live("n1")] == [made[2].id]
    assert [le.id for le in ledger.leases(job_id="3")] == [made[3].id]
    with pytest.raises(NotFoundError):
        ledger.get("Lnope")


def test_record_and_read_decisions(ledger: Ledger) -> None:
    first = ledger.record(plane="submit", action="validate", outcome="deny", node=None, job_id="9",
                          reason="unknown class 'gold'", inputs={"spec": "gpuarb: prio=gold"}, now=5.0)
    second = ledger.record(plane="health", action="check", outcome="noop", node="n1", reason="ok", now=6.0)
    assert second > first
    rec = ledger.decision(first)
    assert rec is not None
    assert (rec.plane, rec.outcome, rec.node, rec.job_id, rec.ts) == ("submit", "deny", None, "9", 5.0)
    assert rec.inputs == {"spec": "gpuarb: prio=gold"}
    assert ledger.decision(second + 1000) is None
    assert [r.id for r in ledger.decisions()] == [first, second]
    assert [r.id for r in ledger.decisions(limit=1)] == [second]
    assert [r.id for r in ledger.decisions(node="n1")] == [second]
    assert ledger.decision(second) is not None and ledger.decisions(job_id="9")[0].inputs["spec"].startswith("gpuarb")


def test_reservations_snapshot(ledger: Ledger) -> None:
    ollama = Reservation(name="ollama", size_mib=12 * GIB, gpu=0, match=Matcher(process="ollama", user="ollama"))
    vllm = Reservation(name="vllm", size_mib=20 * GIB, gpu=1, node="n2", mode="holder")
    ledger.sync_reservations([ollama, vllm], "n1")
    ledger.sync_reservations([ollama, vllm], "n2")
    assert [(r.node, r.name) for r in ledger.reservations()] == [("n1", "ollama"), ("n2", "ollama"), ("n2", "vllm")]
    [stored] = ledger.reservations("n1")
    assert stored.match == Matcher(process="ollama", user="ollama") and stored.size_mib == 12 * GIB
    ledger.sync_reservations([], "n2")  # replaced, not merged
    assert [r.node for r in ledger.reservations()] == ["n1"]


def test_inventory_snapshot(ledger: Ledger) -> None:
    gpus = [GpuInfo(index=i, uuid=f"GPU-{i}", name="NVIDIA H100 80GB HBM3", total_mib=81559, reserved_mib=530,
                    used_mib=1000, minor=3 - i) for i in range(2)]
    ledger.snapshot_inventory("n1", gpus)
    ledger.snapshot_inventory("n1", gpus[:1])
    stored = ledger.inventory()
    assert list(stored) == ["n1"]
    [gpu] = stored["n1"]
    assert (gpu.index, gpu.uuid, gpu.total_mib, gpu.reserved_mib, gpu.minor, gpu.used_mib) == (
        0, "GPU-0", 81559, 530, 3, 0)


def test_row_conversion_matches_the_dataclass() -> None:
    lease = Lease(id="Labc", node="n1", gpus=(0, 3), vram_mib=512, prio="batch", priority=10, preemptible=True,
                  state=LeaseState.GRANTED, created_at=1.0, spec="s", job_id="1", expires_at=2.0)
    params = lease_params(lease)
    fast = lease_from_tuple([params[k] for k in LEASE_KEYS])
    assert fast == lease and hash(fast) == hash(lease) and repr(fast) == repr(lease)
    with pytest.raises(AttributeError):
        fast.vram_mib = 1  # type: ignore[misc]


def test_a_holder_jobs_lease_keeps_the_reservation_it_holds(ledger: Ledger, make_request: MakeRequest) -> None:
    request = make_request(job_id="42", prio="llm")
    held = take(ledger, replace(request, holds="ollama"), grant(12 * GIB, prio="llm"))
    plain = take(ledger, make_request(job_id="43"))
    assert (held.holds, plain.holds) == ("ollama", None)
    assert ledger.get(held.id).holds == "ollama"
    assert {le.id: le.holds for le in ledger.live("n1")} == {held.id: "ollama", plain.id: None}
    seen: list[Sequence[Lease]] = []

    def look(live: Sequence[Lease]) -> Decision:  # what the capacity model is handed under the lock
        seen.append(live)
        return grant(GIB)(live)

    take(ledger, make_request(job_id="44"), look)
    assert {le.id: le.holds for le in seen[0]} == {held.id: "ollama", plain.id: None}
    [released] = ledger.release(job_id="42", restart_count=0, node="n1")
    assert (released.holds, released.state) == ("ollama", LeaseState.RELEASED)


def test_row_conversion_carries_holds() -> None:
    lease = Lease(id="Lh", node="n2", gpus=(0,), vram_mib=12288, prio="llm", priority=1000, preemptible=False,
                  state=LeaseState.GRANTED, created_at=1.0, job_id="42", holds="ollama")
    params = lease_params(lease)
    assert params["holds"] == "ollama" and LEASE_KEYS[-1] == "holds"
    assert lease_from_tuple([params[k] for k in LEASE_KEYS]) == lease
