"""The arbiter: grant / degrade / wait / deny / revoke on hand-built GPU states."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_gpuarb.arbiter import decide, describe_state, spec_size
from slurm_gpuarb.model import (
    ClassPolicy,
    GpuInfo,
    GpuState,
    LeaseSpec,
    MigInstance,
    Outcome,
    Policy,
    Request,
    Tenant,
    TenantKind,
    Vram,
)
from slurm_gpuarb.units import parse_size_mib

GIB = 1024
MARGIN = 1024
RTX = "NVIDIA GeForce RTX 3090 Ti"

POLICY = Policy(
    classes={
        "llm": ClassPolicy("llm", priority=100, preemptible=False, may_degrade=False),
        "batch": ClassPolicy("batch", priority=10, preemptible=True, may_degrade=True),
        "scavenger": ClassPolicy("scavenger", priority=5, preemptible=True, may_degrade=True),
        "rigid": ClassPolicy("rigid", priority=10, preemptible=True, may_degrade=False),
        "serve": ClassPolicy("serve", priority=50, preemptible=False, may_degrade=True),
    },
    margin_mib=MARGIN,
    quantum_mib=512,
    default_class="batch",
)


def rtx(index: int = 0) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{index}", name=RTX, total_mib=24564, reserved_mib=300, used_mib=0)


def big(index: int, total: int) -> GpuInfo:
    return GpuInfo(index=index, uuid=f"GPU-{index}", name="NVIDIA H100", total_mib=total, reserved_mib=0, used_mib=0)


def ollama(size: int = 12 * GIB) -> Tenant:
    return Tenant(TenantKind.RESERVATION, "ollama", size, observed_mib=11059, pids=(999,), label="ollama")


def lease(lid: str, mib: int, prio: str = "batch", *, mig_uuid: str | None = None) -> Tenant:
    cls = POLICY.classes[prio]
    return Tenant(TenantKind.LEASE, lid, mib, prio=prio, priority=cls.priority, preemptible=cls.preemptible,
                  mig_uuid=mig_uuid)


def foreign(pid: int, mib: int, name: str = "python3", mig_uuid: str | None = None) -> Tenant:
    return Tenant(TenantKind.FOREIGN, f"pid:{pid}", 0, observed_mib=mib, pids=(pid,), label=name, mig_uuid=mig_uuid)


def state(gpu: GpuInfo, *tenants: Tenant, node: str = "n1") -> GpuState:
    return GpuState(node=node, gpu=gpu, margin_mib=MARGIN, tenants=tenants)


def ask(vram: int | str | None = None, *, node: str = "n1", gpu: int | None = None, **spec: object) -> Request:
    v = None
    if isinstance(vram, int):
        v = Vram(mib=vram)
    elif isinstance(vram, str):
        v = Vram(percent=int(vram.rstrip("%")))
    mn = spec.pop("min", None)
    return Request(LeaseSpec(vram=v, min=Vram(mib=mn) if isinstance(mn, int) else None, **spec),  # type: ignore[arg-type]
                   node=node, now=1000.0, gpu=gpu, job_id="12")


def run(request: Request, states: Sequence[GpuState]) -> tuple[Outcome, int, tuple[int, ...]]:
    d = decide(request, states, POLICY)
    return d.outcome, d.granted_mib, d.gpus


# --------------------------------------------------------------------------- the RTX 3090 Ti story
# usable = 24564 − 300 − 1024 = 23240; the ollama reservation holds 12GiB (its process 10.8GiB,
# counted once), so 10952MiB (10.7GiB) is leasable.


def test_story_two_batch_workers_then_wait() -> None:
    tenants: list[Tenant] = [ollama()]
    outcomes = []
    for i in range(3):
        d = decide(ask(4 * GIB), [state(rtx(), *tenants)], POLICY)
        outcomes.append(d.outcome)
        if d.granted:
            assert (d.granted_mib, d.gpus, d.requested_mib, d.prio) == (4 * GIB, (0,), 4 * GIB, "batch")
            tenants.append(lease(f"L{i}", d.granted_mib))
    assert outcomes == [Outcome.GRANT, Outcome.GRANT, Outcome.WAIT]
    assert "2.7GiB free" in d.reason
    assert "ollama (reservation) 12GiB" in d.reason
    assert "lease L0 (batch)" in d.reason
    assert "retry after a lease is released" in d.reason.lower()
    assert "add min=2.5GiB" in d.reason  # 2760MiB free, rounded down to the 512MiB quantum


def test_reservation_and_its_process_are_counted_once() -> None:
    # 12GiB declared + 10.8GiB observed would leave 0 if counted twice; once, 10952MiB remains
    d = decide(ask(10952), [state(rtx(), ollama())], POLICY)
    assert d.outcome is Outcome.GRANT
    d = decide(ask(10953), [state(rtx(), ollama())], POLICY)
    assert d.outcome is Outcome.DENY


def test_story_min_3gib_waits_when_less_is_left() -> None:
    s = state(rtx(), ollama(), lease("L0", 4 * GIB), lease("L1", 4 * GIB))  # 2760MiB free
    d = decide(ask(4 * GIB, min=3 * GIB), [s], POLICY)
    assert d.outcome is Outcome.WAIT
    assert "lower min= to 2.5GiB" in d.reason


def test_story_min_3gib_degrades_to_what_is_left() -> None:
    s = state(rtx(), ollama(11 * GIB), lease("L0", 4 * GIB), lease("L1", 4 * GIB))  # 3784MiB free
    d = decide(ask(4 * GIB, min=3 * GIB), [s], POLICY)
    assert d.outcome is Outcome.DEGRADE
    assert d.granted_mib == 3584  # 3784 rounded down to the 512MiB quantum
    assert d.requested_mib == 4 * GIB
    assert "Degraded to 3.5GiB of the 4GiB" in d.reason


def test_degrade_never_below_min_even_when_rounding_would() -> None:
    s = state(big(0, 10000), lease("L0", 8976 - 3100))  # usable 8976  # 3100 free; 3100 → 3072 by the quantum
    assert run(ask(4 * GIB, min=3000), [s])[:2] == (Outcome.DEGRADE, 3072)
    assert run(ask(4 * GIB, min=3080), [s])[:2] == (Outcome.DEGRADE, 3080)


def test_degrade_picks_the_gpu_with_most_free() -> None:
    states = [state(big(0, 10000), lease("a", 5000)), state(big(1, 10000), lease("b", 4000))]
    assert run(ask(8 * GIB, min=2 * GIB), states) == (Outcome.DEGRADE, 4608, (1,))


def test_class_that_may_not_degrade_waits() -> None:
    s = state(rtx(), ollama(11 * GIB), lease("L0", 4 * GIB), lease("L1", 4 * GIB))
    d = decide(ask(4 * GIB, min=3 * GIB, prio="rigid"), [s], POLICY)
    assert d.outcome is Outcome.WAIT
    assert "may not degrade" in d.reason


# --------------------------------------------------------------------------- preemption


def test_llm_revokes_batch_leases() -> None:
    s = state(rtx(), ollama(), lease("L0", 4 * GIB), lease("L1", 4 * GIB))
    d = decide(ask(8 * GIB, prio="llm"), [s], POLICY)
    assert d.outcome is Outcome.GRANT
    assert (d.granted_mib, d.gpus, d.prio) == (8 * GIB, (0,), "llm")
    assert set(d.revoke) == {"L0", "L1"}
    assert "lease L0 (batch)" in d.reason and "lease L1 (batch)" in d.reason
    assert [r["id"] for r in d.inputs["revoked"]] == list(d.revoke)
    assert d.inputs["revoked"][0] == {"id": d.revoke[0], "prio": "batch", "held_mib": 4 * GIB}


def test_llm_never_revokes_llm_reservations_or_foreign() -> None:
    s = state(rtx(), ollama(), lease("chat", 6 * GIB, "llm"), foreign(4242, 4 * GIB))
    d = decide(ask(4 * GIB, prio="llm"), [s], POLICY)
    assert d.outcome is Outcome.WAIT
    assert d.revoke == ()
    assert "foreign pid 4242 (python3)" in d.reason


def test_same_priority_preemptible_lease_is_not_revoked() -> None:
    peer = Tenant(TenantKind.LEASE, "peer", 8 * GIB, prio="llm", priority=100, preemptible=True)
    d = decide(ask(4 * GIB, prio="llm"), [state(rtx(), ollama(), peer)], POLICY)
    assert d.outcome is Outcome.WAIT


def test_lowest_priority_is_revoked_first() -> None:
    s = state(rtx(), ollama(), lease("b", 4 * GIB), lease("s", 2 * GIB, "scavenger"), lease("b2", 2 * GIB))
    # free 2760; 4GiB needs 1336 more: the scavenger lease alone is enough
    d = decide(ask(4 * GIB, prio="llm"), [s], POLICY)
    assert d.outcome is Outcome.GRANT and d.revoke == ("s",)


def test_revocations_the_grant_does_not_need_are_given_back() -> None:
    # scavenger (1000) first is not enough, then batch 5000: that alone suffices, so the scavenger survives
    s = state(big(0, 10000), lease("s", 1000, "scavenger"), lease("b", 5000), foreign(1, 8976 - 6000 - 1000))
    d = decide(ask(2500, prio="llm"), [s], POLICY)  # 1000 free, 1500 needed
    assert d.outcome is Outcome.GRANT and d.revoke == ("b",)


def test_giving_back_keeps_what_is_still_needed() -> None:
    # greedy takes sa, sc, then b (6900 for 5500); b alone is short, so sc goes back but sa stays
    s = state(big(0, 10000), lease("sa", 1000, "scavenger"), lease("sc", 900, "scavenger"), lease("b", 5000),
              foreign(1, 8976 - 6900))
    d = decide(ask(5500, prio="llm"), [s], POLICY)
    assert d.outcome is Outcome.GRANT and d.revoke == ("sa", "b")


def test_preemption_prefers_the_gpu_that_revokes_least() -> None:
    states = [state(big(0, 10000), lease("a", 8976)), state(big(1, 10000), lease("b", 4000), lease("c", 4976))]
    d = decide(ask(4 * GIB, prio="llm"), states, POLICY)
    assert (d.outcome, d.gpus, d.revoke) == (Outcome.GRANT, (1,), ("c",))


def test_batch_never_preempts() -> None:
    s = state(big(0, 10000), lease("s", 8976, "scavenger"))
    assert run(ask(4 * GIB), [s])[0] is Outcome.WAIT


def test_preemption_before_degrade_for_llm_and_a_fit_needs_no_revocation() -> None:
    s = state(rtx(), lease("L0", 20 * GIB))
    d = decide(ask(2 * GIB, prio="llm"), [s], POLICY)
    assert d.outcome is Outcome.GRANT and d.revoke == ()
    d = decide(ask(8 * GIB, prio="serve", min=1 * GIB), [s], POLICY)  # could degrade, preempts instead
    assert d.outcome is Outcome.GRANT and d.revoke == ("L0",)


# --------------------------------------------------------------------------- deny


def test_deny_30gib_says_what_could_ever_fit() -> None:
    d = decide(ask(30 * GIB), [state(rtx(), ollama())], POLICY)
    assert d.outcome is Outcome.DENY
    assert d.requested_mib == 30 * GIB and d.granted_mib == 0
    assert "10.7GiB" in d.reason and "vram=10952MiB or less" in d.reason
    assert "12GiB reserved for ollama" in d.reason
    assert parse_size_mib("10952MiB") == 10952


def test_deny_counts_reservations_but_not_leases() -> None:
    # 10GiB fits once the leases are gone: wait, not deny
    assert run(ask(10 * GIB), [state(rtx(), ollama(), lease("L0", 8 * GIB))])[0] is Outcome.WAIT


@pytest.mark.parametrize(
    ("request_", "needle"),
    [
        (ask(4 * GIB, prio="gold"), "unknown class 'gold'; classes: batch, llm, rigid, scavenger, serve"),
        (ask(0), "not a positive size"),
        (ask("0%"), "not a positive size"),
        (ask(None), "neither vram= nor mig="),
        (ask(4 * GIB, gpus=3), "gpus=3"),
        (ask(4 * GIB, gpus=0), "gpus=0"),
        (ask(4 * GIB, node="n9"), "node n9 has no GPUs"),
        (ask(4 * GIB, gpu=7), "GPU 7 does not exist on node n1 (GPUs: GPU 0"),
        (ask(4 * GIB, mig="any"), "no GPU on node n1 is in MIG mode"),
    ],
)
def test_deny(request_: Request, needle: str) -> None:
    d = decide(request_, [state(rtx(0)), state(rtx(1))], POLICY)
    assert d.outcome is Outcome.DENY
    assert needle in d.reason
    assert d.granted_mib == 0 and d.gpus == ()


# --------------------------------------------------------------------------- placement


def test_best_fit_takes_the_fullest_gpu_that_fits() -> None:
    states = [
        state(big(0, 10000)),  # 8976 free
        state(big(1, 10000), lease("a", 3976)),  # 5000 free
        state(big(2, 10000), lease("b", 3976)),  # 5000 free
    ]
    assert run(ask(4 * GIB), states) == (Outcome.GRANT, 4096, (1,))  # tie → lowest index
    assert run(ask(6 * GIB), states) == (Outcome.GRANT, 6144, (0,))
    assert "best fit" in decide(ask(4 * GIB), states, POLICY).reason


def test_pinned_gpu_overrides_best_fit() -> None:
    states = [state(big(0, 10000)), state(big(1, 10000), lease("a", 3976))]
    assert run(ask(4 * GIB, gpu=0), states) == (Outcome.GRANT, 4096, (0,))
    assert run(ask(6 * GIB, gpu=1), states)[0] is Outcome.WAIT
    assert [g["index"] for g in decide(ask(4 * GIB, gpu=0), states, POLICY).inputs["gpus"]] == [0]


def test_multi_gpu_needs_n_distinct_gpus_with_the_size_free() -> None:
    states = [
        state(big(0, 10000)),
        state(big(1, 10000), lease("a", 4000)),
        state(big(2, 10000), lease("b", 7000)),
        state(big(3, 10000), lease("c", 2000)),
    ]
    assert run(ask(4 * GIB, gpus=2), states) == (Outcome.GRANT, 4096, (1, 3))
    assert run(ask(6 * GIB, gpus=2), states) == (Outcome.GRANT, 6144, (0, 3))
    d = decide(ask(6 * GIB, gpus=3), states, POLICY)
    assert d.outcome is Outcome.WAIT and "on each of 3 GPUs" in d.reason


def test_multi_gpu_deny_when_too_few_gpus_could_ever_hold_it() -> None:
    states = [state(big(0, 10000)), state(big(1, 10000), ollama(6000))]
    d = decide(ask(6 * GIB, gpus=2), states, POLICY)
    assert d.outcome is Outcome.DENY and "gpus=1" in d.reason


def test_other_nodes_are_ignored() -> None:
    states = [state(big(0, 80000), node="n2"), state(rtx(0), ollama(), lease("L0", 10 * GIB))]
    d = decide(ask(4 * GIB), states, POLICY)
    assert d.outcome is Outcome.WAIT
    assert [g["node"] for g in d.inputs["gpus"]] == ["n1"]


def test_percent_is_of_the_gpus_total_memory() -> None:
    d = decide(ask("50%"), [state(rtx())], POLICY)
    assert (d.outcome, d.requested_mib, d.granted_mib) == (Outcome.GRANT, 12282, 12282)
    assert d.inputs["request"]["vram"] == "50%"
    # the same percent is bigger on a bigger GPU: best fit is by free memory, per-GPU size
    d = decide(ask("50%"), [state(rtx(0), ollama()), state(big(1, 81559))], POLICY)
    assert (d.gpus, d.granted_mib) == ((1,), 40779)


# --------------------------------------------------------------------------- MIG


def a100_mig(*tenants: Tenant, index: int = 0) -> GpuState:
    inst = (
        MigInstance("MIG-a", "1g.5gb", 4864, gi_id=9),
        MigInstance("MIG-b", "1g.5gb", 4864, gi_id=10),
        MigInstance("MIG-c", "2g.10gb", 9856, gi_id=3),
        MigInstance("MIG-d", "3g.20gb", 19968, gi_id=1),
    )
    gpu = GpuInfo(index=index, uuid=f"GPU-{index}", name="NVIDIA A100-SXM4-40GB", total_mib=40960,
                  reserved_mib=0, used_mib=0, mig_enabled=True, mig_instances=inst)
    return state(gpu, *tenants)


def test_mig_any_takes_the_smallest_free_instance_that_holds_the_size() -> None:
    d = decide(ask(4 * GIB, mig="any"), [a100_mig()], POLICY)
    assert (d.outcome, d.granted_mib, d.mig_uuid, d.gpus) == (Outcome.GRANT, 4864, "MIG-a", (0,))
    d = decide(ask(4 * GIB, mig="any"), [a100_mig(lease("x", 4864, mig_uuid="MIG-a"),
                                                  foreign(5, 100, mig_uuid="MIG-b"))], POLICY)
    assert (d.granted_mib, d.mig_uuid) == (9856, "MIG-c")
    assert d.inputs["mig_uuid"] == "MIG-c"


def test_request_without_mig_on_a_mig_gpu_is_mig_any() -> None:
    assert decide(ask(6 * GIB), [a100_mig()], POLICY).mig_uuid == "MIG-c"


def test_mig_profile_without_vram_asks_for_the_profile() -> None:
    d = decide(ask(None, mig="3g.20gb"), [a100_mig()], POLICY)
    assert (d.outcome, d.requested_mib, d.granted_mib, d.mig_uuid) == (Outcome.GRANT, 19968, 19968, "MIG-d")


def test_mig_profile_denials() -> None:
    d = decide(ask(8 * GIB, mig="1g.5gb"), [a100_mig()], POLICY)
    assert d.outcome is Outcome.DENY and "does not fit a 1g.5gb MIG instance" in d.reason
    d = decide(ask(None, mig="7g.40gb"), [a100_mig()], POLICY)
    assert d.outcome is Outcome.DENY and "profiles here: 1g.5gb, 2g.10gb, 3g.20gb" in d.reason
    d = decide(ask(None, mig="1g.5gb", gpus=2), [a100_mig(), a100_mig(index=1)], POLICY)
    assert d.outcome is Outcome.DENY and "one instance" in d.reason
    d = decide(ask(24 * GIB, mig="any"), [a100_mig()], POLICY)
    assert d.outcome is Outcome.DENY and "largest is 19.5GiB" in d.reason


def test_mig_all_taken_waits_and_llm_revokes_the_cheapest_instance() -> None:
    tenants = (lease("a", 4864, mig_uuid="MIG-a"), lease("b", 4864, mig_uuid="MIG-b"),
               lease("c", 9856, mig_uuid="MIG-c"), lease("d", 19968, "llm", mig_uuid="MIG-d"))
    d = decide(ask(None, mig="1g.5gb"), [a100_mig(*tenants)], POLICY)
    assert d.outcome is Outcome.WAIT and "no free 1g.5gb MIG instance" in d.reason
    d = decide(ask(4 * GIB, mig="any", prio="llm"), [a100_mig(*tenants)], POLICY)
    assert (d.outcome, d.revoke, d.mig_uuid, d.granted_mib) == (Outcome.GRANT, ("a",), "MIG-a", 4864)


def test_mig_instance_held_by_a_reservation_never_counts() -> None:
    vllm = Tenant(TenantKind.RESERVATION, "vllm", 19968, mig_uuid="MIG-d")
    d = decide(ask(12 * GIB, mig="any"), [a100_mig(vllm)], POLICY)
    assert d.outcome is Outcome.DENY


def test_multi_gpu_uses_whole_gpus_only() -> None:
    states = [a100_mig(index=0), state(big(1, 10000)), state(big(2, 10000))]
    assert run(ask(4 * GIB, gpus=2), states) == (Outcome.GRANT, 4096, (1, 2))
    assert run(ask(4 * GIB, gpus=3), states)[0] is Outcome.DENY


# --------------------------------------------------------------------------- inputs and scale


def test_inputs_are_json_and_complete() -> None:
    s = state(rtx(), ollama(), lease("L0", 4 * GIB), foreign(4242, 300))
    d = decide(ask(4 * GIB, min=3 * GIB, ttl_s=7200), [s], POLICY)
    back = json.loads(json.dumps(d.inputs))
    assert back == d.inputs
    assert back["request"] == {"vram": "4096MiB", "min": "3072MiB", "ttl": "2h", "node": "n1", "gpu": None,
                               "job_id": "12", "restart_count": 0}
    assert back["class"] == {"name": "batch", "priority": 10, "preemptible": True, "may_degrade": True}
    assert back["policy"] == {"margin_mib": 1024, "quantum_mib": 512}
    assert back["chosen"] == [0] and back["revoked"] == []
    snap = back["gpus"][0]
    assert snap == describe_state(s)
    # the documented keys (a snapshot may carry more for people, never fewer)
    assert {"node": "n1", "index": 0, "uuid": "GPU-0", "name": RTX, "total_mib": 24564, "reserved_mib": 300,
            "margin_mib": 1024, "usable_mib": 23240, "held_mib": 12288 + 4096 + 300,
            "free_mib": 23240 - 16684}.items() <= snap.items()
    assert {"kind": "reservation", "id": "ollama", "size_mib": 12288, "observed_mib": 11059, "held_mib": 12288,
            "pids": [999], "prio": None, "label": "ollama", "mig_uuid": None}.items() <= snap["tenants"][0].items()


def test_thousands_of_tenants() -> None:
    many = [lease(f"s{i}", 4, "scavenger") for i in range(3000)] + [lease(f"b{i}", 4) for i in range(3000)]
    s = state(big(0, 10000 + 24000), *many)  # usable 32976, held 24000: 8976 free
    assert run(ask(8 * GIB), [s])[:2] == (Outcome.GRANT, 8192)
    d = decide(ask(9000, prio="llm"), [s], POLICY)
    assert d.outcome is Outcome.GRANT
    assert len(d.revoke) == 6 and all(r.startswith("s") for r in d.revoke)


def test_decide_is_deterministic() -> None:
    states = [state(rtx(0), ollama()), state(rtx(1), lease("x", 9 * GIB))]
    assert decide(ask(4 * GIB), states, POLICY) == decide(ask(4 * GIB), states, POLICY)


@pytest.mark.parametrize(("mib", "token"), [(512, "512MiB"), (2560, "2.5GiB"), (10952, "10952MiB"), (4096, "4GiB")])
def test_spec_size_parses_back_exactly(mib: int, token: str) -> None:
    assert spec_size(mib) == token
    assert parse_size_mib(token) == mib


_tenant = st.builds(
    lambda kind, size, seen, prio: Tenant(
        kind, "t", size if kind != TenantKind.FOREIGN else 0, observed_mib=seen,
        prio=prio if kind == TenantKind.LEASE else None,
        priority=POLICY.classes[prio].priority if kind == TenantKind.LEASE else 0,
        preemptible=POLICY.classes[prio].preemptible if kind == TenantKind.LEASE else False),
    st.sampled_from(list(TenantKind)), st.integers(0, 12000), st.integers(0, 12000),
    st.sampled_from(sorted(POLICY.classes)),
)


@settings(max_examples=150, deadline=None)
@given(
    totals=st.lists(st.integers(4000, 40000), min_size=1, max_size=4),
    tenants=st.lists(st.lists(_tenant, max_size=4), min_size=4, max_size=4),
    size=st.integers(1, 30000),
    floor=st.none() | st.integers(1, 30000),
    prio=st.sampled_from(sorted(POLICY.classes)),
    gpus=st.integers(1, 3),
)
def test_never_grants_more_than_is_free(totals: list[int], tenants: list[list[Tenant]], size: int,
                                        floor: int | None, prio: str, gpus: int) -> None:
    states = [state(big(i, t), *(replace(x, id=f"g{i}t{j}") for j, x in enumerate(tenants[i])))
              for i, t in enumerate(totals)]
    d = decide(ask(size, min=floor, prio=prio, gpus=gpus), states, POLICY)
    by_index = {s.gpu.index: s for s in states}
    assert len(set(d.gpus)) == len(d.gpus)
    if d.granted:
        assert len(d.gpus) == gpus
        for g in d.gpus:
            s = by_index[g]
            freed = sum(t.held_mib for t in s.tenants if t.id in d.revoke)
            assert d.granted_mib <= s.free_mib + freed
    if d.outcome is Outcome.GRANT:
        assert d.granted_mib == size
    if d.outcome is Outcome.DEGRADE:
        assert floor is not None and min(floor, size) <= d.granted_mib < size
    if d.revoke:
        assert not POLICY.classes[prio].preemptible
        revoked = [t for s in states for t in s.tenants if t.id in d.revoke]
        assert all(t.kind == TenantKind.LEASE and t.preemptible and t.priority < POLICY.classes[prio].priority
                   for t in revoked)
    if d.outcome is Outcome.DENY:
        assert d.gpus == () and d.granted_mib == 0


# --------------------------------------------------------------------------- pinned by Slurm (the Prolog)


def pinned(vram: int | None, on: tuple[int, ...] = (), *, mig_uuid: str | None = None, preempt: bool = False,
           **spec: Any) -> Request:
    return replace(ask(vram, **spec), pinned=on, pinned_mig_uuid=mig_uuid, preempt=preempt)


def test_pinned_lease_takes_the_gpu_slurm_gave_not_the_best_fit() -> None:
    states = [state(big(0, 20000), lease("L0", 10000)), state(big(1, 20000))]
    assert run(ask(4 * GIB), states) == (Outcome.GRANT, 4 * GIB, (0,))  # best fit: the fuller GPU
    d = decide(pinned(4 * GIB, (1,)), states, POLICY)
    assert (d.outcome, d.gpus) == (Outcome.GRANT, (1,))
    assert d.inputs["request"]["pinned"] == [1] and d.inputs["request"]["preempt"] is False


def test_pinned_lease_covers_every_allocated_gpu_whatever_gpus_says() -> None:
    states = [state(big(i, 20000)) for i in range(4)]
    d = decide(pinned(4 * GIB, (3, 1), gpus=1), states, POLICY)
    assert (d.outcome, d.gpus, d.granted_mib) == (Outcome.GRANT, (1, 3), 4 * GIB)
    # one of them full: the lease is refused, it never moves to another GPU
    states[3] = state(big(3, 20000), foreign(9, 15000))
    d = decide(pinned(4 * GIB, (3, 1)), states, POLICY)
    assert d.outcome is Outcome.WAIT and d.gpus == ()


def test_pinned_gpu_that_does_not_exist_is_denied_by_name() -> None:
    d = decide(pinned(4 * GIB, (0, 7)), [state(big(0, 20000))], POLICY)
    assert d.outcome is Outcome.DENY
    assert "GPU 7, which Slurm allocated, does not exist on node n1" in d.reason


def test_pinned_request_never_preempts() -> None:
    s = state(big(0, 20000), lease("L0", 8 * GIB), lease("L1", 8 * GIB))  # 18976 usable, 2592 free
    assert decide(replace(pinned(8 * GIB, (0,), prio="llm"), preempt=True), [s], POLICY).revoke == ("L0",)
    d = decide(pinned(8 * GIB, (0,), prio="llm"), [s], POLICY)
    assert (d.outcome, d.revoke) == (Outcome.WAIT, ())


def test_pinned_request_may_still_degrade_on_its_gpu() -> None:
    s = state(big(0, 20000), lease("L0", 12 * GIB))  # 6688 free
    d = decide(pinned(8 * GIB, (0,), min=4 * GIB), [s], POLICY)
    assert (d.outcome, d.granted_mib, d.gpus) == (Outcome.DEGRADE, 6656, (0,))


def test_pinned_mig_instance_is_granted_whole_and_exactly() -> None:
    d = decide(pinned(None, mig_uuid="MIG-b"), [a100_mig()], POLICY)
    assert (d.outcome, d.granted_mib, d.mig_uuid, d.gpus) == (Outcome.GRANT, 4864, "MIG-b", (0,))
    assert d.inputs["request"]["pinned_mig_uuid"] == "MIG-b"
    # a smaller vram still takes that instance (not the smallest free one), whole
    d = decide(pinned(1024, mig_uuid="MIG-d"), [a100_mig()], POLICY)
    assert (d.granted_mib, d.mig_uuid) == (19968, "MIG-d")


def test_pinned_mig_instance_taken_or_too_small_or_unknown() -> None:
    taken = a100_mig(foreign(5, 100, mig_uuid="MIG-b"))
    assert decide(pinned(None, mig_uuid="MIG-b"), [taken], POLICY).outcome is Outcome.WAIT
    d = decide(pinned(8 * GIB, mig_uuid="MIG-b"), [a100_mig()], POLICY)
    assert d.outcome is Outcome.DENY and "does not fit" in d.reason
    d = decide(pinned(None, mig_uuid="MIG-zz"), [a100_mig()], POLICY)
    assert d.outcome is Outcome.DENY
    assert "MIG instance MIG-zz, which Slurm allocated, does not exist on node n1" in d.reason


def test_unpinned_requests_keep_their_inputs_shape() -> None:
    req = decide(ask(4 * GIB), [state(rtx())], POLICY).inputs["request"]
    assert not {"pinned", "pinned_mig_uuid", "preempt"} & set(req)
