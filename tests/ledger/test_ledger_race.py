"""Concurrent writers never double-grant: processes racing to acquire on one node, each opening a
brand-new ledger at the same moment (which also races the create-on-open migration)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from multiprocessing.synchronize import Barrier

from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.model import Decision, Lease, LeaseSpec, LeaseState, Outcome, Request, Vram

WORKERS = 6
CAPACITY_MIB = 8192
ASK_MIB = 4096


def _decide(live: Sequence[Lease]) -> Decision:
    used = sum(le.vram_mib for le in live)
    if used + ASK_MIB <= CAPACITY_MIB:
        return Decision(Outcome.GRANT, "n1", "fits", "batch", ASK_MIB, ASK_MIB, (0,))
    return Decision(Outcome.WAIT, "n1", f"{used}MiB of {CAPACITY_MIB}MiB held", "batch", ASK_MIB)


def _worker(url: str, job: int, barrier: Barrier) -> str:
    """Open the ledger (all workers at once), then acquire 4 GiB on n1 (all at once)."""
    barrier.wait(timeout=60)
    with Ledger.open(url) as ledger:
        barrier.wait(timeout=60)
        request = Request(spec=LeaseSpec(vram=Vram(mib=ASK_MIB)), node="n1", now=1000.0, job_id=str(job))
        decision, _ = ledger.acquire(request, _decide, spec_text="gpuarb/1: vram=4096MiB")
        return decision.outcome.value


def test_racing_processes_grant_exactly_what_fits(ledger_url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(WORKERS)
        with ctx.Pool(WORKERS) as pool:
            outcomes = pool.starmap(_worker, [(ledger_url, job, barrier) for job in range(WORKERS)])
    assert sorted(outcomes) == ["grant", "grant"] + ["wait"] * (WORKERS - 2)
    with Ledger.open(ledger_url) as ledger:
        live = ledger.leases(state=LeaseState.GRANTED)
        assert sum(le.vram_mib for le in live) == CAPACITY_MIB
        assert sorted(r.outcome for r in ledger.decisions()) == sorted(outcomes)
