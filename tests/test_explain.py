"""Explanations: one paragraph per decision, a time-ordered story per job."""

from __future__ import annotations

from dataclasses import replace

from slurm_gpuarb.arbiter import decide
from slurm_gpuarb.explain import explain_decision, explain_decision_obj, explain_history, format_ts
from slurm_gpuarb.model import (
    ClassPolicy,
    Decision,
    DecisionRecord,
    GpuInfo,
    GpuState,
    LeaseSpec,
    MigInstance,
    Policy,
    Request,
    Tenant,
    TenantKind,
    Vram,
)

GIB = 1024
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC

POLICY = Policy(
    classes={
        "llm": ClassPolicy("llm", priority=100, preemptible=False, may_degrade=False),
        "batch": ClassPolicy("batch", priority=10, preemptible=True, may_degrade=True),
    },
    margin_mib=1024,
    quantum_mib=512,
    default_class="batch",
)

OLLAMA = Tenant(TenantKind.RESERVATION, "ollama", 12 * GIB, observed_mib=11059, pids=(999,), label="ollama")


def batch(lid: str, mib: int = 4 * GIB) -> Tenant:
    return Tenant(TenantKind.LEASE, lid, mib, prio="batch", priority=10, preemptible=True)


def rtx(*tenants: Tenant, index: int = 0) -> GpuState:
    gpu = GpuInfo(index=index, uuid=f"GPU-{index}", name="NVIDIA GeForce RTX 3090 Ti", total_mib=24564,
                  reserved_mib=300, used_mib=0)
    return GpuState(node="n1", gpu=gpu, margin_mib=1024, tenants=tenants)


def decision(mib: int, *states: GpuState, **spec: object) -> Decision:
    req = Request(LeaseSpec(vram=Vram(mib=mib), **spec), node="n1", now=T0, job_id="12")  # type: ignore[arg-type]
    return decide(req, states, POLICY)


def record(d: Decision, rid: int = 1, ts: float = T0, lease_id: str | None = "abc") -> DecisionRecord:
    return DecisionRecord(id=rid, ts=ts, plane="prolog", action="request", outcome=str(d.outcome), node=d.node,
                          reason=d.reason, lease_id=lease_id, job_id="12", prio=d.prio,
                          requested_mib=d.requested_mib, granted_mib=d.granted_mib, inputs=d.inputs)


def test_wait_paragraph_has_the_key_facts() -> None:
    d = decision(4 * GIB, rtx(OLLAMA, batch("L0"), batch("L1")))
    text = explain_decision_obj(d)
    assert "\n" not in text
    for fact in (
        "Job 12 asked node n1 for 4GiB as class batch (priority 10, preemptible, may degrade)",
        "[vram=4096MiB]",
        "GPU 0 (NVIDIA GeForce RTX 3090 Ti) had 2.7GiB free of 22.7GiB usable",
        "300MiB driver reserve − 1GiB safety margin",
        "Reserved: ollama, declared 12GiB, its processes used 10.8GiB, counted once as 12GiB.",
        "Leased: 2 leases held 8GiB (L0 batch 4GiB, L1 batch 4GiB).",
        "Answer: wait.",
        d.reason,
    ):
        assert fact in text, fact


def test_revoke_paragraph_names_the_revoked_leases() -> None:
    d = decision(8 * GIB, rtx(OLLAMA, batch("L0"), batch("L1")), prio="llm")
    text = explain_decision_obj(d)
    assert "as class llm (priority 100, not preemptible, may not degrade)" in text
    assert "Answer: granted 8GiB on GPU 0, revoking lease L0 (batch, 4GiB), lease L1 (batch, 4GiB)." in text


def test_degrade_and_deny_paragraphs() -> None:
    d = decision(4 * GIB, rtx(OLLAMA, batch("L0", 3584), batch("L1", 3584)), min=Vram(mib=3 * GIB))
    text = explain_decision_obj(d)
    assert "accepting down to 3072MiB" in text
    assert "Answer: degraded to 4GiB" not in text and "Answer: degraded to 3.5GiB on GPU 0." in text
    text = explain_decision_obj(decision(30 * GIB, rtx(OLLAMA)))
    assert "for 30GiB" in text and "Answer: denied." in text and "vram=10952MiB or less" in text


def test_record_paragraph_starts_with_time_plane_and_lease() -> None:
    d = decision(4 * GIB, rtx(OLLAMA))
    text = explain_decision(record(d))
    assert text.startswith("At 2023-11-14 22:13:20 UTC, prolog on n1: Lease abc of job 12 asked node n1 for 4GiB")
    assert "Answer: granted 4GiB on GPU 0." in text


def test_foreign_processes_and_several_gpus() -> None:
    python = Tenant(TenantKind.FOREIGN, "pid:4242", 0, observed_mib=2 * GIB, pids=(4242,), label="python3")
    d = decision(4 * GIB, rtx(OLLAMA, python), rtx(batch("L9", 20 * GIB), index=1))
    text = explain_decision_obj(d)
    assert "foreign pid 4242 (python3) 2GiB on GPU 0" in text
    assert "ollama on GPU 0, declared 12GiB" in text
    assert "GPU 1 (NVIDIA GeForce RTX 3090 Ti) had 2.7GiB free" in text


def test_many_gpus_are_summarised() -> None:
    states = [rtx(batch(f"L{i}", (i + 1) * GIB), index=i) for i in range(10)]
    text = explain_decision_obj(decision(4 * GIB, *states))
    assert "2 more GPUs had at most 13.7GiB free" in text
    assert "Leased: 10 leases held 55GiB (L9 batch 10GiB, L8 batch 9GiB, L7 batch 8GiB, …)." in text


def test_mig_gpus_are_described_by_instances() -> None:
    inst = (MigInstance("MIG-a", "1g.5gb", 4864, gi_id=9), MigInstance("MIG-b", "1g.5gb", 4864, gi_id=10),
            MigInstance("MIG-c", "2g.10gb", 9856, gi_id=3))
    gpu = GpuInfo(index=0, uuid="GPU-0", name="NVIDIA A100-SXM4-40GB", total_mib=40960, reserved_mib=0,
                  used_mib=0, mig_enabled=True, mig_instances=inst)
    taken = Tenant(TenantKind.LEASE, "L1", 4864, prio="batch", priority=10, mig_uuid="MIG-a")
    d = decision(4 * GIB, GpuState("n1", gpu, 1024, (taken,)), mig="any")
    text = explain_decision_obj(d)
    assert "GPU 0 (NVIDIA A100-SXM4-40GB) is in MIG mode with 3 instances, 2 free (1g.5gb, 2g.10gb)" in text
    assert "a MIG instance (any) for 4GiB" in text
    assert "Answer: granted 4.8GiB on GPU 0 (MIG instance MIG-b)." in text


def test_unknown_class_and_old_rows_with_partial_inputs() -> None:
    text = explain_decision_obj(decision(4 * GIB, rtx(), prio="gold"))
    assert "class gold (not a configured class)" in text and "unknown class 'gold'" in text
    old = DecisionRecord(id=3, ts=T0, plane="host", action="request", outcome="grant", node="n1",
                         reason="granted", granted_mib=2048, inputs={"request": {"vram": "2048MiB", "node": "n1"}})
    text = explain_decision(old)
    assert "An unnamed lease asked node n1 for 2GiB" not in text  # requested_mib unknown: say the spec instead
    assert "asked node n1 for vram=2048MiB" in text and "Answer: granted 2GiB." in text


def test_rows_without_inputs_say_what_happened_and_when() -> None:
    rel = DecisionRecord(id=2, ts=T0 + 60, plane="epilog", action="release", outcome="released", node="n1",
                         reason="job ended", lease_id="abc", job_id="12", granted_mib=4 * GIB)
    assert explain_decision(rel) == ("At 2023-11-14 22:14:20 UTC, epilog on n1: released lease abc of job 12 (4GiB): "
                                     "job ended.")
    rv = DecisionRecord(id=4, ts=T0, plane="host", action="revoke", outcome="revoke", node=None, reason="",
                        lease_id="L0", restart_count=1)
    assert explain_decision(rv) == f"At {format_ts(T0)}, host: revoked lease L0: no reason was recorded."


def test_history_is_in_time_order_one_line_per_record() -> None:
    d = decision(4 * GIB, rtx(OLLAMA))
    req = record(d, rid=1, ts=T0)
    exp = DecisionRecord(id=2, ts=T0 + 7200, plane="agent", action="expire", outcome="expired", node="n1",
                         reason="ttl 2h passed", lease_id="abc", job_id="12", restart_count=1)
    story = explain_history([exp, req])
    lines = story.split("\n")
    assert len(lines) == 2
    assert lines[0].startswith("At 2023-11-14 22:13:20 UTC, prolog on n1: Lease abc of job 12 asked")
    assert lines[1] == ("At 2023-11-15 00:13:20 UTC, agent on n1: expired lease abc of job 12 (restart 1): "
                        "ttl 2h passed.")
    assert explain_history([]) == "No decisions are recorded for it."


# --------------------------------------------------------------------------- holder-mode reservations


def test_holder_reservation_held_by_a_lease_is_named_with_its_lease_and_job() -> None:
    holder = Tenant(TenantKind.LEASE, "LH1", 12 * GIB, observed_mib=11059, pids=(999,), prio="llm", priority=100,
                    label="job=42 holds=ollama", reservation="ollama")
    text = explain_decision_obj(decision(4 * GIB, rtx(holder, batch("L0"))))
    assert ("Reserved: reservation ollama (holder mode) held by lease LH1 of job 42, its processes counted in that "
            "lease (12GiB).") in text
    assert "Leased: 2 leases held 16GiB" in text  # the holder's lease is the reservation: counted once


def test_holder_reservation_without_a_holder_counts_what_its_processes_use() -> None:
    unheld = Tenant(TenantKind.RESERVATION, "ollama", 0, observed_mib=11059, pids=(999,),
                    label="holder mode, no holder job: process=ollama", reservation="ollama")
    text = explain_decision_obj(decision(4 * GIB, rtx(unheld, batch("L0"))))
    assert ("Reserved: reservation ollama (holder mode): no holder job — counts only what its processes use "
            "(10.8GiB).") in text
    assert "declared" not in text


def test_a_holder_jobs_own_request_says_whose_memory_it_holds() -> None:
    d = decision(12 * GIB, rtx(batch("L0")), prio="llm")
    plain = record(d)
    text = explain_decision(replace(plain, inputs={**d.inputs, "holds": "ollama"}))
    assert "It is the holder job of reservation ollama (holder mode)" in text
    assert "holder job" not in explain_decision(plain)
