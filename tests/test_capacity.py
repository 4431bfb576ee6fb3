"""Attribution of GPU processes and the per-GPU states built from telemetry, reservations and leases."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slurm_gpuarb.capacity import (
    UNHELD_LABEL,
    LinuxProcReader,
    ProcInfo,
    build_gpu_states,
    describe_state,
    job_id_from_cgroup,
    matcher_matches,
    no_proc_reader,
)
from slurm_gpuarb.model import GpuInfo, GpuProcess, Lease, LeaseState, Matcher, Probe, Reservation, TenantKind

GIB = 1024
NODE = "n1"


def gpu(index: int = 0, total: int = 24564, reserved: int = 354) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="NVIDIA GeForce RTX 3090 Ti",
        total_mib=total,
        reserved_mib=reserved,
        used_mib=0,
        sku="rtx3090ti-24g",
    )


def lease(
    lid: str,
    vram: int,
    *,
    gpus: tuple[int, ...] = (0,),
    job: str | None = None,
    pid: int | None = None,
    node: str = NODE,
    state: LeaseState = LeaseState.GRANTED,
    mig_uuid: str | None = None,
    holds: str | None = None,
) -> Lease:
    return Lease(
        id=lid,
        node=node,
        gpus=gpus,
        vram_mib=vram,
        prio="batch",
        priority=10,
        preemptible=True,
        state=state,
        created_at=0.0,
        job_id=job,
        pid=pid,
        mig_uuid=mig_uuid,
        holds=holds,
    )


def proc(
    pid: int,
    used: int,
    *,
    gpu_index: int = 0,
    name: str = "python",
    user: str | None = "alice",
    uid: int | None = 1000,
    job: str | None = None,
    mig_uuid: str | None = None,
) -> GpuProcess:
    return GpuProcess(
        pid=pid, gpu_index=gpu_index, used_mib=used, name=name, uid=uid, user=user, job_id=job, mig_uuid=mig_uuid
    )


class FakeProcReader:
    """A /proc stand-in that records which PIDs were looked up."""

    def __init__(self, infos: dict[int, ProcInfo] | None = None) -> None:
        self.infos = infos or {}
        self.calls: list[int] = []

    def __call__(self, pid: int) -> ProcInfo | None:
        self.calls.append(pid)
        return self.infos.get(pid)


OLLAMA = Reservation(name="ollama", size_mib=12 * GIB, gpu=0, match=Matcher(process="ollama"))
# The same Ollama held by the controller's holder job while it is up (mode = "holder").
HELD_OLLAMA = Reservation(name="ollama", size_mib=12 * GIB, gpu=0, node=NODE, match=Matcher(process="ollama"),
                          mode="holder", probe=Probe(kind="ollama", url="http://127.0.0.1:11434"))


# --------------------------------------------------------------------------- cgroup


@pytest.mark.parametrize(
    ("text", "job"),
    [
        ("4:devices:/slurm/uid_1000/job_12/step_0/task_0\n", "12"),
        ("12:memory:/slurm/uid_0/job_4711/step_batch/task_0\n3:cpuset:/slurm/uid_0/job_4711/step_batch\n", "4711"),
        ("4:devices:/slurm_n1/uid_0/job_12/step_extern/task_0\n", "12"),  # --enable-multiple-slurmd
        ("0::/system.slice/slurmstepd.scope/job_12/step_batch/user/task_0\n", "12"),
        ("0::/system.slice/n1_slurmstepd.scope/job_99/step_0/user/task_0\n", "99"),
        ("0::/system.slice/slurmstepd.scope/job_12\n", "12"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", None),
        ("0::/system.slice/ollama.service\n", None),
        ("0::/docker/abc/job_3/worker\n", None),  # job_N outside Slurm is not a Slurm job
        ("0::/system.slice/slurmstepd.scope/job_x12/step_0\n", None),
        ("0::/system.slice/slurmstepd.scope/system\n", None),  # slurmstepd itself, no job
        ("", None),
        ("garbage without colons\n", None),
    ],
)
def test_job_id_from_cgroup(text: str, job: str | None) -> None:
    assert job_id_from_cgroup(text) == job


# --------------------------------------------------------------------------- /proc reader


def fake_proc(root: Path, pid: int, *, comm: str, uid: int, cgroup: str | None) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "comm").write_text(comm + "\n")
    (d / "status").write_text(f"Name:\t{comm}\nUmask:\t0022\nUid:\t{uid}\t0\t0\t0\nGid:\t0\t0\t0\t0\n")
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)


def test_linux_proc_reader_reads_name_uid_and_job(tmp_path: Path) -> None:
    fake_proc(
        tmp_path, 42, comm="python3", uid=0, cgroup="0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n"
    )
    info = LinuxProcReader(tmp_path)(42)
    assert info == ProcInfo(pid=42, name="python3", uid=0, user="root", job_id="7")


def test_linux_proc_reader_survives_vanished_and_partial_processes(tmp_path: Path) -> None:
    reader = LinuxProcReader(tmp_path)
    assert reader(12345) is None  # gone
    fake_proc(tmp_path, 43, comm="ollama", uid=4242424, cgroup=None)
    info = reader(43)
    assert info is not None
    assert (info.name, info.uid, info.user, info.job_id) == ("ollama", 4242424, None, None)


def test_linux_proc_reader_on_this_process() -> None:
    info = LinuxProcReader()(os.getpid())
    assert info is not None and info.uid == os.getuid() and info.name


# --------------------------------------------------------------------------- matcher


def test_matcher_by_process_name() -> None:
    m = Matcher(process="ollama")
    assert matcher_matches(m, proc(1, 100, name="ollama"), no_proc_reader)
    assert matcher_matches(m, proc(1, 100, name="/usr/local/bin/ollama"), no_proc_reader)  # NVML gives paths
    assert not matcher_matches(m, proc(1, 100, name="ollama-helper"), no_proc_reader)
    assert not matcher_matches(m, proc(1, 100, name="python"), no_proc_reader)


def test_matcher_tolerates_comm_truncation() -> None:
    m = Matcher(process="text-generation-launcher")
    assert matcher_matches(m, proc(1, 100, name="text-generation"), no_proc_reader)
    assert not matcher_matches(m, proc(1, 100, name="text-gen"), no_proc_reader)


def test_matcher_all_set_fields_must_match() -> None:
    m = Matcher(process="ollama", user="ollama")
    assert matcher_matches(m, proc(1, 100, name="ollama", user="ollama"), no_proc_reader)
    assert not matcher_matches(m, proc(1, 100, name="ollama", user="alice"), no_proc_reader)
    assert not matcher_matches(m, proc(1, 100, name="python", user="ollama"), no_proc_reader)
    assert matcher_matches(Matcher(user="997"), proc(1, 100, user=None, uid=997), no_proc_reader)


def test_empty_matcher_matches_nothing() -> None:
    assert not matcher_matches(Matcher(), proc(1, 100), no_proc_reader)


@pytest.mark.parametrize(
    ("content", "matches"),
    [
        (b"4242\n", True),
        (b"  4242  \n", True),
        (b"4243\n", False),
        (b"", False),
        (b"not-a-pid\n", False),
        (b"-4242\n", False),
        (b"\xff\xfe", False),
    ],
)
def test_pidfile_matcher(tmp_path: Path, content: bytes, matches: bool) -> None:
    pidfile = tmp_path / "svc.pid"
    pidfile.write_bytes(content)
    assert matcher_matches(Matcher(pidfile=str(pidfile)), proc(4242, 100), no_proc_reader) is matches


def test_missing_pidfile_matches_nothing(tmp_path: Path) -> None:
    assert not matcher_matches(Matcher(pidfile=str(tmp_path / "nope.pid")), proc(4242, 100), no_proc_reader)
    assert not matcher_matches(Matcher(pidfile=str(tmp_path)), proc(4242, 100), no_proc_reader)  # a directory


def test_matcher_falls_back_to_proc_reader_for_missing_fields() -> None:
    reader = FakeProcReader({7: ProcInfo(pid=7, name="ollama", uid=997, user="ollama")})
    rec = GpuProcess(pid=7, gpu_index=0, used_mib=100)  # what NVML knows: no name, no user
    assert matcher_matches(Matcher(process="ollama", user="ollama"), rec, reader)
    assert reader.calls == [7]


# --------------------------------------------------------------------------- GPU states


def test_rtx3090ti_story_reservation_and_its_process_count_once() -> None:
    """24 GiB card, Ollama reserved at 12 GiB using 10.8 GiB, 1 GiB margin: held once, as 12 GiB."""
    (state,) = build_gpu_states(
        NODE, [gpu()], [proc(900, 11059, name="ollama", user="ollama")], [OLLAMA], [], GIB, proc_reader=no_proc_reader
    )
    (tenant,) = state.tenants
    assert tenant.kind is TenantKind.RESERVATION and tenant.id == "ollama"
    assert (tenant.size_mib, tenant.observed_mib, tenant.held_mib, tenant.pids) == (12288, 11059, 12288, (900,))
    assert state.usable_mib == 24564 - 354 - 1024
    assert state.held_mib == 12288
    assert state.free_mib == 24564 - 354 - 1024 - 12288  # 10898: two 4.5 GiB workers, not three 8 GiB

    workers = [lease("w1", 4608, job="21"), lease("w2", 4608, job="22")]
    procs = [proc(900, 11059, name="ollama", user="ollama"), proc(1001, 4000, job="21"), proc(1002, 4700, job="22")]
    (state,) = build_gpu_states(NODE, [gpu()], procs, [OLLAMA], workers, GIB, proc_reader=no_proc_reader)
    held = {t.id: t.held_mib for t in state.tenants}
    assert held == {"w1": 4608, "w2": 4700, "ollama": 12288}  # w2 overran its lease: observed wins
    assert state.free_mib == 10898 - 4608 - 4700


def test_reservation_observed_above_its_size_holds_the_observed() -> None:
    (state,) = build_gpu_states(
        NODE, [gpu()], [proc(900, 13000, name="ollama")], [OLLAMA], [], GIB, proc_reader=no_proc_reader
    )
    assert state.held_mib == 13000


def test_idle_reservation_still_holds_its_size() -> None:
    (state,) = build_gpu_states(NODE, [gpu()], [], [OLLAMA], [], GIB, proc_reader=no_proc_reader)
    assert state.tenants[0].observed_mib == 0 and state.held_mib == 12288


def test_foreign_processes_are_tenants_of_their_own() -> None:
    procs = [proc(31, 2048, name="/usr/bin/python3", user="bob"), proc(30, 512, name="Xorg", user="root", uid=0)]
    (state,) = build_gpu_states(NODE, [gpu()], procs, [OLLAMA], [], GIB, proc_reader=no_proc_reader)
    foreign = [t for t in state.tenants if t.kind is TenantKind.FOREIGN]
    assert [(t.id, t.size_mib, t.held_mib) for t in foreign] == [("pid:30", 0, 512), ("pid:31", 0, 2048)]
    assert "python3" in foreign[1].label and "bob" in foreign[1].label
    assert state.held_mib == 12288 + 512 + 2048


def test_slurm_lease_observes_its_jobs_processes_via_proc_reader() -> None:
    reader = FakeProcReader(
        {
            501: ProcInfo(pid=501, name="python", uid=1000, user="alice", job_id="12"),
            502: ProcInfo(pid=502, name="python", uid=1000, user="alice", job_id="12"),
            503: ProcInfo(pid=503, name="python", uid=1000, user="alice", job_id=None),
        }
    )
    procs = [GpuProcess(pid=p, gpu_index=0, used_mib=1000) for p in (501, 502, 503)]
    (state,) = build_gpu_states(NODE, [gpu()], procs, [], [lease("L12", 6144, job="12")], GIB, proc_reader=reader)
    lease_t, foreign_t = state.tenants
    assert (lease_t.id, lease_t.observed_mib, lease_t.pids, lease_t.prio) == ("L12", 2000, (501, 502), "batch")
    assert lease_t.preemptible and lease_t.priority == 10 and lease_t.label == "job=12"
    assert foreign_t.id == "pid:503"
    assert sorted(reader.calls) == [501, 502, 503]  # once per PID, though name, user and job were all needed


def test_host_plane_lease_observes_its_pid() -> None:
    procs = [proc(777, 3000), proc(778, 1000)]
    (state,) = build_gpu_states(NODE, [gpu()], procs, [], [lease("H1", 2048, pid=777)], GIB, proc_reader=no_proc_reader)
    assert [(t.id, t.observed_mib, t.held_mib) for t in state.tenants] == [("H1", 3000, 3000), ("pid:778", 1000, 1000)]


def test_lease_spanning_gpus_is_a_tenant_on_each() -> None:
    procs = [proc(1, 5000, gpu_index=0, job="5"), proc(2, 7000, gpu_index=1, job="5")]
    states = build_gpu_states(
        NODE,
        [gpu(0), gpu(1), gpu(2)],
        procs,
        [],
        [lease("L5", 6144, gpus=(0, 1), job="5")],
        GIB,
        proc_reader=no_proc_reader,
    )
    assert [[(t.id, t.observed_mib) for t in s.tenants] for s in states] == [[("L5", 5000)], [("L5", 7000)], []]
    assert [s.held_mib for s in states] == [6144, 7000, 0]


def test_a_jobs_process_on_a_gpu_outside_its_lease_is_foreign() -> None:
    procs = [proc(1, 5000, gpu_index=1, job="5")]
    states = build_gpu_states(
        NODE, [gpu(0), gpu(1)], procs, [], [lease("L5", 6144, gpus=(0,), job="5")], GIB, proc_reader=no_proc_reader
    )
    assert states[1].tenants[0].id == "pid:1" and "job=5" in states[1].tenants[0].label


def test_only_granted_leases_of_this_node_count() -> None:
    leases = [
        lease("live", 1000),
        lease("done", 1000, state=LeaseState.RELEASED),
        lease("expired", 1000, state=LeaseState.EXPIRED),
        lease("revoked", 1000, state=LeaseState.REVOKED),
        lease("elsewhere", 1000, node="n2"),
        lease("no-such-gpu", 1000, gpus=(7,)),
        lease("live", 1000),  # the same lease twice is one tenant
    ]
    (state,) = build_gpu_states(NODE, [gpu()], [], [], leases, GIB, proc_reader=no_proc_reader)
    assert [t.id for t in state.tenants] == ["live"]


def test_lease_wins_over_reservation_and_a_process_counts_once() -> None:
    procs = [proc(900, 11059, name="ollama", job="40")]  # an Ollama started inside Slurm job 40
    (state,) = build_gpu_states(
        NODE, [gpu()], procs, [OLLAMA], [lease("L40", 12 * GIB, job="40")], GIB, proc_reader=no_proc_reader
    )
    observed = {t.id: t.observed_mib for t in state.tenants}
    assert observed == {"L40": 11059, "ollama": 0}


def test_reservations_apply_by_node_and_gpu() -> None:
    reservations = [
        Reservation(name="any-node", size_mib=100, gpu=0),
        Reservation(name="this-node", size_mib=200, gpu=0, node=NODE),
        Reservation(name="other-node", size_mib=400, gpu=0, node="n2"),
        Reservation(name="gpu1", size_mib=800, gpu=1),
        Reservation(name="gpu9", size_mib=1600, gpu=9),
    ]
    states = build_gpu_states(NODE, [gpu(0), gpu(1)], [], reservations, [], GIB, proc_reader=no_proc_reader)
    assert [[t.id for t in s.tenants] for s in states] == [["any-node", "this-node"], ["gpu1"]]
    assert states[0].tenants[0].label == "fixed size"


def test_first_matching_reservation_takes_the_process() -> None:
    reservations = [
        Reservation(name="a", size_mib=100, gpu=0, match=Matcher(user="svc")),
        Reservation(name="b", size_mib=100, gpu=0, match=Matcher(user="svc")),
    ]
    (state,) = build_gpu_states(
        NODE, [gpu()], [proc(5, 700, user="svc")], reservations, [], GIB, proc_reader=no_proc_reader
    )
    assert [(t.id, t.observed_mib) for t in state.tenants] == [("a", 700), ("b", 0)]


def test_pidfile_reservation(tmp_path: Path) -> None:
    pidfile = tmp_path / "vllm.pid"
    pidfile.write_text("4321\n")
    res = Reservation(name="vllm", size_mib=8 * GIB, gpu=0, match=Matcher(pidfile=str(pidfile)))
    broken = Reservation(name="broken", size_mib=GIB, gpu=0, match=Matcher(pidfile=str(tmp_path / "missing.pid")))
    procs = [proc(4321, 9000, name="python3"), proc(4322, 100)]
    (state,) = build_gpu_states(NODE, [gpu()], procs, [broken, res], [], GIB, proc_reader=no_proc_reader)
    assert {t.id: t.held_mib for t in state.tenants} == {"broken": GIB, "vllm": 9000, "pid:4322": 100}


def test_duplicate_process_records_count_once() -> None:
    procs = [proc(8, 3000), proc(8, 3000), proc(8, 2500)]
    (state,) = build_gpu_states(NODE, [gpu()], procs, [], [], GIB, proc_reader=no_proc_reader)
    assert state.held_mib == 3000


def test_telemetry_fields_spare_the_proc_reader() -> None:
    reader = FakeProcReader()
    procs = [proc(1, 100, name="ollama", job=None), proc(2, 100, job="12"), proc(3, 100, job="13")]
    build_gpu_states(NODE, [gpu()], procs, [OLLAMA], [lease("L12", 1000, job="12")], GIB, proc_reader=reader)
    # 2 and 3 carry their jobs and 3 its name and user; only 1, whose job telemetry left
    # unknown, has to be looked up (there are Slurm leases it might belong to).
    assert reader.calls == [1]


def test_mig_uuids_are_carried() -> None:
    mig_gpu = GpuInfo(
        index=0,
        uuid="GPU-0",
        name="NVIDIA H100 80GB HBM3",
        total_mib=81559,
        reserved_mib=512,
        used_mib=0,
        sku="h100-80g",
        mig_enabled=True,
    )
    procs = [proc(1, 5000, job="5", mig_uuid="MIG-a"), proc(2, 300, mig_uuid="MIG-b")]
    (state,) = build_gpu_states(
        NODE, [mig_gpu], procs, [], [lease("L5", 9984, job="5", mig_uuid="MIG-a")], GIB, proc_reader=no_proc_reader
    )
    assert [(t.id, t.mig_uuid) for t in state.tenants] == [("L5", "MIG-a"), ("pid:2", "MIG-b")]


def test_describe_state_is_json_and_complete() -> None:
    procs = [proc(900, 11059, name="ollama"), proc(1001, 4000, job="21"), proc(31, 2048)]
    (state,) = build_gpu_states(
        NODE, [gpu()], procs, [OLLAMA], [lease("w1", 4608, job="21")], GIB, proc_reader=no_proc_reader
    )
    snapshot = json.loads(json.dumps(describe_state(state)))
    assert {k: snapshot[k] for k in ("node", "index", "uuid", "total_mib", "reserved_mib", "margin_mib")} == {
        "node": NODE,
        "index": 0,
        "uuid": "GPU-0",
        "total_mib": 24564,
        "reserved_mib": 354,
        "margin_mib": 1024,
    }
    assert (snapshot["usable_mib"], snapshot["held_mib"], snapshot["free_mib"]) == (
        state.usable_mib,
        4608 + 12288 + 2048,
        state.usable_mib - 4608 - 12288 - 2048,
    )
    kinds = [(t["kind"], t["id"], t["size_mib"], t["observed_mib"], t["held_mib"]) for t in snapshot["tenants"]]
    assert kinds == [
        ("lease", "w1", 4608, 4000, 4608),
        ("reservation", "ollama", 12288, 11059, 12288),
        ("foreign", "pid:31", 0, 2048, 2048),
    ]
    assert snapshot["tenants"][0]["pids"] == [1001] and snapshot["tenants"][0]["prio"] == "batch"


def test_ten_thousand_leases_on_one_node() -> None:
    """The benchmark shape: every lease a Slurm job with one process, spread over 8 GPUs."""
    n = 10_000
    gpus = [gpu(i, total=81559, reserved=512) for i in range(8)]
    leases = [lease(f"L{i}", 8, gpus=(i % 8,), job=str(i)) for i in range(n)]
    procs = [proc(100_000 + i, 6 + i % 5, gpu_index=i % 8, job=str(i)) for i in range(n)]
    reader = FakeProcReader()
    states = build_gpu_states(NODE, gpus, procs, [OLLAMA], leases, GIB, proc_reader=reader)
    assert sum(len(s.tenants) for s in states) == n + 1
    assert all(t.kind is not TenantKind.FOREIGN for s in states for t in s.tenants)
    assert states[0].held_mib == 12288 + sum(max(8, 6 + i % 5) for i in range(0, n, 8))
    assert reader.calls == []


def test_memory_used_by_no_visible_process_is_held_as_unattributed() -> None:
    from slurm_gpuarb.capacity import UNATTRIBUTED, build_gpu_states, no_proc_reader
    from slurm_gpuarb.model import GpuInfo, GpuProcess

    gpu = GpuInfo(index=0, uuid="GPU-x", name="X", total_mib=24564, reserved_mib=354, used_mib=11059 + 6000)
    proc = GpuProcess(pid=7, gpu_index=0, used_mib=11059, name="python3")
    (state,) = build_gpu_states("n1", [gpu], [proc], [], [], 1024, proc_reader=no_proc_reader)
    hidden = [t for t in state.tenants if t.id == UNATTRIBUTED]
    assert len(hidden) == 1 and hidden[0].observed_mib == 6000 and hidden[0].pids == ()
    assert state.free_mib == 24564 - 354 - 1024 - 11059 - 6000
    # within the slack: rounding, not a tenant
    small = GpuInfo(index=0, uuid="GPU-x", name="X", total_mib=24564, reserved_mib=354, used_mib=11059 + 40)
    (state,) = build_gpu_states("n1", [small], [proc], [], [], 1024, proc_reader=no_proc_reader)
    assert all(t.id != UNATTRIBUTED for t in state.tenants)


# --------------------------------------------------------------------------- holder-mode reservations


def holder_lease(lid: str = "LH", vram: int = 12 * GIB, *, gpus: tuple[int, ...] = (0,), job: str = "42",
                 holds: str | None = "ollama") -> Lease:
    """The lease of the controller's holder job, as the daemon records it (llm, not preemptible)."""
    return Lease(id=lid, node=NODE, gpus=gpus, vram_mib=vram, prio="llm", priority=1000, preemptible=False,
                 state=LeaseState.GRANTED, created_at=0.0, job_id=job, holds=holds)


OLLAMA_PROC = proc(900, 11059, name="ollama", user="ollama", uid=999)


def test_holder_reservation_held_by_its_lease_counts_once_inside_that_lease() -> None:
    leases = [holder_lease(), lease("w1", 4608, job="21")]
    procs = [OLLAMA_PROC, proc(1001, 4000, job="21")]
    (state,) = build_gpu_states(NODE, [gpu()], procs, [HELD_OLLAMA], leases, GIB, proc_reader=no_proc_reader)
    assert [(t.kind, t.id) for t in state.tenants] == [(TenantKind.LEASE, "LH"), (TenantKind.LEASE, "w1")]
    held = state.tenants[0]
    assert (held.size_mib, held.observed_mib, held.held_mib, held.pids) == (12288, 11059, 12288, (900,))
    assert (held.reservation, held.label) == ("ollama", "job=42 holds=ollama")
    assert state.tenants[1].reservation is None
    assert state.held_mib == 12288 + 4608  # not 12288 twice: the holder's lease *is* the reservation
    snap = describe_state(state)
    assert [t.get("reservation") for t in snap["tenants"]] == ["ollama", None]
    assert "reservation" not in snap["tenants"][1]


def test_a_held_reservation_that_outgrew_its_holder_counts_what_it_uses() -> None:
    (state,) = build_gpu_states(NODE, [gpu()], [proc(900, 13000, name="ollama")], [HELD_OLLAMA], [holder_lease()],
                                GIB, proc_reader=no_proc_reader)
    assert state.held_mib == 13000


def test_holder_reservation_without_a_holder_counts_only_what_its_processes_use() -> None:
    (state,) = build_gpu_states(NODE, [gpu()], [OLLAMA_PROC], [HELD_OLLAMA], [lease("w1", 4608, job="21")], GIB,
                                proc_reader=no_proc_reader)
    res = next(t for t in state.tenants if t.kind is TenantKind.RESERVATION)
    assert (res.id, res.size_mib, res.observed_mib, res.held_mib, res.pids) == ("ollama", 0, 11059, 11059, (900,))
    assert res.reservation == "ollama"
    assert res.label == f"{UNHELD_LABEL}: process=ollama"
    assert state.free_mib == state.usable_mib - 11059 - 4608
    # Ollama down (its holder cancelled after the grace period): all of its declared size is leasable.
    (idle,) = build_gpu_states(NODE, [gpu()], [], [HELD_OLLAMA], [], GIB, proc_reader=no_proc_reader)
    assert idle.held_mib == 0 and idle.free_mib == idle.usable_mib
    assert describe_state(idle)["tenants"][0]["reservation"] == "ollama"


@pytest.mark.parametrize(
    "claimant",
    [
        lease("u1", 6144, job="77"),  # a user's job whose comment had the holder prefix: the daemon recorded no holds
        holder_lease(gpus=(1,)),  # a holds claim on another GPU than the reservation's
        holder_lease(holds="vllm"),  # a claim on a reservation that is not here
    ],
)
def test_a_lease_that_does_not_hold_the_reservation_is_an_ordinary_tenant(claimant: Lease) -> None:
    (state, _) = build_gpu_states(NODE, [gpu(0), gpu(1)], [OLLAMA_PROC], [HELD_OLLAMA], [claimant], GIB,
                                  proc_reader=no_proc_reader)
    by_kind = {t.kind: t for t in state.tenants}
    res = by_kind[TenantKind.RESERVATION]
    assert (res.size_mib, res.observed_mib, res.reservation) == (0, 11059, "ollama")
    if claimant.gpus == (0,):
        own = by_kind[TenantKind.LEASE]
        assert (own.observed_mib, own.reservation) == (0, None) and "holds=" not in own.label
        assert state.held_mib == 11059 + claimant.vram_mib  # the Ollama is not inside the claimant's lease


def test_static_reservation_ignores_a_holds_claim() -> None:
    (state,) = build_gpu_states(NODE, [gpu()], [OLLAMA_PROC], [OLLAMA], [holder_lease()], GIB,
                                proc_reader=no_proc_reader)
    res = next(t for t in state.tenants if t.kind is TenantKind.RESERVATION)
    assert (res.size_mib, res.observed_mib, res.held_mib, res.reservation) == (12288, 11059, 12288, None)
    assert state.tenants[0].reservation is None and state.tenants[0].observed_mib == 0
    assert state.held_mib == 12288 + 12288  # a static reservation always counts: a holder of it holds extra


def test_only_the_first_holder_holds_a_reservation() -> None:
    leases = [holder_lease("LH1", job="42"), holder_lease("LH2", job="43")]
    (state,) = build_gpu_states(NODE, [gpu()], [OLLAMA_PROC], [HELD_OLLAMA], leases, GIB, proc_reader=no_proc_reader)
    assert [(t.id, t.observed_mib, t.reservation) for t in state.tenants] == [("LH1", 11059, "ollama"),
                                                                              ("LH2", 0, None)]


def test_the_request_being_decided_may_hold_the_reservation() -> None:
    """A holder job's own Prolog: its requested size covers the Ollama, so the Ollama counts nowhere."""
    (state,) = build_gpu_states(NODE, [gpu()], [OLLAMA_PROC], [HELD_OLLAMA], [lease("w1", 4608, job="21")], GIB,
                                proc_reader=no_proc_reader, holding="ollama")
    assert [t.id for t in state.tenants] == ["w1"]  # not a reservation tenant, not a foreign pid:900
    assert state.free_mib == state.usable_mib - 4608
    # a static reservation is not released by a request that names it
    (static,) = build_gpu_states(NODE, [gpu()], [OLLAMA_PROC], [OLLAMA], [], GIB, proc_reader=no_proc_reader,
                                 holding="ollama")
    assert static.held_mib == 12288
    # a live holder already holds it: its processes stay in that lease
    (held,) = build_gpu_states(NODE, [gpu()], [OLLAMA_PROC], [HELD_OLLAMA], [holder_lease()], GIB,
                               proc_reader=no_proc_reader, holding="ollama")
    assert [(t.id, t.observed_mib) for t in held.tenants] == [("LH", 11059)]
