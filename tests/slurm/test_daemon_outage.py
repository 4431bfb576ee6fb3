"""gpuarbd killed (SIGKILL) or frozen (SIGSTOP) while jobs start: the hooks fall back in-process, jobs
run, no node drains, the ledger stays one-lease-per-job; the daemon's reconcile cleans up afterwards."""

from __future__ import annotations

import os
import signal
import time

import pytest

from slurm_gpuarb.client import DaemonUnavailable, call

from .conftest import Cluster, ClusterError

pytestmark = pytest.mark.slurm

ORPHAN_JOB = "990001"  # a job id Slurm never issued: a lease of it is one a reconcile must expire
SHOW = "echo GPUARB_LEASE_ID=$GPUARB_LEASE_ID; echo GPUARB_VRAM_MB=$GPUARB_VRAM_MB; sleep 1"


def submit_mix(cluster: Cluster) -> dict[str, str]:
    """One job of each kind, at once: ``{job id: kind}``."""
    kinds = {
        "gpu": ("--comment", "gpuarb: vram=4GiB prio=batch", "--gres=gpu:1", "-p", "batch", "-w", "n1"),
        "shard": ("-p", "shard", "--gres=shard:2"),
        "mig": ("-p", "mig", "--gres=gpu:1g.10gb:1"),
        "cpu": ("-p", "cpu",),
    }
    return {cluster.sbatch(*args, wrap=SHOW): kind for kind, args in kinds.items()}


def orphan_lease(cluster: Cluster) -> str:
    """A live lease of a job that does not run (written by the CLI straight into the ledger)."""
    out = cluster.gpuarb_json("--node", "n1", "lease", "request", "gpuarb: vram=1GiB prio=batch", "--gpu", "7",
                              "--job", ORPHAN_JOB)
    lease_id: str = out["lease"]["id"]
    return lease_id


def wait_answering(cluster: Cluster, timeout: float = 60) -> None:
    """Until gpuarbd answers a ping (a continued daemon first works through the requests queued
    on its socket while it was stopped)."""
    sock = str(cluster.dir / "state" / "run" / "gpuarb.sock")
    deadline = time.monotonic() + timeout
    while True:
        try:
            call(sock, {"v": 1, "op": "ping"}, timeout=5)
            return
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def wait_expired(cluster: Cluster, lease_id: str, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        (row,) = [r for r in cluster.leases(ORPHAN_JOB) if r["id"] == lease_id]
        if row["state"] != "granted":
            return row
        if time.monotonic() > deadline:
            raise ClusterError(f"the reconcile left lease {lease_id} of job {ORPHAN_JOB} (which does not run) "
                               f"live for {timeout:.0f}s")
        time.sleep(1)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
def test_jobs_run_through_a_daemon_outage(cluster: Cluster, sig: signal.Signals) -> None:
    orphan = orphan_lease(cluster)
    pid = cluster.signal_daemon(sig)
    try:
        jobs = submit_mix(cluster)
        # Each hook waits at most its own deadline for the daemon, then arbitrates in-process.
        states = cluster.wait(list(jobs), timeout=240)
    finally:
        if sig is signal.SIGSTOP:
            os.kill(pid, signal.SIGCONT)
    assert states == dict.fromkeys(jobs, "COMPLETED"), {j: cluster.output(j) for j in jobs}
    cluster.assert_nodes_healthy()
    # The outage was real: every GPU job's Prolog gave up on the daemon and decided in-process.
    for job, kind in jobs.items():
        if kind != "cpu":
            assert [ln for ln in cluster.log_lines(job) if " prolog: " in ln and "in-process" in ln], \
                (kind, cluster.log_lines(job))

    if sig is signal.SIGKILL:
        cluster.ensure_daemon()  # native-up again: starts the daemon that is missing, nothing else
        assert cluster.daemon_pid() not in (None, pid)
    wait_answering(cluster)

    # The reconcile (on start, and periodically) expires the lease of the job that does not run.
    row = wait_expired(cluster, orphan, timeout=90)
    assert row["state"] == "expired"
    assert any(d["action"] in ("expire", "reconcile") for d in cluster.decisions(ORPHAN_JOB))

    # One lease per GPU job, none for the CPU job, all ended; the job saw the lease the ledger holds.
    for job, kind in jobs.items():
        rows = cluster.leases(job)
        if kind == "cpu":
            assert rows == []
            continue
        assert len(rows) == 1, (kind, rows)
        assert rows[0]["state"] in ("released", "expired"), rows
        assert cluster.job_env(job)["GPUARB_LEASE_ID"] == rows[0]["id"], cluster.output(job)
    cluster.assert_nodes_healthy()
