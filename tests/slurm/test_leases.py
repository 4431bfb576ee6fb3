"""Leases through the real Prolog, TaskProlog and Epilog: whole GPU, shards, MIG, a refusal, a plain user."""

from __future__ import annotations

import pytest

from slurm_gpuarb.telemetry import fake

from .conftest import Cluster

pytestmark = pytest.mark.slurm

GIB = 1024


def test_whole_gpu_lease_is_the_ledger_row_while_the_job_runs(cluster: Cluster) -> None:
    job = cluster.gated("--comment", "gpuarb: vram=6GiB prio=batch", "--gres=gpu:1", "-p", "batch", "-w", "n1")
    cluster.wait([job], {"RUNNING"}, timeout=60)
    lease = cluster.wait_lease(job)
    cluster.go(job)
    assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)

    env = cluster.job_env(job)
    assert env["GPUARB_VRAM_MB"] == "6144"
    assert env["GPUARB_LEASE_ID"] == lease["id"]
    # The row is this job's, on the GPU Slurm gave it (SLURM_JOB_GPUS: the node-local index).
    assert (lease["job_id"], lease["node"], lease["restart_count"]) == (job, "n1", 0)
    assert lease["gpus"] == [int(env["SLURM_JOB_GPUS"])]
    assert lease["vram_mib"] == 6144
    assert lease["state"] == "granted"

    # Afterwards: released, one row, and the story reads request -> grant -> release.
    (row,) = cluster.leases(job)
    assert row["id"] == lease["id"]
    assert row["state"] == "released"
    story = [(d["action"], d["outcome"]) for d in cluster.decisions(job)]
    assert ("release", "released") in story, story
    assert story.index(("release", "released")) > max(i for i, (_, o) in enumerate(story) if o == "grant"), story
    text = cluster.gpuarb("explain", job).stdout
    assert lease["id"] in text
    assert "grant" in text.lower() and "releas" in text.lower(), text


def test_shard_lease_is_shards_times_quantum(cluster: Cluster) -> None:
    # One job without a spec (the Prolog learns the count from Slurm), one whose spec says the same size.
    plain = cluster.gated("-p", "shard", "--gres=shard:4")
    spec = cluster.gated("-p", "shard", "--gres=shard:3", "--comment", "gpuarb: vram=1536MiB prio=batch")
    cluster.wait([plain, spec], {"RUNNING"}, timeout=60)
    leases = {j: cluster.wait_lease(j) for j in (plain, spec)}
    cluster.go(plain, spec)
    assert cluster.wait([plain, spec]) == {plain: "COMPLETED", spec: "COMPLETED"}

    quantum = 512  # docker-slurm/inventory.toml [policy] quantum
    for job, shards in ((plain, 4), (spec, 3)):
        env = cluster.job_env(job)
        assert env["SLURM_SHARDS_ON_NODE"] == str(shards)
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-fake-rtx3090ti-24g-0"  # the grant's: Slurm sets none here
        assert leases[job]["vram_mib"] == shards * quantum
        assert leases[job]["node"] == "n2"
        assert env["GPUARB_VRAM_MB"] == str(shards * quantum)
        assert env["GPUARB_LEASE_ID"] == leases[job]["id"]
        assert [r["state"] for r in cluster.leases(job)] == ["released"]


def test_mig_lease_exports_the_instance_uuid(cluster: Cluster) -> None:
    job = cluster.gated("-p", "mig", "--gres=gpu:1g.10gb:1")
    cluster.wait([job], {"RUNNING"}, timeout=60)
    lease = cluster.wait_lease(job)
    cluster.go(job)
    assert cluster.wait([job]) == {job: "COMPLETED"}
    env = cluster.job_env(job)
    assert lease["mig_uuid"] and lease["mig_uuid"].startswith("MIG-")
    assert env["CUDA_VISIBLE_DEVICES"] == lease["mig_uuid"]
    assert env["GPUARB_LEASE_ID"] == lease["id"]
    assert 9 * GIB <= int(env["GPUARB_VRAM_MB"]) <= 10 * GIB  # a 1g.10gb slice, whatever NVML reserves of it


def test_unprivileged_job_reads_its_grant(cluster: Cluster, test_user: str) -> None:
    job = cluster.sbatch("--comment", "gpuarb: vram=2GiB", "--gres=gpu:1", "-p", "batch", "-w", "n1",
                         wrap="id -un; env", user=test_user)
    assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)
    out = cluster.output(job)
    assert out.splitlines()[0] == test_user
    env = cluster.job_env(job)
    assert env["GPUARB_VRAM_MB"] == "2048"
    (row,) = cluster.leases(job)
    assert env["GPUARB_LEASE_ID"] == row["id"]
    assert row["owner_uid"] == int(cluster.run("id", "-u", test_user).stdout)
    assert row["state"] == "released"


def test_memory_taken_fails_the_job_and_keeps_the_node(cluster: Cluster) -> None:
    # Every GPU of n1 shows all but 2 GiB used outside any process: 6 GiB fits nowhere.
    for gpu in fake.load_preset("dgx-h100").gpus:
        cluster.set_used_extra("n1", gpu.index, gpu.total_mib - gpu.reserved_mib - 2 * GIB)
    job = cluster.sbatch("--comment", "gpuarb: vram=6GiB prio=batch", "--gres=gpu:1", "-p", "batch", "-w", "n1",
                         wrap="echo the script ran")
    assert cluster.wait([job]) == {job: "FAILED"}
    out = cluster.output(job)
    assert "the script ran" not in out
    assert "gpuarb" in out and ("MiB" in out or "GiB" in out), f"no reason in the job's output: {out!r}"

    assert [r for r in cluster.leases(job) if r["state"] == "granted"] == []
    refusals = [d for d in cluster.decisions(job) if d["outcome"] in ("deny", "wait")]
    assert refusals, cluster.decisions(job)
    assert refusals[-1]["reason"]
    assert "n1" not in " ".join(cluster.drained())
    cluster.assert_nodes_healthy()
