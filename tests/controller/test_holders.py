"""Holder jobs: submitted while the service is up, kept through the grace period, cancelled after it,
resubmitted when the service returns, found again after a restart; a decision row at each step."""

from __future__ import annotations

import dataclasses

import pytest

from slurm_gpuarb.config import Config
from slurm_gpuarb.controller import Controller
from slurm_gpuarb.controller.holders import HOLDER_SCRIPT, holder_job_name, holder_of, plan_holder
from slurm_gpuarb.errors import ConfigError, LeaseSpecError
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.lua import submit_tables
from slurm_gpuarb.model import ControllerConfig, Reservation
from slurm_gpuarb.slurm.base import SlurmError

from .conftest import AGENT_UID, USER_UID, Clock, FakeSlurm, Probe, Status, make_job, sbatch_options

# 12GiB declared, 10.8GiB observed: 24 shards of 512MiB
COMMENT = "gpuarb-holder=ollama gpuarb/1: vram=12288MiB prio=llm shards=24"


def story(ledger: Ledger) -> list[tuple[str, str, str | None]]:
    return [(r.action, r.outcome, r.job_id) for r in ledger.decisions(plane="agent")]


def held(slurm: FakeSlurm) -> list[str]:
    """Holder jobs Slurm has pending or running."""
    return [j.job_id for j in slurm.job_list if j.name == "gpuarb-hold-ollama" and j.state in ("PENDING", "RUNNING")]


def up_and_held(controller: Controller, slurm: FakeSlurm, clock: Clock) -> str:
    """The service is up, the holder was submitted and now runs on n2 with its 24 shards."""
    controller.tick()
    (job,) = held(slurm)
    slurm.start(job, "n2", at=clock.now, shards=24)
    return job


def test_submitted_while_the_service_is_up(controller: Controller, slurm: FakeSlurm, ledger: Ledger) -> None:
    tick = controller.tick()
    assert tick.actions == ["hold ollama job 100"] and tick.errors == []
    ((args, script),) = slurm.submitted
    assert sbatch_options(args) == {
        "--job-name": "gpuarb-hold-ollama", "--partition": "shard", "--nodelist": "n2", "--qos": "llm",
        "--time": "UNLIMITED", "--no-requeue": "", "--ntasks": "1", "--output": "/dev/null", "--chdir": "/",
        "--comment": COMMENT}
    assert "--gres" not in args  # job_submit.lua sets the GRES from the comment (it refuses a job asking for both)
    assert script == HOLDER_SCRIPT and "exec sleep infinity" in script
    (row,) = ledger.decisions(plane="agent")
    assert (row.action, row.outcome, row.job_id, row.node, row.prio) == ("hold", "submitted", "100", "n2", "llm")
    assert "ollama up (llama3:8b loaded): holder job 100 submitted for 24 shards (12GiB) on n2 gpu0" in row.reason
    assert row.inputs["reservation"] == "ollama" and row.inputs["observed_mib"] == 11059


def test_kept_while_up(controller: Controller, slurm: FakeSlurm, clock: Clock, ledger: Ledger) -> None:
    up_and_held(controller, slurm, clock)
    for _ in range(3):
        clock.advance(15)
        assert controller.tick().actions == []
    assert len(slurm.submitted) == 1 and slurm.cancelled == []
    assert story(ledger) == [("hold", "submitted", "100")]


def test_a_pending_holder_is_kept_too(controller: Controller, slurm: FakeSlurm, clock: Clock) -> None:
    controller.tick()
    clock.advance(15)
    controller.tick()
    assert len(slurm.submitted) == 1


def test_down_keeps_the_holder_through_grace_then_cancels(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                         probe: Probe, ledger: Ledger) -> None:
    job = up_and_held(controller, slurm, clock)
    clock.advance(10)
    probe.status = Status("down", "connection refused")
    down_at = clock.now
    controller.tick()
    clock.advance(299)
    controller.tick()
    assert slurm.cancelled == []
    assert story(ledger) == [("hold", "submitted", job), ("service", "down", job)]
    row = ledger.decisions(plane="agent")[-1]
    assert "ollama down (connection refused): holder job 100 keeps its memory for the grace period (5m)" in row.reason
    assert row.inputs["down_since"] == down_at

    clock.advance(1)
    tick = controller.tick()
    assert tick.actions == [f"unhold ollama job {job}"]
    assert slurm.cancelled == [job]
    row = ledger.decisions(plane="agent")[-1]
    assert (row.action, row.outcome, row.job_id) == ("unhold", "cancelled", job)
    assert row.reason == ("ollama down for 5m (grace 5m): holder job 100 cancelled; 24 shards (12GiB) on n2 gpu0 "
                          "leasable to batch")
    clock.advance(60)
    controller.tick()
    assert slurm.cancelled == [job] and len(slurm.submitted) == 1  # nothing more while down


def test_a_short_outage_changes_nothing(controller: Controller, slurm: FakeSlurm, clock: Clock, probe: Probe,
                                        ledger: Ledger) -> None:
    up_and_held(controller, slurm, clock)
    probe.status = Status("down", "HTTP 500")
    controller.tick()
    clock.advance(120)
    probe.status = Status("up")
    controller.tick()
    clock.advance(600)
    controller.tick()
    assert slurm.cancelled == [] and len(slurm.submitted) == 1
    assert [a for a, _, _ in story(ledger)] == ["hold", "service"]


@pytest.mark.parametrize("state", ["degraded", "busy"])
def test_degraded_and_busy_are_up(controller: Controller, slurm: FakeSlurm, probe: Probe, state: str) -> None:
    probe.status = Status(state, "a model partly on the CPU")
    controller.tick()
    assert len(slurm.submitted) == 1


def test_resubmitted_when_the_service_returns(controller: Controller, slurm: FakeSlurm, clock: Clock, probe: Probe,
                                              ledger: Ledger) -> None:
    first = up_and_held(controller, slurm, clock)
    probe.status = Status("down", "connection refused")
    controller.tick()
    clock.advance(300)
    controller.tick()
    clock.advance(100)
    probe.status = Status("up", "llama3:8b loaded", 11059)
    tick = controller.tick()
    assert tick.actions == ["hold ollama job 101"]
    assert held(slurm) == ["101"] and slurm.get(first).state == "CANCELLED"
    assert story(ledger) == [("hold", "submitted", first), ("service", "down", first),
                             ("unhold", "cancelled", first), ("hold", "submitted", "101")]
    assert "back after 6m40s down" in ledger.decisions(plane="agent")[-1].reason


def test_probe_without_answer_changes_nothing(controller: Controller, slurm: FakeSlurm, clock: Clock, probe: Probe,
                                              ledger: Ledger) -> None:
    job = up_and_held(controller, slurm, clock)
    probe.status = None
    clock.advance(3600)
    controller.tick()
    assert slurm.cancelled == [] and held(slurm) == [job]
    assert len(ledger.decisions(plane="agent")) == 1


def test_a_restarted_agent_finds_the_running_holder(cfg: Config, ledger: Ledger, slurm: FakeSlurm, clock: Clock,
                                                    probe: Probe, controller: Controller) -> None:
    job = up_and_held(controller, slurm, clock)
    again = Controller(cfg, ledger=ledger, slurm=slurm, probe_fn=probe, clock=clock, uid=AGENT_UID)
    clock.advance(15)
    assert again.tick().actions == []
    assert len(slurm.submitted) == 1 and held(slurm) == [job]


def test_a_restart_while_down_keeps_the_original_grace(cfg: Config, ledger: Ledger, slurm: FakeSlurm, clock: Clock,
                                                       probe: Probe, controller: Controller) -> None:
    job = up_and_held(controller, slurm, clock)
    probe.status = Status("down", "connection refused")
    controller.tick()
    clock.advance(200)
    again = Controller(cfg, ledger=ledger, slurm=slurm, probe_fn=probe, clock=clock, uid=AGENT_UID)
    again.tick()
    assert slurm.cancelled == []
    assert [a for a, _, _ in story(ledger)] == ["hold", "service"]  # no second "down" row
    clock.advance(100)  # 300 s since the service went down, though only 100 s since this agent started
    again.tick()
    assert slurm.cancelled == [job]


def test_a_users_job_named_like_a_holder_is_not_one(controller: Controller, slurm: FakeSlurm) -> None:
    slurm.add(make_job("7", state="RUNNING", name="gpuarb-hold-ollama", comment=COMMENT, nodes=("n2",),
                       tres="gres:shard:24", uid=USER_UID))
    controller.tick()
    assert len(slurm.submitted) == 1
    assert slurm.cancelled == []  # not ours to cancel either


def test_a_duplicate_holder_is_cancelled(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                         ledger: Ledger) -> None:
    job = up_and_held(controller, slurm, clock)
    slurm.add(make_job("55", name="gpuarb-hold-ollama", comment=COMMENT, uid=AGENT_UID, reason="Resources"))
    tick = controller.tick()
    assert tick.actions == ["unhold ollama job 55"]
    assert slurm.cancelled == ["55"] and held(slurm) == [job]
    assert ledger.decisions(plane="agent")[-1].reason.startswith("duplicate holder job")


def test_size_is_max_of_declared_and_observed(controller: Controller, slurm: FakeSlurm, probe: Probe) -> None:
    probe.status = Status("up", "a bigger model", 14 * 1024 + 100)
    controller.tick()
    ((args, _),) = slurm.submitted
    assert args[-1] == "gpuarb-holder=ollama gpuarb/1: vram=14848MiB prio=llm shards=29"


def test_a_refused_submission_is_recorded_once(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                               ledger: Ledger) -> None:
    slurm.refuse = SlurmError("Slurm refused the job: 'sbatch: error: Invalid qos specification'")
    tick = controller.tick()
    assert tick.errors == [] and tick.actions == []
    clock.advance(15)
    controller.tick()
    assert len(slurm.submitted) == 2  # tried again
    (row,) = ledger.decisions(plane="agent")
    assert (row.action, row.outcome) == ("hold", "error")
    assert "Invalid qos specification" in row.reason


def test_a_holder_without_gres_is_reported(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                           ledger: Ledger) -> None:
    controller.tick()
    slurm.start("100", "n2", at=clock.now)  # job_submit.lua did not map its comment: no shards
    controller.tick()
    row = ledger.decisions(plane="agent")[-1]
    assert (row.action, row.outcome) == ("hold", "error")
    assert "holder job 100 holds no shards: job_submit.lua did not map its lease" in row.reason


def test_a_reservation_without_node_is_reported_once(cfg: Config, ledger: Ledger, slurm: FakeSlurm, clock: Clock,
                                                     probe: Probe) -> None:
    nowhere = dataclasses.replace(cfg.reservations[0], node=None)
    agent = Controller(dataclasses.replace(cfg, reservations=(nowhere,)), ledger=ledger, slurm=slurm, probe_fn=probe,
                       clock=clock, uid=AGENT_UID)
    agent.tick()
    clock.advance(15)
    agent.tick()
    assert slurm.submitted == []
    (row,) = ledger.decisions(plane="agent")
    assert "no node" in row.reason and "set node" in row.reason


def test_static_reservations_get_no_holder(cfg: Config, ledger: Ledger, slurm: FakeSlurm, probe: Probe) -> None:
    static = dataclasses.replace(cfg.reservations[0], mode="static")
    Controller(dataclasses.replace(cfg, reservations=(static,)), ledger=ledger, slurm=slurm, probe_fn=probe,
               uid=AGENT_UID).tick()
    assert slurm.submitted == [] and probe.calls == []


# --------------------------------------------------------------------------- plan_holder


def test_plan_prefers_a_partition_of_the_gpus_own_mode(cfg: Config) -> None:
    # partition llm comes first and admits llm, but hands out whole GPUs: the shard GPU is held in shards
    plan = plan_holder(cfg, submit_tables(cfg), cfg.reservations[0], 12 * 1024)
    assert (plan.partition, plan.cls, plan.qos, plan.shards, plan.size_mib) == ("shard", "llm", "llm", 24, 12288)


def test_plan_rounds_up_to_whole_shards(cfg: Config) -> None:
    plan = plan_holder(cfg, submit_tables(cfg), cfg.reservations[0], 11059)
    assert (plan.shards, plan.size_mib) == (22, 11264)
    assert plan.comment == "gpuarb-holder=ollama gpuarb/1: vram=11264MiB prio=llm shards=22"


def test_plan_settings_override(cfg: Config) -> None:
    plan = plan_holder(cfg, submit_tables(cfg), cfg.reservations[0], 4096, holder_class="llm",
                       holder_partition="llm", time_limit="7-00:00:00")
    assert (plan.partition, plan.shards) == ("llm", None)
    assert plan.comment == "gpuarb-holder=ollama gpuarb/1: vram=4096MiB prio=llm"
    assert "7-00:00:00" in plan.args


def test_plan_refuses_more_than_one_gpu_holds(cfg: Config) -> None:
    with pytest.raises(LeaseSpecError, match="more than one GPU"):
        plan_holder(cfg, submit_tables(cfg), cfg.reservations[0], 30 * 1024)


def test_plan_needs_a_non_preemptible_class(cfg: Config) -> None:
    classes = {n: dataclasses.replace(c, preemptible=True) for n, c in cfg.policy.classes.items()}
    every = dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, classes=classes))
    with pytest.raises(ConfigError, match="non-preemptible class"):
        plan_holder(every, submit_tables(cfg), cfg.reservations[0], 4096)


def test_plan_needs_a_partition_on_the_node(cfg: Config) -> None:
    res = Reservation("far", 4096, node="n3", mode="holder")
    no_llm = dataclasses.replace(cfg, partitions=tuple(p for p in cfg.partitions if p.name != "mig"))
    with pytest.raises(ConfigError, match="no partition holds node n3"):
        plan_holder(no_llm, submit_tables(cfg), res, 4096)


def test_holder_names() -> None:
    assert holder_job_name("ollama") == "gpuarb-hold-ollama"
    assert holder_of(COMMENT) == "ollama"
    assert holder_of("gpuarb/1: vram=1GiB") is None
    assert holder_of("gpuarb-holder=") is None
    assert holder_of(None) is None


def test_settings_from_the_config(cfg: Config) -> None:
    assert cfg.controller == ControllerConfig()
