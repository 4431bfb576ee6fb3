"""Reconcile (leases of jobs that no longer run are expired, with a row) and per-lease usage sampling."""

from __future__ import annotations

import threading
from pathlib import Path

from slurm_gpuarb import protocol
from slurm_gpuarb.daemon.handlers import Handlers
from slurm_gpuarb.daemon.reconcile import Upkeep, reconcile, sample_peaks, stale_reason
from slurm_gpuarb.model import GpuProcess, LeaseState
from slurm_gpuarb.telemetry import fake

from .conftest import FakeSlurm, answer, job, start_msg


def _lease(h: Handlers, job_id: str, node: str = "n1", gres: str = "0", restart_count: int = 0) -> str:
    g = protocol.grant_from_json(answer(h, start_msg(job_id, node, gres, restart_count=restart_count))["grant"])
    assert g.lease_id is not None
    return g.lease_id


def test_reconcile_expires_the_leases_of_jobs_that_no_longer_run(handlers: Handlers, slurm: FakeSlurm) -> None:
    running = _lease(handlers, "1", gres="0")
    finished = _lease(handlers, "2", gres="1")
    forgotten = _lease(handlers, "3", gres="2")
    requeued = _lease(handlers, "4", gres="3")
    moved = _lease(handlers, "5", gres="4")
    ending = _lease(handlers, "6", gres="5")
    slurm.add(job("1"), job("2", state="COMPLETED"), job("4", restart_count=1), job("5", node="n2"),
              job("6", state="COMPLETING"))
    expired = reconcile(handlers.ledger, slurm, ["n1", "n2", "n3"])
    assert expired is not None
    assert sorted(le.id for le in expired) == sorted([finished, forgotten, requeued, moved])
    assert {le.id for le in handlers.ledger.live("n1")} == {running, ending}
    rows = {r.lease_id: r for r in handlers.ledger.decisions() if r.action == "expire"}
    assert rows[finished].reason == "reconcile: job 2 is no longer running: Slurm reports it COMPLETED"
    assert rows[forgotten].reason == "reconcile: job 3 is no longer running: Slurm no longer knows it"
    assert "requeued and runs as run 1" in rows[requeued].reason
    assert "no longer running on n1: it holds n2" in rows[moved].reason
    assert rows[finished].plane == "agent" and rows[finished].inputs["slurm_state"] == "COMPLETED"
    assert slurm.calls == [("1", "2", "3", "4", "5", "6")]  # one question for all of them
    # a second round has nothing left to do and writes nothing
    before = len(handlers.ledger.decisions())
    assert reconcile(handlers.ledger, slurm, ["n1"]) == []
    assert len(handlers.ledger.decisions()) == before


def test_reconcile_skips_the_round_when_slurm_cannot_be_asked(handlers: Handlers, slurm: FakeSlurm,
                                                              log_file: Path) -> None:
    lease = _lease(handlers, "1")
    slurm.down = True
    assert reconcile(handlers.ledger, slurm, ["n1"]) is None
    assert handlers.ledger.get(lease).state is LeaseState.GRANTED
    assert "reconcile skipped: Slurm could not be asked" in log_file.read_text()


def test_reconcile_leaves_host_plane_leases_to_their_ttl(handlers: Handlers, slurm: FakeSlurm) -> None:
    live = answer(handlers, protocol.LeaseRequestMsg(spec="vram=1GiB", node="n1", ttl_s=3600))["lease"]["id"]
    old = answer(handlers, protocol.LeaseRequestMsg(spec="vram=1GiB", node="n1", ttl_s=1))["lease"]
    assert reconcile(handlers.ledger, slurm, ["n1"], now=old["created_at"] + 2) == []
    assert slurm.calls == []  # no job leases: Slurm is not asked
    assert handlers.ledger.get(live).state is LeaseState.GRANTED
    assert handlers.ledger.get(old["id"]).state is LeaseState.EXPIRED  # its TTL ran out: ended this round


def test_stale_reason_keeps_a_job_that_still_runs_here() -> None:
    from slurm_gpuarb.model import Lease

    lease = Lease(id="L", node="n1", gpus=(0,), vram_mib=1, prio="batch", priority=1, preemptible=True,
                  state=LeaseState.GRANTED, created_at=0.0, job_id="7")
    assert stale_reason(lease, job("7", state="CONFIGURING")) is None
    assert stale_reason(lease, job("7", state="SUSPENDED")) is None  # a suspended job keeps its memory
    assert stale_reason(lease, job("7", state="PENDING")) is not None


def test_sampling_records_each_leases_peak_and_forgets_ended_ones(handlers: Handlers, fake_state: Path) -> None:
    lease = _lease(handlers, "12", gres="0")
    arbs = [handlers.arbitration("n1")]
    seen: dict[str, int] = {}
    assert sample_peaks(arbs, handlers.ledger, seen) == {}
    fake.add_process(fake_state, "n1", GpuProcess(pid=900, gpu_index=0, used_mib=3000, name="python3", job_id="12"))
    assert sample_peaks(arbs, handlers.ledger, seen) == {lease: 3000}
    fake.add_process(fake_state, "n1", GpuProcess(pid=900, gpu_index=0, used_mib=2000, name="python3", job_id="12"))
    assert sample_peaks(arbs, handlers.ledger, seen) == {}  # lower: nothing written
    assert handlers.ledger.peaks([lease]) == {lease: 3000}
    fake.remove_process(fake_state, "n1", 900)
    sample_peaks(arbs, handlers.ledger, seen)
    assert seen == {}
    released = answer(handlers, protocol.JobEndMsg(job_id="12", restart_count=0, node="n1"))["released"]
    assert released == [lease]
    row = next(r for r in handlers.ledger.decisions(job_id="12") if r.action == "release")
    assert "peak 3000MiB of 80023MiB granted" in row.reason


def test_upkeep_runs_reconcile_at_once_and_survives_a_failing_round() -> None:
    reconciled = threading.Event()
    sampled = threading.Event()
    calls = {"sample": 0}

    def sample() -> None:
        calls["sample"] += 1
        if calls["sample"] == 1:
            raise RuntimeError("telemetry hiccup")
        sampled.set()

    upkeep = Upkeep(reconcile=reconciled.set, sample=sample, reconcile_every=3600, sample_every=0.01)
    upkeep.start()
    try:
        assert reconciled.wait(5) and sampled.wait(5)
    finally:
        upkeep.stop()
    assert not upkeep.is_alive()
    assert upkeep.rounds["reconcile"] == 1 and upkeep.rounds["sample"] >= 2


def test_upkeep_with_nothing_to_do_ends_at_once() -> None:
    upkeep = Upkeep(reconcile=None, sample=None, reconcile_every=30, sample_every=5)
    upkeep.start()
    upkeep.stop()
    assert not upkeep.is_alive()
