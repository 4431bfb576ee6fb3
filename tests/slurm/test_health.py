"""HealthCheckProgram: a foreign process holding VRAM drains its node after repeated sightings, with a
reason naming PID and MiB; ``gpuarb node resume`` brings the node back."""

from __future__ import annotations

import time
import warnings

import pytest

from slurm_gpuarb.model import GpuProcess

from .conftest import Cluster, ClusterError

pytestmark = pytest.mark.slurm

FOREIGN_PID = 424242
FOREIGN_MIB = 3000


def node_reason(cluster: Cluster, node: str) -> tuple[str, str]:
    """(state, reason) of one node; the reason in full (sinfo's %E, no width limit)."""
    out = cluster.run("sinfo", "-h", "-N", "-n", node, "-o", "%T|%E").stdout.splitlines()
    state, _, reason = out[0].partition("|")
    return state, reason


def wait_node(cluster: Cluster, node: str, want: tuple[str, ...], timeout: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        state, reason = node_reason(cluster, node)
        if state.rstrip("*~#") in want:
            return state, reason
        if time.monotonic() > deadline:
            raise ClusterError(f"node {node} is {state} ({reason}), not {'/'.join(want)}, after {timeout:.0f}s; "
                               f"health log: {[ln for ln in cluster.log_lines() if 'health' in ln][-5:]}")
        time.sleep(0.5)


def resume(cluster: Cluster, node: str) -> None:
    """``gpuarb node resume NODE``; its library function where the CLI lacks the command (with a warning)."""
    if cluster.gpuarb("node", "resume", "--help", check=False).returncode == 0:
        p = cluster.gpuarb("node", "resume", node, check=False)
    else:
        warnings.warn("gpuarb has no `node resume` command yet: calling hooks.health.resume_node", stacklevel=2)
        p = cluster.run(cluster.python, "-I", "-c", "import sys; from slurm_gpuarb.hooks.health import resume_node; "
                        "from slurm_gpuarb.slurm import select_adapter; "
                        "resume_node(sys.argv[1], adapter=select_adapter())", node, check=False)
    if p.returncode != 0:
        cluster.resume(node)  # keep the cluster usable for the next tests, then fail
        pytest.fail(f"resuming {node} failed: {p.stdout}{p.stderr}")


def test_foreign_process_drains_its_node_and_resume_brings_it_back(cluster: Cluster) -> None:
    cluster.add_process("n2", GpuProcess(pid=FOREIGN_PID, gpu_index=0, used_mib=FOREIGN_MIB, name="cryptominer",
                                         uid=1000))
    try:
        _, reason = wait_node(cluster, "n2", ("drained", "draining"), timeout=90)
        assert str(FOREIGN_PID) in reason and str(FOREIGN_MIB) in reason, reason
        # The Ollama the inventory reserves on that GPU is no foreign process; no other node is touched.
        assert "ollama" not in reason.lower()
        assert [ln for ln in cluster.drained() if not ln.startswith("n2|")] == []
        # Drained only after repeated sightings: the health log saw it more than once before.
        sightings = [ln for ln in cluster.log_lines() if "health" in ln and "n2" in ln and str(FOREIGN_PID) in ln]
        assert len(sightings) >= 2, sightings
    finally:
        cluster.remove_process("n2", FOREIGN_PID)

    resume(cluster, "n2")
    wait_node(cluster, "n2", ("idle",), timeout=30)
    cluster.assert_nodes_healthy()

    # And it stays up: the next health checks see nothing foreign.
    job = cluster.sbatch("-p", "shard", "--gres=shard:1", wrap="true")
    assert cluster.wait([job]) == {job: "COMPLETED"}
    cluster.assert_nodes_healthy()
