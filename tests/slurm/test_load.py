"""50 jobs at once across the 4 nodes: every GPU job had exactly one lease, all released, no drain.
(That no daemon or slurmd is left running after the tests is the session fixture's teardown check.)"""

from __future__ import annotations

import collections

import pytest

from .conftest import Cluster

pytestmark = pytest.mark.slurm

SHOW = "echo GPUARB_LEASE_ID=$GPUARB_LEASE_ID; echo CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES; sleep 1"
MIX = (
    # (kind, count, sbatch arguments)
    ("gpu", 10, ("--comment", "gpuarb: vram=8GiB prio=batch", "-p", "batch", "--gres=gpu:1")),
    ("gpu-nospec", 5, ("-p", "batch", "--gres=gpu:1", "-w", "n1")),
    ("shard", 10, ("-p", "shard", "--gres=shard:2")),
    ("mig", 10, ("-p", "mig", "--gres=gpu:1g.10gb:1")),
    ("cpu", 15, ("-p", "cpu",)),
)


def test_fifty_jobs_at_once(cluster: Cluster) -> None:
    jobs = {cluster.sbatch(*args, wrap=SHOW): kind for kind, count, args in MIX for _ in range(count)}
    assert len(jobs) == 50
    states = cluster.wait(list(jobs), timeout=300)
    assert states == dict.fromkeys(jobs, "COMPLETED"), {j: cluster.output(j) for j, s in states.items()
                                                        if s != "COMPLETED"}
    cluster.assert_nodes_healthy()

    rows = collections.defaultdict(list)
    for r in cluster.leases():
        rows[r["job_id"]].append(r)
    for job, kind in jobs.items():
        env = cluster.job_env(job)
        if kind == "cpu":
            assert rows[job] == [] and env["GPUARB_LEASE_ID"] == ""
            continue
        assert len(rows[job]) == 1, (job, kind, rows[job])
        (lease,) = rows[job]
        assert lease["state"] == "released", lease
        assert lease["restart_count"] == 0
        assert env["GPUARB_LEASE_ID"] == lease["id"], (job, cluster.output(job))
        if kind == "shard":
            assert lease["vram_mib"] == 2 * 512
        elif kind == "mig":
            assert env["CUDA_VISIBLE_DEVICES"] == lease["mig_uuid"]
        elif kind == "gpu":
            assert lease["vram_mib"] == 8192
    # Nothing of these jobs is live any more, on any node.
    assert [r for r in cluster.leases() if r["state"] == "granted" and r["job_id"] in jobs] == []
