"""The controller's reconcile: a preempted run's lease revoked naming its preemptor, and orphans expired."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from slurm_gpuarb.controller import Controller
from slurm_gpuarb.controller.reconcile import ORPHAN_MIN_AGE_S, PREEMPTOR_AFTER_S
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.model import Decision, Lease, LeaseSpec, LeaseState, Outcome, Request, Vram

from .conftest import Clock, FakeSlurm, Probe, make_job

LLM = "gpuarb/1: vram=12288MiB prio=llm shards=24"
BATCH = "gpuarb/1: vram=8192MiB prio=batch shards=16"


@pytest.fixture(autouse=True)
def _no_service(probe: Probe) -> None:
    probe.status = None  # the holder step stays out of these tests


def lease(ledger: Ledger, job: str, *, at: float, node: str = "n2", gpus: Sequence[int] = (0,), restart: int = 0,
          prio: str = "batch", priority: int = 10, preemptible: bool = True, mib: int = 8192) -> Lease:
    """A lease as the Prolog records it for ``job`` (run ``restart``) at ``at``."""
    req = Request(spec=LeaseSpec(vram=Vram(mib=mib), prio=prio), node=node, now=at, job_id=job, restart_count=restart)

    def grant(live: Sequence[Lease]) -> Decision:
        return Decision(Outcome.GRANT, node, "fits", prio, mib, mib, tuple(gpus))

    _, got = ledger.acquire(req, grant, spec_text="s", plane="prolog", priority=priority, preemptible=preemptible)
    assert got is not None
    return got


def preempted(ledger: Ledger, slurm: FakeSlurm, clock: Clock) -> Lease:
    """Batch job 42 ran on n2 (lease at T0); at T0+100 it was preempted: its Epilog released the lease and
    Slurm lists it pending again as run 1."""
    first = lease(ledger, "42", at=clock.now)
    clock.advance(100)
    ledger.release(job_id="42", restart_count=0, node="n2", reason="epilog: job ended", plane="epilog", now=clock.now)
    slurm.add(make_job("42", comment=BATCH, restart=1, reason="BeginTime", tres="gres:shard:16"))
    return first


def test_the_preemptor_is_named(controller: Controller, slurm: FakeSlurm, clock: Clock, ledger: Ledger) -> None:
    first = preempted(ledger, slurm, clock)
    ended = clock.now
    slurm.add(make_job("43", state="RUNNING", comment=LLM, nodes=("n2",), start=ended + 3, tres="gres:shard:24"),
              make_job("44", state="RUNNING", comment=LLM, nodes=("n1",), start=ended + 1, partition="llm"),
              make_job("45", state="RUNNING", comment=BATCH, nodes=("n2",), start=ended + 2))
    clock.advance(10)
    tick = controller.tick()
    assert tick.actions == [f"revoke {first.id} of job 42"]
    got = ledger.get(first.id)
    assert got.state is LeaseState.REVOKED and got.ended_at == ended
    assert got.end_reason is not None and got.end_reason.startswith("preempted by job 43 (prio llm, started on n2 +3s")
    row = ledger.decisions(lease_id=first.id)[-1]
    assert (row.plane, row.action, row.outcome, row.job_id) == ("agent", "revoke", "revoke", "42")
    assert row.inputs["by_job"] == "43" and row.inputs["requeued_to_run"] == 1
    clock.advance(15)
    assert controller.tick().actions == []  # recorded once


def test_waits_for_the_preemptor_then_says_it_is_not_established(controller: Controller, slurm: FakeSlurm,
                                                                  clock: Clock, ledger: Ledger) -> None:
    first = preempted(ledger, slurm, clock)
    ended = clock.now
    clock.advance(30)
    controller.tick()
    assert ledger.get(first.id).state is LeaseState.RELEASED  # the llm job may not have started yet
    clock.now = ended + PREEMPTOR_AFTER_S
    controller.tick()
    got = ledger.get(first.id)
    assert got.state is LeaseState.REVOKED
    assert got.end_reason is not None
    assert got.end_reason.startswith("requeued by Slurm (preempted, or requeued by an admin; no higher-class job")


def test_a_preemptor_that_starts_late_is_still_found(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                     ledger: Ledger) -> None:
    first = preempted(ledger, slurm, clock)
    ended = clock.now
    clock.advance(20)
    controller.tick()
    slurm.add(make_job("43", state="RUNNING", comment=LLM, nodes=("n2",), start=ended + 25))
    clock.advance(15)
    controller.tick()
    assert (ledger.get(first.id).end_reason or "").startswith("preempted by job 43")


def test_the_preemptor_on_the_same_gpu_wins(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                            ledger: Ledger) -> None:
    first = lease(ledger, "42", at=clock.now, node="n1", gpus=(3,))
    clock.advance(100)
    ended = clock.now
    ledger.release(job_id="42", restart_count=0, node="n1", reason="epilog", plane="epilog", now=ended)
    slurm.add(make_job("42", comment=BATCH, restart=1, reason="BeginTime", partition="batch"))
    for job, gpu, start in (("50", 0, ended + 1), ("51", 3, ended + 4)):
        slurm.add(make_job(job, state="RUNNING", comment=LLM, nodes=("n1",), start=start, partition="llm"))
        lease(ledger, job, at=start, node="n1", gpus=(gpu,), prio="llm", priority=1000, preemptible=False)
    clock.advance(10)
    controller.tick()
    assert (ledger.get(first.id).end_reason or "").startswith("preempted by job 51")


def test_a_qos_names_the_class_of_a_job_without_a_spec(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                       ledger: Ledger) -> None:
    first = preempted(ledger, slurm, clock)
    slurm.add(make_job("43", state="RUNNING", nodes=("n2",), start=clock.now + 2, qos="llm", tres="gres:shard:24"))
    clock.advance(10)
    controller.tick()
    assert (ledger.get(first.id).end_reason or "").startswith("preempted by job 43 (prio llm")


def test_only_earlier_runs_of_preemptible_leases(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                 ledger: Ledger) -> None:
    fixed = lease(ledger, "60", at=clock.now, prio="llm", priority=1000, preemptible=False)
    ledger.release(job_id="60", reason="epilog", plane="epilog", now=clock.now + 1)
    slurm.add(make_job("60", comment=LLM, restart=1, reason="BeginTime"))
    current = lease(ledger, "61", at=clock.now, restart=1)
    slurm.add(make_job("61", state="RUNNING", comment=BATCH, restart=1, nodes=("n2",), start=clock.now))
    clock.advance(3600)
    controller.tick()
    assert ledger.get(fixed.id).state is LeaseState.RELEASED
    assert ledger.get(current.id).state is LeaseState.GRANTED


def test_a_run_whose_epilog_never_ran_is_revoked_once_the_reconcile_ends_it(
        controller: Controller, slurm: FakeSlurm, clock: Clock, ledger: Ledger) -> None:
    first = lease(ledger, "42", at=clock.now)
    slurm.add(make_job("42", comment=BATCH, restart=1, reason="BeginTime"))
    clock.advance(ORPHAN_MIN_AGE_S + 1)
    controller.tick()  # the orphan step expires it: it is not this run's
    assert ledger.get(first.id).state is LeaseState.EXPIRED
    clock.advance(PREEMPTOR_AFTER_S)
    controller.tick()
    got = ledger.get(first.id)
    assert got.state is LeaseState.REVOKED
    assert [(r.action, r.outcome) for r in ledger.decisions(lease_id=first.id)][-2:] == [
        ("expire", "expired"), ("revoke", "revoke")]


# --------------------------------------------------------------------------- orphans


def test_orphans_are_expired_cluster_wide(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                          ledger: Ledger) -> None:
    gone = lease(ledger, "70", at=clock.now, node="n1")  # Slurm forgot it
    done = lease(ledger, "71", at=clock.now, node="n3")
    slurm.add(make_job("71", state="COMPLETED", nodes=("n3",), start=clock.now))
    runs = lease(ledger, "72", at=clock.now, node="n2")
    slurm.add(make_job("72", state="RUNNING", nodes=("n2",), start=clock.now))
    host = ledger.acquire(Request(spec=LeaseSpec(vram=Vram(mib=512)), node="ws", now=clock.now, pid=99),
                          lambda live: Decision(Outcome.GRANT, "ws", "fits", "batch", 512, 512, (0,)),
                          spec_text="s")[1]
    assert host is not None
    clock.advance(ORPHAN_MIN_AGE_S + 1)
    tick = controller.tick()
    assert sorted(tick.actions) == sorted([f"expire {gone.id} of job 70", f"expire {done.id} of job 71"])
    assert ledger.get(gone.id).end_reason == "reconcile: job 70 is no longer running: Slurm no longer knows it"
    assert ledger.get(done.id).end_reason == "reconcile: job 71 is no longer running: Slurm reports it COMPLETED"
    assert ledger.get(runs.id).state is LeaseState.GRANTED
    assert ledger.get(host.id).state is LeaseState.GRANTED  # no job id: left to its TTL


def test_a_lease_newer_than_the_listing_is_left_alone(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                      ledger: Ledger) -> None:
    # The Prolog recorded it just now; the job may have started after squeue answered.
    fresh = lease(ledger, "80", at=clock.now)
    slurm.add(make_job("80", comment=BATCH, reason="Resources"))
    clock.advance(ORPHAN_MIN_AGE_S - 1)
    controller.tick()
    assert ledger.get(fresh.id).state is LeaseState.GRANTED


def test_ttl_expiry_is_part_of_it(controller: Controller, clock: Clock, ledger: Ledger) -> None:
    req = Request(spec=LeaseSpec(vram=Vram(mib=512), ttl_s=60), node="ws", now=clock.now, pid=99)
    _, got = ledger.acquire(req, lambda live: Decision(Outcome.GRANT, "ws", "fits", "batch", 512, 512, (0,)),
                            spec_text="s")
    assert got is not None
    clock.advance(61)
    assert controller.tick().actions == [f"expire {got.id} (ttl)"]
    assert ledger.get(got.id).state is LeaseState.EXPIRED


def test_a_job_running_before_the_victim_began_is_not_its_preemptor(controller: Controller, slurm: FakeSlurm,
                                                                     clock: Clock, ledger: Ledger) -> None:
    began = clock.now
    first = lease(ledger, "42", at=began)
    clock.advance(3)  # a short run: an llm job that started just before it is within seconds of its end
    ended = clock.now
    ledger.release(job_id="42", restart_count=0, node="n2", reason="epilog: job ended", plane="epilog", now=ended)
    slurm.add(make_job("42", comment=BATCH, restart=1, reason="BeginTime", tres="gres:shard:16"),
              make_job("41", state="COMPLETED", comment=LLM, nodes=("n2",), start=began - 1),
              make_job("43", state="RUNNING", comment=LLM, nodes=("n2",), start=ended + 6))
    clock.advance(10)
    controller.tick()
    assert (ledger.get(first.id).end_reason or "").startswith("preempted by job 43"), ledger.get(first.id)
