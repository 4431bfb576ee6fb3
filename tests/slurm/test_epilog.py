"""Releases keyed by (job id, restart count, node): requeue, a replayed Epilog, an Epilog run twice."""

from __future__ import annotations

import time

import pytest

from .conftest import Cluster, ClusterError

pytestmark = pytest.mark.slurm


def epilog_env(job: str, restart_count: int, node: str, gpus: str) -> dict[str, str]:
    """What slurmd gives the Epilog (SLURM-LAB.md): no PATH, the job's ids, its GPUs, its exit code."""
    return {"SLURM_JOB_ID": job, "SLURM_JOB_RESTART_COUNT": str(restart_count), "SLURMD_NODENAME": node,
            "SLURM_JOB_UID": "0", "SLURM_JOB_USER": "root", "SLURM_JOB_GPUS": gpus, "CUDA_VISIBLE_DEVICES": gpus,
            "SLURM_JOB_PARTITION": "batch", "SLURM_JOB_EXIT_CODE": "0", "SLURM_CONF": "/etc/slurm/slurm.conf",
            "SLURM_JOB_COMMENT": "gpuarb: vram=4GiB prio=batch"}


def release_rows(cluster: Cluster, job: str) -> list[dict[str, object]]:
    return [d for d in cluster.decisions(job) if d["action"] == "release" and d["outcome"] == "released"]


def wait_restarted(cluster: Cluster, job: str, timeout: float = 120) -> None:
    """Until the requeued job runs again (Slurm holds it for cred_expire + 1 s first)."""
    deadline = time.monotonic() + timeout
    while True:
        f = cluster.job(job)
        if f.get("JobState") == "RUNNING" and f.get("Restarts") == "1":
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"job {job} did not run again after its requeue: {f}")
        time.sleep(0.5)


def test_requeue_gets_a_new_lease_and_a_late_epilog_releases_nothing_else(cluster: Cluster) -> None:
    job = cluster.gated("--comment", "gpuarb: vram=4GiB prio=batch", "--gres=gpu:1", "-p", "batch", "-w", "n1")
    cluster.wait([job], {"RUNNING"}, timeout=60)
    first = cluster.wait_lease(job, restart_count=0)
    first_gpus = cluster.job_env(job)["SLURM_JOB_GPUS"]

    cluster.run("scontrol", "requeue", job)
    wait_restarted(cluster, job)
    second = cluster.wait_lease(job, restart_count=1)
    assert second["id"] != first["id"]
    by_id = {r["id"]: r for r in cluster.leases(job)}
    assert by_id[first["id"]]["state"] == "released"
    assert by_id[second["id"]]["state"] == "granted"

    # The first run's Epilog, replayed late (a slow node): it must not touch run 1's lease.
    p = cluster.hook("gpuarb-epilog", epilog_env(job, 0, "n1", first_gpus))
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in cluster.live_leases(job)] == [second["id"]]
    assert [r["lease_id"] for r in release_rows(cluster, job)] == [first["id"]]

    cluster.go(job)
    assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)
    assert cluster.job_env(job)["GPUARB_LEASE_ID"] == second["id"]
    states = {r["id"]: (r["state"], r["restart_count"]) for r in cluster.leases(job)}
    assert states == {first["id"]: ("released", 0), second["id"]: ("released", 1)}
    assert sorted(str(r["lease_id"]) for r in release_rows(cluster, job)) == sorted([first["id"], second["id"]])
    cluster.assert_nodes_healthy()


def test_epilog_twice_releases_once(cluster: Cluster) -> None:
    job = cluster.sbatch("--comment", "gpuarb: vram=4GiB prio=batch", "--gres=gpu:1", "-p", "batch", "-w", "n1",
                         wrap="env")
    assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)
    env = cluster.job_env(job)
    (lease,) = cluster.leases(job)
    assert lease["state"] == "released"  # Slurm's own Epilog did it

    for _ in range(2):
        p = cluster.hook("gpuarb-epilog", epilog_env(job, 0, "n1", env["SLURM_JOB_GPUS"]))
        assert (p.returncode, p.stdout) == (0, ""), p.stderr
    assert [r["lease_id"] for r in release_rows(cluster, job)] == [lease["id"]]
    assert [r["state"] for r in cluster.leases(job)] == ["released"]
    assert not [ln for ln in cluster.log_lines(job) if "Traceback" in ln]
    cluster.assert_nodes_healthy()
