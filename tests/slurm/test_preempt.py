"""LLM over batch on the real cluster: QoS preemption frees the GPU by REQUEUE, and the ledger says why.

A batch job holds all eight GPUs of n1; an llm job for one of them arrives. Slurm's QoS preemption
(``llm`` preempts ``batch``, ``PreemptMode=requeue``, ``GraceTime`` on the batch QoS: what the rendered
gpuarb-qos.sh sets) requeues the batch job — never suspends it: a suspended job keeps its GPU memory —
the llm job starts within GraceTime + 30 s, the agent records the batch run's lease as revoked naming
the llm job, and once the llm job is done the batch job runs again as restart 1 under a new lease.

Needs slurmdbd (``WITH_DBD=1``: QoS and ``PreemptType=preempt/qos``) and job_submit.lua (it sets each
job's QoS from its class); the test skips itself, saying which is missing, on a cluster without them.
"""

from __future__ import annotations

import time

import pytest

from .conftest import Cluster, ClusterError
from .test_controller import grace_time_s, last_row_id, running_agent, wait_row

pytestmark = pytest.mark.slurm


def _needs_qos_preemption(cluster: Cluster) -> None:
    conf = (cluster.dir / "etc" / "slurm.conf").read_text(encoding="utf-8")
    if "PreemptType=preempt/qos" not in conf:
        pytest.skip("needs QoS preemption: start the cluster with WITH_DBD=1 (slurmdbd, gpuarb-qos.sh)")
    if not cluster.job_submit_lua.exists():
        pytest.skip("needs job_submit.lua (GPUARB_CLUSTER_LUA=1): it sets each job's QoS from its class")
    qos = cluster.run("sacctmgr", "-n", "-P", "show", "qos", "format=name,preempt,preemptmode").stdout
    modes = {ln.split("|")[0]: ln.split("|") for ln in qos.splitlines() if ln.strip()}
    assert "batch" in modes.get("llm", ["", ""])[1], f"QoS llm must preempt batch: {qos}"
    assert modes.get("batch", ["", "", ""])[2].lower() == "requeue", f"QoS batch must be requeued: {qos}"


def test_llm_job_requeues_batch_and_the_batch_run_is_revoked_with_a_reason(cluster: Cluster) -> None:
    _needs_qos_preemption(cluster)
    grace = grace_time_s(cluster)
    first = last_row_id(cluster)
    with running_agent(cluster):
        batch = cluster.gated("-p", "batch", "-w", "n1", "--comment", "gpuarb: vram=40GiB gpus=8 prio=batch")
        cluster.wait([batch], {"RUNNING"}, timeout=60)
        run0 = cluster.wait_lease(batch)
        assert cluster.slurm_job(batch).qos == "batch"

        llm = cluster.gated("-p", "llm", "-w", "n1", "--comment", "gpuarb: vram=40GiB prio=llm")
        assert cluster.slurm_job(llm).qos == "llm"
        # Until the llm job runs: every state the batch job passes through (it must never be SUSPENDED).
        seen: list[str] = []
        deadline = time.monotonic() + grace + 30
        while True:
            states = cluster.states([batch, llm])
            seen.append(states[batch][0])
            if states[llm][0] == "RUNNING":
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"the llm job did not start within GraceTime ({grace}s) + 30s: {states}; "
                                   f"batch went through {sorted(set(seen))}")
            time.sleep(0.2)
        assert "SUSPENDED" not in seen, seen
        requeued = cluster.slurm_job(batch)
        assert requeued.restart_count == 1 and requeued.state in ("PENDING", "REQUEUED", "COMPLETING"), requeued
        llm_lease = cluster.wait_lease(llm)

        # The batch run's lease: revoked, the reason naming the llm job (the agent's record).
        revoke = wait_row(cluster, "revoke", "revoke", after=first, job_id=batch, timeout=60)
        assert revoke.restart_count == 0 and f"preempted by job {llm}" in revoke.reason, revoke.reason
        assert revoke.inputs.get("by_job") == llm
        by_id = {r["id"]: r for r in cluster.leases(batch)}
        assert by_id[run0["id"]]["state"] == "revoked"
        assert f"preempted by job {llm}" in (by_id[run0["id"]]["end_reason"] or "")
        assert llm_lease["gpus"] and llm_lease["state"] == "granted"

        # The llm job finishes; the batch job runs again as restart 1, under a new lease.
        cluster.go(llm)
        assert cluster.wait([llm]) == {llm: "COMPLETED"}, cluster.output(llm)
        run1 = cluster.wait_lease(batch, restart_count=1, timeout=120)
        assert run1["id"] != run0["id"]
        cluster.go(batch)
        assert cluster.wait([batch]) == {batch: "COMPLETED"}, cluster.output(batch)
    assert cluster.job(batch)["Restarts"] == "1"
    env = cluster.job_env(batch)
    assert env["SLURM_RESTART_COUNT"] == "1" and env["GPUARB_LEASE_ID"] == run1["id"]
    explained = cluster.gpuarb("explain", batch).stdout
    assert "revoked" in explained and f"preempted by job {llm}" in explained, explained
    cluster.assert_nodes_healthy()
