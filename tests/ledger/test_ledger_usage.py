"""What gpuarbd adds to the ledger: renew, expiry with a reason (reconcile), observed peaks (revision 0003)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import sqlalchemy as sa

from slurm_gpuarb.errors import NotFoundError, SchemaVersionError
from slurm_gpuarb.ledger import HEAD_REVISION, Ledger, migrate
from slurm_gpuarb.model import Decision, Lease, LeaseState, Request

Decide = Callable[[Sequence[Lease]], Decision]


def _grant(ledger: Ledger, make_request: Callable[..., Request], fit_within: Callable[..., Decide],
           **kw: object) -> Lease:
    _, lease = ledger.acquire(make_request(**kw), fit_within(80_000, 4096), spec_text="gpuarb/1: vram=4096MiB")
    assert lease is not None
    return lease


def test_renew_moves_the_expiry_and_writes_a_row(ledger: Ledger, make_request: Callable[..., Request],
                                                 fit_within: Callable[..., Decide]) -> None:
    lease = _grant(ledger, make_request, fit_within, ttl_s=60, now=1000.0)
    assert lease.expires_at == 1060.0
    renewed = ledger.renew(lease.id, 600, now=1050.0)
    assert (renewed.id, renewed.expires_at, renewed.state) == (lease.id, 1650.0, LeaseState.GRANTED)
    assert ledger.get(lease.id).expires_at == 1650.0
    row = ledger.decisions(lease_id=lease.id)[-1]
    assert (row.action, row.outcome, row.ts, row.inputs) == ("renew", "renewed", 1050.0,
                                                            {"ttl_s": 600, "expires_at": 1650.0})


def test_renew_refuses_ended_expired_and_unknown_leases(ledger: Ledger, make_request: Callable[..., Request],
                                                        fit_within: Callable[..., Decide]) -> None:
    lease = _grant(ledger, make_request, fit_within, ttl_s=60, now=1000.0)
    with pytest.raises(NotFoundError, match="TTL ran out at 1060"):
        ledger.renew(lease.id, 60, now=1061.0)
    ledger.release(lease.id)
    with pytest.raises(NotFoundError, match=r"no longer live \(released\)"):
        ledger.renew(lease.id, 60)
    with pytest.raises(NotFoundError, match="no lease 'Lnope'"):
        ledger.renew("Lnope", 60)
    assert [r.action for r in ledger.decisions(lease_id=lease.id)] == ["request", "release"]


def test_expire_lease_keeps_its_reason_and_is_idempotent(ledger: Ledger, make_request: Callable[..., Request],
                                                         fit_within: Callable[..., Decide]) -> None:
    lease = _grant(ledger, make_request, fit_within, job_id="7")
    ended = ledger.expire_lease(lease.id, reason="reconcile: job 7 is no longer running", inputs={"slurm_state": "X"})
    assert ended is not None and ended.state is LeaseState.EXPIRED
    assert ended.end_reason == "reconcile: job 7 is no longer running"
    assert ledger.expire_lease(lease.id, reason="again") is None
    rows = [r for r in ledger.decisions(lease_id=lease.id) if r.action == "expire"]
    assert len(rows) == 1 and rows[0].reason == ended.end_reason and rows[0].inputs == {"slurm_state": "X"}


def test_peaks_keep_the_highest_observation(ledger: Ledger) -> None:
    assert ledger.peaks([]) == {} and ledger.peaks(["La"]) == {}
    ledger.record_peaks({})
    ledger.record_peaks({"La": 3000, "Lb": 10}, now=1.0)
    ledger.record_peaks({"La": 2000, "Lb": 20}, now=2.0)
    assert ledger.peaks(["La", "Lb", "Lc"]) == {"La": 3000, "Lb": 20}


def test_release_rows_carry_the_callers_inputs(ledger: Ledger, make_request: Callable[..., Request],
                                               fit_within: Callable[..., Decide]) -> None:
    lease = _grant(ledger, make_request, fit_within, job_id="8")
    ledger.release(job_id="8", restart_count=0, node="n1", reason="epilog", inputs={"peak_mib": {lease.id: 5}})
    row = ledger.decisions(lease_id=lease.id)[-1]
    assert (row.action, row.inputs) == ("release", {"peak_mib": {lease.id: 5}})


def test_upgrade_from_0002_adds_the_peaks_table_and_keeps_leases(ledger_url: str) -> None:
    with Ledger.open(ledger_url, create=False, check=False) as ledger:
        assert ledger.upgrade("0002") == (None, "0002")
    with pytest.raises(SchemaVersionError, match=f"revision 0002, this gpuarb needs {HEAD_REVISION}"):
        Ledger.open(ledger_url)
    with Ledger.open(ledger_url, check=False) as ledger:
        ledger.record(plane="cli", action="note", outcome="noop", node="n1", reason="before the upgrade")
        assert ledger.upgrade() == ("0002", HEAD_REVISION)
    with Ledger.open(ledger_url) as ledger:
        ledger.record_peaks({"L1": 7})
        assert ledger.peaks(["L1"]) == {"L1": 7}
        assert [r.reason for r in ledger.decisions()] == ["before the upgrade"]
    engine = sa.create_engine(ledger_url)
    try:
        with engine.connect() as conn:
            assert "lease_peaks" in migrate.table_names(conn)
    finally:
        engine.dispose()
