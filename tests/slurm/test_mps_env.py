"""Compute priority on MPS through the real Prolog and TaskProlog: a ``share=mps`` batch lease's job sees its
class's ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (docker-slurm/inventory.toml: ``classes.batch.mps_thread_percent =
30``); an llm lease's job, and a batch job without ``share=mps``, do not.

No partition of the test inventory is ``mode = "mps"``: the jobs take whole GPUs of n1 (``--gres=gpu:1``, which
job_submit.lua, when loaded, accepts as the GRES the spec maps to), and the daemon sizes a ``share=mps`` spec on
a whole GPU like any other whole-GPU lease; ``share=`` only steers the run plane. The test host has no NVIDIA
driver, so no MPS control daemon can start: the Prolog says the job runs time-sliced, keeps the thread cap and
drops ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (nothing would enforce it).
"""

from __future__ import annotations

import pytest

from slurm_gpuarb import mps

from .conftest import Cluster

pytestmark = pytest.mark.slurm

CAP = "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"


def test_batch_mps_lease_gets_the_thread_cap_and_llm_does_not(cluster: Cluster) -> None:
    jobs = {
        "batch": cluster.gated("--comment", "gpuarb: vram=4GiB prio=batch share=mps", "--gres=gpu:1", "-p", "batch",
                               "-w", "n1"),
        "llm": cluster.gated("--comment", "gpuarb: vram=4GiB prio=llm share=mps", "--gres=gpu:1", "-p", "llm",
                             "-w", "n1"),
        "plain": cluster.gated("--comment", "gpuarb: vram=4GiB prio=batch", "--gres=gpu:1", "-p", "batch", "-w", "n1"),
    }
    ids = list(jobs.values())
    cluster.wait(ids, {"RUNNING"}, timeout=60)
    leases = {name: cluster.wait_lease(job) for name, job in jobs.items()}
    cluster.go(*ids)
    assert cluster.wait(ids) == dict.fromkeys(ids, "COMPLETED"), {j: cluster.output(j) for j in ids}

    env = {name: cluster.job_env(job) for name, job in jobs.items()}
    for name, job in jobs.items():
        assert env[name]["GPUARB_LEASE_ID"] == leases[name]["id"], cluster.output(job)
        assert leases[name]["vram_mib"] == 4096 and leases[name]["node"] == "n1"
    assert leases["batch"]["prio"] == "batch" and leases["llm"]["prio"] == "llm"

    assert env["batch"][CAP] == "30"
    assert env["batch"]["GPUARB_SHARE"] == "mps"
    assert CAP not in env["llm"], env["llm"]
    assert env["llm"]["GPUARB_SHARE"] == "mps"
    assert CAP not in env["plain"] and "GPUARB_SHARE" not in env["plain"]

    if mps.find_control() is None:  # this host: no driver, no MPS control daemon, time-sliced
        for name in ("batch", "llm"):
            assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in env[name] and "CUDA_MPS_PIPE_DIRECTORY" not in env[name]
            assert any("no MPS control binary; share=mps runs time-sliced" in line
                       for line in cluster.log_lines(jobs[name])), cluster.log_lines(jobs[name])
    cluster.assert_nodes_healthy()
