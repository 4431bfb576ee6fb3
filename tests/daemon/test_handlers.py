"""The request handlers: job_start / job_end / health for the hooks, the host-plane ops, and who may do what."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from slurm_gpuarb import protocol
from slurm_gpuarb.config import Config
from slurm_gpuarb.daemon.handlers import Handlers, Peer
from slurm_gpuarb.model import GpuProcess, LeaseState, Probe
from slurm_gpuarb.telemetry import fake

from .conftest import ROOT, USER, FakeSlurm, answer, job, start_msg

H100_USABLE = 81559 - 512 - 1024  # total − driver reserve − 1GiB margin
MIG_1G = 9984


def grant_of(resp: dict[str, object]) -> protocol.Grant:
    return protocol.grant_from_json(resp["grant"])


# --------------------------------------------------------------------------- job_start: sizes by mode


def test_whole_gpu_job_gets_its_spec_on_the_gpu_slurm_gave(handlers: Handlers) -> None:
    resp = answer(handlers, start_msg(gres="3", comment="run 7 gpuarb: vram=6GiB prio=batch engine=vllm"))
    g = grant_of(resp)
    assert (resp["outcome"], g.vram_mib, g.gpus, g.refused) == ("grant", 6144, (3,), None)
    lease = handlers.ledger.get(g.lease_id or "")
    assert (lease.job_id, lease.restart_count, lease.node, lease.gpus, lease.owner_uid) == ("12", 0, "n1", (3,), 1000)
    assert lease.expires_at is None  # a job's lease lives as long as the job
    assert g.exports == {"GPUARB_VRAM_MB": "6144", "GPUARB_LEASE_ID": lease.id, "GPUARB_PRIO": "batch",
                         "GPUARB_VLLM_GPU_MEMORY_UTILIZATION": "0.0753",  # 6144 / 81559, rounded down
                         "GPUARB_VLLM_ARGS": "--gpu-memory-utilization 0.0753"}
    assert "CUDA_VISIBLE_DEVICES" not in g.exports  # Slurm's own value stands for whole GPUs
    row = handlers.ledger.decisions(job_id="12")[-1]
    assert (row.plane, row.outcome, row.lease_id) == ("prolog", "grant", lease.id)
    assert row.inputs["slurm"] == {"mode": "whole", "gpus": [3]}
    assert row.inputs["request"]["preempt"] is False


def test_job_start_logs_one_key_value_line(handlers: Handlers, log_file: Path) -> None:
    g = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=6GiB")))
    lines = [ln for ln in log_file.read_text().splitlines() if "op=job_start" in ln]
    assert len(lines) == 1
    assert f"arbiter: grant 6144MiB op=job_start job=12 node=n1 lease={g.lease_id} gpus=0 mode=whole" in lines[0]


def test_whole_gpu_job_without_a_spec_leases_the_whole_usable_gpu(handlers: Handlers) -> None:
    g = grant_of(answer(handlers, start_msg(gres="0,1", comment="no lease here")))
    assert (g.vram_mib, g.gpus, g.prio) == (H100_USABLE, (0, 1), "batch")
    assert set(g.exports) == {"GPUARB_VRAM_MB", "GPUARB_LEASE_ID", "GPUARB_PRIO"}


def test_a_spec_above_what_the_gpu_can_lease_is_capped_not_refused(handlers: Handlers) -> None:
    resp = answer(handlers, start_msg(comment="gpuarb: vram=100GiB"))
    assert grant_of(resp).vram_mib == H100_USABLE
    notes = handlers.ledger.decisions(job_id="12")[-1].inputs["slurm"]["notes"]
    assert "vram=102400MiB is more than GPU 0 can lease (80023MiB)" in notes[0]


@pytest.mark.parametrize(
    ("comment", "slurm_shards", "partition", "expected", "source"),
    [
        ("gpuarb/1: vram=6144MiB prio=batch shards=12", None, "shard", 12 * 512, "comment"),
        ("gpuarb: vram=3GiB", 8, "shard", 8 * 512, "slurm"),  # Slurm knows better than the spec
        ("gpuarb: vram=3000MiB", None, "shard", 6 * 512, "vram"),  # not in Slurm: rounded up to quanta
        (None, 4, None, 4 * 512, "slurm"),
    ],
)
def test_shard_job_lease_is_shards_times_quantum(handlers: Handlers, slurm: FakeSlurm, comment: str | None,
                                                 slurm_shards: int | None, partition: str | None, expected: int,
                                                 source: str) -> None:
    if slurm_shards is not None:
        slurm.add(job("12", "n2", shards=slurm_shards))
    resp = answer(handlers, start_msg(node="n2", comment=comment, partition=partition))
    g = grant_of(resp)
    assert (resp["outcome"], g.vram_mib, g.gpus) == ("grant", expected, (0,))
    context = handlers.ledger.decisions(job_id="12")[-1].inputs["slurm"]
    assert (context["mode"], context["shards"], context["shards_from"]) == ("shard", expected // 512, source)
    # Slurm gives shard jobs no CUDA_VISIBLE_DEVICES: the grant names the shards' GPU by UUID.
    assert g.exports["CUDA_VISIBLE_DEVICES"] == "GPU-fake-rtx3090ti-24g-0"
    if source == "comment":
        assert slurm.calls == []  # the canonical comment says it: Slurm is not asked


def test_whole_partition_on_a_shard_gpu_takes_the_gpu_whole(handlers: Handlers, slurm: FakeSlurm) -> None:
    slurm.add(job("12", "n2"))  # asked for gres:gpu:1, no shards
    g = grant_of(answer(handlers, start_msg(node="n2", partition="batch")))
    # 24564 total − 354 reserve − 1024 margin − the 12GiB ollama reservation
    assert g.vram_mib == 24564 - 354 - 1024 - 12 * 1024
    assert "CUDA_VISIBLE_DEVICES" not in g.exports  # a whole GPU: Slurm's own value stands


def test_shard_count_unknown_without_slurm_is_recorded_as_a_guess(cfg: Config) -> None:
    with Handlers(cfg) as h:  # the hooks' fallback: no Slurm adapter
        g = grant_of(answer(h, start_msg(node="n2", partition="shard")))
        assert g.vram_mib == 512
        assert h.ledger.decisions(job_id="12")[-1].inputs["slurm"]["shards_from"] == "guess"


def test_mig_job_gets_its_instance_and_its_uuid_exported(handlers: Handlers) -> None:
    resp = answer(handlers, start_msg(node="n3", gres="4", comment="gpuarb: vram=4GiB engine=torch"))
    g = grant_of(resp)
    uuid = "MIG-fake-h100-80g-mig-7x1g-0-4"
    assert (g.vram_mib, g.mig_uuid, g.gpus) == (MIG_1G, uuid, (0,))
    assert g.exports["CUDA_VISIBLE_DEVICES"] == uuid
    assert g.exports["GPUARB_TORCH_MEMORY_FRACTION"] == "1.0000"  # the whole instance is the job's
    assert handlers.ledger.get(g.lease_id or "").mig_uuid == uuid


def test_mig_instance_already_held_is_refused(handlers: Handlers, fake_state: Path) -> None:
    uuid = "MIG-fake-h100-80g-mig-7x1g-0-2"
    fake.add_process(fake_state, "n3", GpuProcess(pid=555, gpu_index=0, used_mib=900, name="stray", mig_uuid=uuid))
    g = grant_of(answer(handlers, start_msg(node="n3", gres="2")))
    assert g.lease_id is None and g.refused is not None
    assert "foreign pid 555" in g.refused


# --------------------------------------------------------------------------- job_start: refusals and edges


def test_memory_taken_in_live_telemetry_refuses_the_job_with_the_reason(handlers: Handlers, fake_state: Path) -> None:
    fake.add_process(fake_state, "n1", GpuProcess(pid=777, gpu_index=0, used_mib=78000, name="hog", uid=1001))
    resp = answer(handlers, start_msg(comment="gpuarb: vram=6GiB"))
    g = grant_of(resp)
    assert resp["outcome"] == "wait" and resp["lease"] is None
    assert g.lease_id is None and g.exports == {}
    assert g.refused is not None and g.refused.startswith("gpuarb: the job's GPU memory is not available on n1:")
    assert "foreign pid 777 (hog" in g.refused
    row = handlers.ledger.decisions(job_id="12")[-1]
    assert (row.outcome, row.lease_id) == ("wait", None)
    assert handlers.ledger.live("n1") == []


def test_bad_spec_refuses_the_job_with_the_parsers_message(handlers: Handlers) -> None:
    resp = answer(handlers, start_msg(comment="gpuarb: vrm=6GiB"))
    g = grant_of(resp)
    assert resp["ok"] and resp["lease"] is None and "outcome" not in resp
    assert g.refused is not None and "unknown key 'vrm'" in g.refused and "did you mean 'vram'" in g.refused
    row = handlers.ledger.decisions(job_id="12")[-1]
    assert (row.plane, row.action, row.outcome) == ("prolog", "request", "deny")
    assert "invalid lease spec" in row.reason and row.inputs["comment"] == "'gpuarb: vrm=6GiB'"


def test_unknown_class_is_a_bad_spec_too(handlers: Handlers) -> None:
    g = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=1GiB prio=urgent")))
    assert g.refused is not None and "unknown priority class 'urgent'" in g.refused


@pytest.mark.parametrize("gres", [None, "", "  "])
def test_cpu_job_needs_no_lease_and_writes_no_row(handlers: Handlers, gres: str | None) -> None:
    resp = answer(handlers, start_msg(node="n4", gres=gres, comment="gpuarb: vram=6GiB"))
    assert resp["lease"] is None and grant_of(resp) == protocol.Grant(job_id="12", restart_count=0, node="n4")
    assert handlers.ledger.decisions() == []


def test_replayed_job_start_returns_the_same_lease(handlers: Handlers) -> None:
    first = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=6GiB")))
    again = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=6GiB")))
    assert again == first
    assert len(handlers.ledger.leases(job_id="12")) == 1


def test_requeued_job_ends_its_earlier_runs_lease_first(handlers: Handlers) -> None:
    run0 = grant_of(answer(handlers, start_msg(gres="0")))  # the whole GPU: run 1 could not fit beside it
    run1 = grant_of(answer(handlers, start_msg(gres="0", restart_count=1)))
    assert run1.lease_id is not None and run1.lease_id != run0.lease_id and run1.refused is None
    old = handlers.ledger.get(run0.lease_id or "")
    assert old.state is LeaseState.EXPIRED and "requeued" in (old.end_reason or "")
    # a late Epilog of run 0 releases nothing of run 1
    assert answer(handlers, protocol.JobEndMsg(job_id="12", restart_count=0, node="n1"))["released"] == []
    assert handlers.ledger.get(run1.lease_id).state is LeaseState.GRANTED


def test_a_finished_jobs_lease_in_the_way_is_cleared_by_asking_slurm(handlers: Handlers, slurm: FakeSlurm,
                                                                      cfg: Config) -> None:
    stale = grant_of(answer(handlers, start_msg("7", gres="0"))).lease_id  # its Epilog never ran
    slurm.add(job("7", state="COMPLETED"), job("8"))
    with Handlers(cfg) as fallback:  # without Slurm: refused until the daemon's reconcile
        assert grant_of(answer(fallback, start_msg("8", gres="0"))).refused is not None
    g = grant_of(answer(handlers, start_msg("8", gres="0")))
    assert g.refused is None and g.vram_mib == H100_USABLE
    assert handlers.ledger.get(stale or "").state is LeaseState.EXPIRED
    assert slurm.calls == [("7",)]  # only the lease in the way was checked


def test_a_running_jobs_lease_in_the_way_still_refuses(handlers: Handlers, slurm: FakeSlurm) -> None:
    answer(handlers, start_msg("7", gres="0"))
    slurm.add(job("7"))
    g = grant_of(answer(handlers, start_msg("8", gres="0")))
    assert g.refused is not None and "lease" in g.refused


def test_a_gres_index_the_node_does_not_have_is_a_node_fault(handlers: Handlers) -> None:
    resp = answer(handlers, start_msg(gres="9"))
    assert resp["error"]["kind"] == "NodeFault"
    assert "GRES index 9 on node n1, but its gres.conf has 8 gpu lines" in resp["error"]["message"]


def test_a_malformed_slurm_job_gpus_is_a_protocol_error(handlers: Handlers) -> None:
    resp = answer(handlers, start_msg(gres="0,x"))
    assert resp["error"]["kind"] == "ProtocolError"


def test_slurm_down_falls_back_to_what_the_comment_says(handlers: Handlers, slurm: FakeSlurm) -> None:
    slurm.down = True
    g = grant_of(answer(handlers, start_msg(node="n2", comment="gpuarb: vram=2GiB", partition="shard")))
    assert g.vram_mib == 2048


# --------------------------------------------------------------------------- job_end, health


def test_job_end_releases_once_and_records_the_peak(handlers: Handlers) -> None:
    g = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=6GiB")))
    handlers.ledger.record_peaks({g.lease_id or "": 5000})
    end = protocol.JobEndMsg(job_id="12", restart_count=0, node="n1", exit_code=0)
    assert answer(handlers, end)["released"] == [g.lease_id]
    assert answer(handlers, end)["released"] == []
    rows = [r for r in handlers.ledger.decisions(job_id="12") if r.action == "release"]
    assert len(rows) == 1
    assert (rows[0].plane, rows[0].lease_id) == ("epilog", g.lease_id)
    assert "peak 5000MiB of 6144MiB granted" in rows[0].reason and "exit code 0" in rows[0].reason
    assert rows[0].inputs["peak_mib"] == {g.lease_id: 5000}


def test_requeued_jobs_first_epilog_arrives_as_run_1_and_releases_run_0(handlers: Handlers) -> None:
    # Slurm 22.05 (measured on the test cluster): `scontrol requeue` raises the restart count before the
    # first run's Epilog runs, so that Epilog says SLURM_JOB_RESTART_COUNT=1.
    run0 = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=6GiB")))
    released = answer(handlers, protocol.JobEndMsg(job_id="12", restart_count=1, node="n1"))["released"]
    assert released == [run0.lease_id]
    row = next(r for r in handlers.ledger.decisions(job_id="12") if r.action == "release")
    assert "requeued" in row.reason
    # run 1 then starts, and a replay of run 0's Epilog cannot touch its lease
    run1 = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=6GiB", restart_count=1)))
    assert answer(handlers, protocol.JobEndMsg(job_id="12", restart_count=0, node="n1"))["released"] == []
    assert handlers.ledger.get(run1.lease_id or "").state is LeaseState.GRANTED


def test_job_end_of_a_job_without_a_lease_is_fine(handlers: Handlers) -> None:
    assert answer(handlers, protocol.JobEndMsg(job_id="99", restart_count=0, node="n4"))["released"] == []


def test_health_names_foreign_processes_not_leases_or_reservations(handlers: Handlers, fake_state: Path) -> None:
    assert answer(handlers, protocol.HealthMsg(node="n2"))["foreign"] == []  # ollama is its reservation
    fake.add_process(fake_state, "n2", GpuProcess(pid=4343, gpu_index=0, used_mib=2048, name="python3", user="bob"))
    foreign = answer(handlers, protocol.HealthMsg(node="n2"))["foreign"]
    assert foreign == [{"pid": 4343, "gpu": 0, "mib": 2048, "name": foreign[0]["name"]}]
    assert "python3" in foreign[0]["name"]


def test_health_of_a_node_without_gpus_in_the_inventory_has_nothing_to_judge(handlers: Handlers,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def no_telemetry(node: str) -> None:
        raise AssertionError(f"telemetry of {node} was asked")

    monkeypatch.setattr(handlers, "arbitration", no_telemetry)
    assert answer(handlers, protocol.HealthMsg(node="cpu1"))["foreign"] == []


# --------------------------------------------------------------------------- host-plane ops and auth


def test_ping_status_and_explain(handlers: Handlers) -> None:
    assert answer(handlers, protocol.PingMsg(), USER)["version"]
    gpus = answer(handlers, protocol.StatusMsg(), USER)["gpus"]
    assert [(g["node"], g["index"]) for g in gpus][:2] == [("n1", 0), ("n1", 1)] and len(gpus) == 8 + 1 + 1
    g = grant_of(answer(handlers, start_msg(comment="gpuarb: vram=6GiB")))
    explained = answer(handlers, protocol.ExplainMsg(job_id="12"), USER)
    assert g.lease_id in explained["text"] and explained["records"][0]["lease_id"] == g.lease_id
    missing = answer(handlers, protocol.ExplainMsg(job_id="404"), USER)
    assert missing["error"]["kind"] == "NotFoundError"


@pytest.mark.parametrize("op", ["job_start", "job_end", "health"])
def test_only_root_may_send_hook_ops(handlers: Handlers, op: str) -> None:
    msgs: dict[str, protocol.Message] = {
        "job_start": start_msg(),
        "job_end": protocol.JobEndMsg(job_id="12", restart_count=0, node="n1"),
        "health": protocol.HealthMsg(node="n1"),
    }
    msg = msgs[op]
    resp = answer(handlers, msg, USER)
    assert resp["error"]["kind"] == "PermissionError" and "uid 1000 may not send" in resp["error"]["message"]
    assert handlers.ledger.decisions() == []


def test_users_may_not_create_leases_on_slurm_nodes(handlers: Handlers) -> None:
    resp = answer(handlers, protocol.LeaseRequestMsg(spec="vram=1GiB", node="n1"), USER)
    assert resp["error"]["kind"] == "PermissionError" and "Slurm node n1" in resp["error"]["message"]
    assert answer(handlers, protocol.LeaseRequestMsg(spec="vram=1GiB", node="n1"))["outcome"] == "grant"


def test_unprivileged_peers_may_only_name_known_nodes(handlers: Handlers) -> None:
    resp = answer(handlers, protocol.StatusMsg(node="elsewhere"), USER)
    assert resp["error"]["kind"] == "NotFoundError"


def test_host_plane_request_renew_release_by_their_owner(tmp_path: Path, cfg: Config) -> None:
    ws = Config(**{**cfg.__dict__, "partitions": (), "node": "n1"})  # no partitions: a host-plane node
    with Handlers(ws) as h:
        got = answer(h, protocol.LeaseRequestMsg(spec="gpuarb: vram=2GiB prio=llm ttl=1h", node="n1"), USER)
        assert got["outcome"] == "grant" and got["lease"]["owner_uid"] == 1000
        lease_id = got["lease"]["id"]
        other = Peer(uid=1001, gid=1001, pid=9)
        assert answer(h, protocol.RenewMsg(lease_id=lease_id), other)["error"]["kind"] == "PermissionError"
        renewed = answer(h, protocol.RenewMsg(lease_id=lease_id, ttl_s=600), USER)["lease"]
        assert renewed["expires_at"] < got["lease"]["expires_at"]  # 10 min from now, not 1 h from then
        assert [r.action for r in h.ledger.decisions(lease_id=lease_id)] == ["request", "renew"]
        assert answer(h, protocol.ReleaseMsg(lease_id=lease_id), other)["error"]["kind"] == "PermissionError"
        done = answer(h, protocol.ReleaseMsg(lease_id=lease_id), USER)
        assert done["released"] is True and done["lease"]["state"] == "released"
        again = answer(h, protocol.ReleaseMsg(lease_id=lease_id), USER)
        assert again["released"] is False
        gone = answer(h, protocol.RenewMsg(lease_id=lease_id), USER)
        assert gone["error"]["kind"] == "NotFoundError" and "no longer live" in gone["error"]["message"]


def test_release_by_job_key_checks_every_lease_belongs_to_the_peer(handlers: Handlers) -> None:
    answer(handlers, start_msg(uid=1001))
    key = protocol.ReleaseMsg(job_id="12", restart_count=0, node="n1")
    assert answer(handlers, key, USER)["error"]["kind"] == "PermissionError"
    assert answer(handlers, key, Peer(uid=1001, gid=1001, pid=5))["released"] is True


def test_a_bug_becomes_a_generic_internal_error(handlers: Handlers, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise ValueError("secret detail")

    monkeypatch.setattr(handlers, "_status", boom)
    handlers._ops["status"] = boom  # type: ignore[assignment]
    resp = handlers.handle(protocol.StatusMsg(), ROOT)
    assert resp["error"] == {"kind": "InternalError", "message": protocol.INTERNAL_ERROR_MESSAGE}


# --------------------------------------------------------------------------- job_start: holder jobs

HOLDER_COMMENT = "gpuarb-holder=ollama gpuarb/1: vram=12288MiB prio=llm shards=24"  # what the controller submits
N2_USABLE = 24564 - 354 - 1024  # the 3090 Ti: total − driver reserve − margin


@pytest.fixture
def holder_cfg(cfg: Config) -> Config:
    """The test inventory with n2's Ollama (11059MiB in the fake preset) in holder mode."""
    res = tuple(replace(r, mode="holder", probe=Probe(kind="ollama", url="http://127.0.0.1:11434"))
                if r.name == "ollama" else r for r in cfg.reservations)
    assert any(r.mode == "holder" for r in res)
    return replace(cfg, reservations=res)


@pytest.fixture
def holder_handlers(holder_cfg: Config, slurm: FakeSlurm) -> Iterator[Handlers]:
    with Handlers(holder_cfg, slurm=slurm, nodes=("n2",)) as h:
        yield h


def n2_tenants(h: Handlers) -> dict[str, tuple[str, int, int, str | None]]:
    """n2's tenants now: id → (kind, size, observed, the holder-mode reservation it accounts for)."""
    (state,) = h.arbitration("n2").snapshot().states
    return {t.id: (t.kind.value, t.size_mib, t.observed_mib, t.reservation) for t in state.tenants}


def test_holder_job_from_root_records_holds_and_is_counted_once(holder_handlers: Handlers, slurm: FakeSlurm) -> None:
    h = holder_handlers
    slurm.add(job("42", "n2", shards=24), job("43", "n2", shards=21))  # both run on: their leases stay live
    # Unheld, the Ollama counts only what it uses: 11059 of its 12GiB.
    assert n2_tenants(h) == {"ollama": ("reservation", 0, 11059, "ollama")}
    resp = answer(h, start_msg("42", node="n2", comment=HOLDER_COMMENT, uid=0, partition="shard"))
    g = grant_of(resp)
    # 11059 (Ollama) + 12288 (its holder) would not fit in 23186: granted only because it is counted once.
    assert (resp["outcome"], g.vram_mib, g.refused) == ("grant", 12288, None)
    lease = h.ledger.get(g.lease_id or "")
    assert (lease.holds, lease.job_id, lease.prio, lease.preemptible) == ("ollama", "42", "llm", False)
    assert h.ledger.decisions(job_id="42")[-1].inputs["holds"] == "ollama"
    assert n2_tenants(h) == {lease.id: ("lease", 12288, 11059, "ollama")}  # the reservation has no tenant of its own
    # What is left is leasable to batch: usable − the holder's 12GiB (21 shards), not − 12GiB twice, and no more.
    fits = grant_of(answer(h, start_msg("43", node="n2", comment="gpuarb/1: vram=10752MiB shards=21")))
    assert (fits.vram_mib, fits.refused) == (10752, None) and N2_USABLE - 12288 - 10752 < 512
    refused = grant_of(answer(h, start_msg("46", node="n2", comment="gpuarb/1: vram=512MiB shards=1"))).refused
    assert refused is not None and "146MiB free" in refused
    # Cancelled (its Epilog releases the lease): the reservation counts only its processes again.
    answer(h, protocol.JobEndMsg(job_id="42", restart_count=0, node="n2"))
    assert n2_tenants(h)["ollama"] == ("reservation", 0, 11059, "ollama")


def test_holder_comment_from_a_user_is_an_ordinary_lease_with_a_warning(holder_handlers: Handlers,
                                                                        log_file: Path) -> None:
    h = holder_handlers
    comment = "gpuarb-holder=ollama gpuarb/1: vram=4096MiB prio=batch shards=8"
    g = grant_of(answer(h, start_msg("44", node="n2", comment=comment, uid=1000, partition="shard")))
    assert (g.vram_mib, g.refused) == (4096, None)  # never a refusal for the prefix itself
    assert h.ledger.get(g.lease_id or "").holds is None
    assert n2_tenants(h)["ollama"] == ("reservation", 0, 11059, "ollama")  # the Ollama stays its own tenant
    [line] = [ln for ln in log_file.read_text().splitlines() if "holder comment" in ln]
    assert "unprivileged job" in line and "job=44" in line and "uid=1000" in line and "reservation=ollama" in line


@pytest.mark.parametrize("comment", [
    "gpuarb-holder=ollama gpuarb/1: vram=4096MiB prio=llm shards=8",  # ollama is static in this inventory
    "gpuarb-holder=vllm gpuarb/1: vram=4096MiB prio=llm shards=8",  # no such reservation
])
def test_a_root_holder_comment_naming_no_holder_reservation_here_is_ordinary(handlers: Handlers, log_file: Path,
                                                                             comment: str) -> None:
    g = grant_of(answer(handlers, start_msg("45", node="n2", comment=comment, uid=0, partition="shard")))
    assert g.refused is None and handlers.ledger.get(g.lease_id or "").holds is None
    assert any("no holder-mode reservation" in ln and "job=45" in ln for ln in log_file.read_text().splitlines())
