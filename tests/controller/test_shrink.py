"""Shrinking pending jobs to min= after wait=: only when due, only what job_submit would map, one row each."""

from __future__ import annotations

import pytest

from slurm_gpuarb.config import Config
from slurm_gpuarb.controller import Controller
from slurm_gpuarb.controller.shrink import plan_shrink, replace_gpu_gres
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.lua import submit_tables
from slurm_gpuarb.model import ControllerConfig
from slurm_gpuarb.slurm.base import JobInfo, SlurmError

from .conftest import T0, Clock, FakeSlurm, Probe, make_job

# job_submit's canonical form of `gpuarb: vram=8GiB prio=batch min=4GiB wait=1m` in partition shard
CANON = "gpuarb/1: vram=8192MiB prio=batch min=4096MiB wait=1m shards=16"
SHRUNK = "gpuarb/1: vram=4096MiB prio=batch shards=8"


@pytest.fixture(autouse=True)
def _no_service(probe: Probe) -> None:
    probe.status = None  # the holder step stays out of these tests


def pending(job_id: str = "42", comment: str = CANON, *, reason: str = "Resources", tres: str = "gres:shard:16",
            partition: str = "shard", submit: float | None = T0) -> JobInfo:
    return make_job(job_id, comment=comment, reason=reason, tres=tres, partition=partition, submit=submit)


def rows(ledger: Ledger, action: str = "shrink") -> list[tuple[str | None, str]]:
    return [(r.job_id, r.outcome) for r in ledger.decisions(plane="agent", action=action)]


def test_shrinks_only_after_wait(controller: Controller, slurm: FakeSlurm, clock: Clock, ledger: Ledger) -> None:
    slurm.add(pending())
    clock.advance(59)
    assert controller.tick().actions == []
    assert slurm.updates == []

    clock.advance(1)
    tick = controller.tick()
    assert tick.actions == ["shrink job 42"] and tick.errors == []
    assert slurm.updates == [("42", {"Comment": SHRUNK, "TresPerNode": "gres:shard:8"})]
    (row,) = ledger.decisions(plane="agent", action="shrink")
    assert (row.job_id, row.outcome, row.requested_mib, row.granted_mib, row.prio) == ("42", "degrade", 8192, 4096,
                                                                                      "batch")
    assert "pending (Resources) for 1m, past its wait=1m" in row.reason
    assert "gres:shard:16 (8GiB) to gres:shard:8 (min=4GiB)" in row.reason
    assert row.inputs["comment"] == SHRUNK


def test_a_shrunk_job_is_not_shrunk_again(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                          ledger: Ledger) -> None:
    slurm.add(pending())
    clock.advance(120)
    controller.tick()
    clock.advance(15)
    assert controller.tick().actions == []
    assert len(slurm.updates) == 1
    assert rows(ledger) == [("42", "degrade")]


@pytest.mark.parametrize(("state", "reason"), [
    ("PENDING", "JobHeldUser"),
    ("PENDING", "Dependency"),
    ("PENDING", "BeginTime"),
    ("PENDING", ""),
    ("RUNNING", ""),
    ("COMPLETED", ""),
])
def test_only_jobs_pending_for_resources_or_priority(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                     state: str, reason: str) -> None:
    slurm.add(make_job("42", state=state, comment=CANON, reason=reason, tres="gres:shard:16"))
    clock.advance(3600)
    controller.tick()
    assert slurm.updates == []


def test_priority_counts_as_cannot_start(controller: Controller, slurm: FakeSlurm, clock: Clock) -> None:
    slurm.add(pending(reason="Priority"))
    clock.advance(60)
    controller.tick()
    assert [u[0] for u in slurm.updates] == ["42"]


@pytest.mark.parametrize("comment", [
    "gpuarb/1: vram=8192MiB prio=batch shards=16",  # no min=
    "gpuarb/1: vram=8192MiB prio=fixed min=4096MiB wait=1m shards=16",  # class may not degrade
    "gpuarb/1: vram=8192MiB prio=llm min=4096MiB wait=1m shards=16",  # llm may not degrade either
    "gpuarb: vram=8GiB prio=batch min=4GiB wait=1m",  # not canonical: job_submit did not map it
    "gpuarb/1: vram=8192MiB prio=nosuch min=4096MiB wait=1m shards=16",  # unknown class
    "gpuarb/1: vram=oops",  # not a spec
    "just a comment",
])
def test_needs_a_canonical_min_in_a_class_that_may_degrade(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                           comment: str) -> None:
    slurm.add(pending(comment=comment))
    clock.advance(3600)
    assert controller.tick().errors == []
    assert slurm.updates == []


def test_without_wait_it_shrinks_at_once(controller: Controller, slurm: FakeSlurm) -> None:
    slurm.add(pending(comment="gpuarb/1: vram=8192MiB prio=batch min=4096MiB shards=16"))
    controller.tick()
    assert slurm.updates == [("42", {"Comment": SHRUNK, "TresPerNode": "gres:shard:8"})]


def test_text_before_the_marker_and_other_gres_stay(controller: Controller, slurm: FakeSlurm, clock: Clock) -> None:
    slurm.add(pending(comment="run 7; " + CANON, tres="gres:nvme:1,gres:shard:16"))
    clock.advance(60)
    controller.tick()
    assert slurm.updates == [("42", {"Comment": "run 7; " + SHRUNK, "TresPerNode": "gres:nvme:1,gres:shard:8"})]


def test_min_equal_to_what_it_holds_is_nothing_to_shrink(controller: Controller, slurm: FakeSlurm,
                                                         clock: Clock) -> None:
    slurm.add(pending(comment="gpuarb/1: vram=4096MiB prio=batch min=4000MiB wait=1m shards=8", tres="gres:shard:8"))
    clock.advance(60)
    controller.tick()
    assert slurm.updates == []


def test_whole_gpus_have_nothing_to_shrink(controller: Controller, slurm: FakeSlurm, clock: Clock) -> None:
    slurm.add(pending(comment="gpuarb/1: vram=40960MiB prio=batch min=20480MiB wait=1m", tres="gres:gpu:1",
                      partition="batch"))
    clock.advance(60)
    controller.tick()
    assert slurm.updates == []


def test_mig_shrinks_to_the_smallest_profile_holding_min(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                         ledger: Ledger) -> None:
    slurm.add(pending(comment="gpuarb/1: vram=30720MiB prio=batch min=8192MiB wait=1m", tres="gres:gpu:3g.40gb:1",
                      partition="mig"))
    clock.advance(60)
    controller.tick()
    assert slurm.updates == [("42", {"Comment": "gpuarb/1: vram=8192MiB prio=batch",
                                     "TresPerNode": "gres:gpu:1g.10gb:1"})]
    assert rows(ledger) == [("42", "degrade")]


def test_a_job_that_started_meanwhile_is_a_noop(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                ledger: Ledger) -> None:
    slurm.add(pending())
    clock.advance(60)
    real_update = slurm.update_job

    def started_first(job_id: str, **fields: str) -> None:
        slurm.start(job_id, "n2", at=clock.now)  # the scheduler won the race
        real_update(job_id, **fields)

    slurm.update_job = started_first  # type: ignore[method-assign]
    tick = controller.tick()
    assert (tick.actions, tick.errors) == ([], [])
    assert rows(ledger) == []
    assert slurm.get("42").comment == CANON


def test_a_refused_update_is_recorded_once(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                           ledger: Ledger) -> None:
    slurm.add(pending())
    slurm.refuse = SlurmError("could not update job 42: Slurm refused")
    clock.advance(60)
    controller.tick()
    clock.advance(15)
    controller.tick()
    assert len(slurm.updates) == 2  # tried again
    (row,) = ledger.decisions(plane="agent", action="shrink")
    assert row.outcome == "error" and "Slurm refused" in row.reason
    slurm.refuse = None
    clock.advance(15)
    controller.tick()
    assert rows(ledger) == [("42", "error"), ("42", "degrade")]


def test_shrink_can_be_turned_off(cfg: Config, ledger: Ledger, slurm: FakeSlurm, clock: Clock) -> None:
    agent = Controller(cfg, ledger=ledger, slurm=slurm, probe_fn=lambda r: None, clock=clock, uid=0,
                       settings=ControllerConfig(shrink=False))
    slurm.add(pending())
    clock.advance(3600)
    agent.tick()
    assert slurm.updates == []


def test_percent_sizes_resolve_against_the_partitions_gpu(cfg: Config) -> None:
    tables = submit_tables(cfg)
    job = make_job("42", comment="gpuarb/1: vram=50% prio=batch min=20% shards=24", reason="Resources",
                   tres="gres:shard:24", partition="shard")
    plan = plan_shrink(cfg, tables, job, T0 + 1)
    assert plan is not None
    total = tables.partitions["shard"].gpu_total_mib
    assert (plan.asked_mib, plan.floor_mib) == (total // 2, total * 20 // 100)
    assert plan.tres == f"gres:shard:{-(-(total * 20 // 100) // 512)}"
    assert plan.comment == f"gpuarb/1: vram=20% prio=batch shards={plan.shards}"


def test_no_submit_time_no_shrink(cfg: Config) -> None:
    job = make_job("42", comment=CANON, reason="Resources", tres="gres:shard:16", submit=None)
    assert plan_shrink(cfg, submit_tables(cfg), job, T0 + 3600) is None


@pytest.mark.parametrize(("tres", "gres", "expected"), [
    ("gres:shard:16", "gres:shard:8", "gres:shard:8"),
    ("gres/shard:16", "gres:shard:8", "gres/shard:8"),
    ("gres:nvme:1,gres:shard:16", "gres:shard:8", "gres:nvme:1,gres:shard:8"),
    ("gres:gpu:3g.40gb:1", "gres:gpu:1g.10gb:1", "gres:gpu:1g.10gb:1"),
    ("", "gres:shard:8", "gres:shard:8"),
])
def test_replace_gpu_gres(tres: str, gres: str, expected: str) -> None:
    assert replace_gpu_gres(tres, gres) == expected
