"""Ledger additions for the controller agent: a released run's lease recorded as preempted, and the
decision log filtered by plane and action (on every backend: ``ledger`` is parametrised)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from slurm_gpuarb.errors import NotFoundError
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.model import Decision, Lease, LeaseState, Outcome, Request

MakeRequest = Callable[..., Request]


def granted(live: Sequence[Lease]) -> Decision:
    return Decision(Outcome.GRANT, "n2", "fits", "batch", 4096, 4096, (0,))


def lease_of(ledger: Ledger, request: Request) -> Lease:
    _, lease = ledger.acquire(request, granted, spec_text="gpuarb/1: vram=4096MiB prio=batch shards=8")
    assert lease is not None
    return lease


def test_a_released_run_is_recorded_as_revoked_with_the_reason(ledger: Ledger, make_request: MakeRequest) -> None:
    lease = lease_of(ledger, make_request("n2", job_id="42", now=100.0))
    ledger.release(job_id="42", restart_count=0, node="n2", reason="epilog", plane="epilog", now=130.0)
    why = "preempted by job 43 (llm) on n2: Slurm requeued job 42 (now run 1)"
    done = ledger.revoke_ended(lease.id, reason=why, now=140.0, inputs={"by_job": "43"})
    assert done is not None
    assert (done.state, done.end_reason, done.ended_at) == (LeaseState.REVOKED, why, 130.0)  # ended when released
    assert ledger.get(lease.id).state is LeaseState.REVOKED
    row = ledger.decisions(lease_id=lease.id)[-1]
    assert (row.plane, row.action, row.outcome, row.reason, row.job_id, row.ts) == (
        "agent", "revoke", "revoke", why, "42", 140.0)
    assert row.inputs == {"by_job": "43"}


def test_an_expired_run_can_be_recorded_as_revoked(ledger: Ledger, make_request: MakeRequest) -> None:
    lease = lease_of(ledger, make_request("n2", job_id="42"))
    ledger.expire_lease(lease.id, reason="reconcile: requeued", plane="agent")
    assert ledger.revoke_ended(lease.id, reason="preempted") is not None
    assert ledger.get(lease.id).state is LeaseState.REVOKED


def test_revoke_ended_leaves_live_and_revoked_leases_alone(ledger: Ledger, make_request: MakeRequest) -> None:
    live = lease_of(ledger, make_request("n2", job_id="42"))
    rows = len(ledger.decisions())
    assert ledger.revoke_ended(live.id, reason="x") is None  # live: that is revoke()'s job
    assert ledger.get(live.id).state is LeaseState.GRANTED
    ledger.revoke(live.id, reason="admin", plane="cli")
    assert ledger.revoke_ended(live.id, reason="again") is None
    assert ledger.get(live.id).end_reason == "admin"
    assert len(ledger.decisions()) == rows + 1  # only revoke()'s row


def test_revoke_ended_of_an_unknown_lease(ledger: Ledger) -> None:
    with pytest.raises(NotFoundError, match="no lease 'Lnope'"):
        ledger.revoke_ended("Lnope", reason="x")


def test_decisions_filter_by_plane_and_action(ledger: Ledger) -> None:
    ledger.record(plane="agent", action="hold", outcome="submitted", node="n2", reason="a", now=1.0)
    ledger.record(plane="agent", action="shrink", outcome="degrade", node=None, reason="b", job_id="7", now=2.0)
    ledger.record(plane="prolog", action="request", outcome="grant", node="n2", reason="c", now=3.0)
    ledger.record(plane="agent", action="hold", outcome="cancelled", node="n2", reason="d", now=4.0)
    assert [r.reason for r in ledger.decisions(plane="agent")] == ["a", "b", "d"]
    assert [r.reason for r in ledger.decisions(plane="agent", action="hold")] == ["a", "d"]
    assert [r.reason for r in ledger.decisions(plane="agent", action="hold", limit=1)] == ["d"]
    assert [r.reason for r in ledger.decisions(node="n2", action="request")] == ["c"]
