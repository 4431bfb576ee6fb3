"""The controller agent (``gpuarbd --role controller``) on the real cluster.

* A pending batch job with ``min=4GiB wait=1m`` that cannot start at 8 GiB is shrunk by the agent and
  starts with ``GPUARB_VRAM_MB=4096`` (needs the submit plane: job_submit.lua writes the canonical
  comment the agent reads and lets the agent's update through).
* The RTX 3090 Ti story: an Ollama-like service on loopback holding 10.8 GiB of n2 (the fake
  telemetry's preset process, pid 4242); its reservation held by a holder job while it is up; its
  memory leasable to batch once it has been down past the grace period; reclaimed from batch within
  GraceTime + 30 s when it returns; a ledger row at each step. The test switches the cluster to a
  holder-mode variant of the inventory (``RESTART=1 native-up``: n2's Ollama reservation held by a
  holder job instead of subtracted at render time) and back.

Each test starts the agent from the cluster's own install (``<dir>/venv/bin/gpuarbd``, reading
/etc/slurm/gpuarb.toml like the hooks) and stops it with SIGTERM at its end; holder jobs it left are
cancelled by name.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slurm_gpuarb.config import Config, load
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.lua import submit_tables
from slurm_gpuarb.model import DecisionRecord, GpuProcess
from slurm_gpuarb.slurm import JobInfo, select_adapter

from .conftest import INVENTORY, Cluster, ClusterError, native_up

pytestmark = pytest.mark.slurm

QUANTUM = 512  # the inventory's [policy] quantum
INTERVAL = "1"  # seconds between the agent's ticks here (a real site: 15)
OLLAMA_PID, OLLAMA_MIB = 4242, 11059  # the rtx3090ti-24g preset's Ollama (10.8 GiB)
PREEMPT_RECORD_S = 60  # the agent records a preempted run within a few ticks of its preemptor starting


# --------------------------------------------------------------------------- the agent and the ledger


def installed_config(cluster: Cluster) -> Config:
    return load(cluster.dir / "etc" / "gpuarb.toml", env={})


@contextlib.contextmanager
def running_agent(cluster: Cluster, *, interval: str = INTERVAL) -> Iterator[subprocess.Popen[str]]:
    """``gpuarbd --role controller --foreground`` as root, until the block ends (SIGTERM, then its holders
    are cancelled)."""
    gpuarbd = cluster.dir / "venv" / "bin" / "gpuarbd"
    proc = subprocess.Popen([str(gpuarbd), "--role", "controller", "--foreground", "--interval", interval],
                            env=cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not [ln for ln in cluster.log_lines() if f"gpuarbd-controller: running pid={proc.pid}" in ln]:
            if proc.poll() is not None:
                raise ClusterError(f"gpuarbd --role controller exited {proc.returncode}: {proc.communicate()[1]}")
            if time.monotonic() > deadline:
                raise ClusterError("gpuarbd --role controller did not start within 30s")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        holders = [j.job_id for j in select_adapter("cli").jobs() if j.name.startswith("gpuarb-hold-")]
        cluster.cancel(holders)
    assert proc.returncode == 0, f"the agent did not stop cleanly on SIGTERM: {proc.stderr and proc.stderr.read()}"


def agent_rows(cluster: Cluster, *, after: int = 0) -> list[DecisionRecord]:
    """The ledger's agent-plane decision rows (id > ``after``), read straight from the cluster's ledger."""
    with Ledger.open(installed_config(cluster).ledger_url, create=False) as ledger:
        return [r for r in ledger.decisions(plane="agent") if r.id > after]


def last_row_id(cluster: Cluster) -> int:
    with Ledger.open(installed_config(cluster).ledger_url, create=False) as ledger:
        rows = ledger.decisions(limit=1)
    return rows[-1].id if rows else 0


def wait_row(cluster: Cluster, action: str, outcome: str, *, after: int, timeout: float = 60,
             job_id: str | None = None) -> DecisionRecord:
    deadline = time.monotonic() + timeout
    while True:
        for r in agent_rows(cluster, after=after):
            if (r.action, r.outcome) == (action, outcome) and job_id in (None, r.job_id):
                return r
        if time.monotonic() > deadline:
            raise ClusterError(f"no agent row {action}/{outcome} within {timeout:.0f}s; rows: "
                               f"{[(r.action, r.outcome, r.reason) for r in agent_rows(cluster, after=after)]}")
        time.sleep(0.5)


def shards_free_on_n2(cluster: Cluster) -> tuple[int, int]:
    """(n2's shard count as rendered, shards Slurm has not given to a job there)."""
    total = submit_tables(installed_config(cluster)).partitions["shard"].shard_count
    used = sum(j.gres_shards or 0 for j in select_adapter("cli").running_on("n2"))
    return total, total - used


# --------------------------------------------------------------------------- shrink


def test_pending_job_past_wait_is_shrunk_to_min_and_runs_with_it(cluster: Cluster) -> None:
    cfg = installed_config(cluster)
    if not cluster.job_submit_lua.exists():
        pytest.skip("the agent shrinks canonical specs only: this cluster runs without job_submit.lua")
    if any(r.mode == "holder" and r.node == "n2" for r in cfg.reservations):
        pytest.skip("n2's shards hold the holder-mode Ollama here: run this test on the default inventory")
    total, free = shards_free_on_n2(cluster)
    assert free >= 8 + 1, f"n2 needs 9 free shards for this test, has {free} of {total}"
    first = last_row_id(cluster)
    with running_agent(cluster):
        # Leave 10 shards (5 GiB): 8 GiB (16 shards) cannot start, 4 GiB (8 shards) can.
        filler = None
        if free > 10:
            filler = cluster.gated("-p", "shard", "--comment", f"gpuarb: vram={(free - 10) * QUANTUM}MiB prio=batch")
            cluster.wait([filler], {"RUNNING"}, timeout=60)
        job = cluster.gated("-p", "shard", "--comment", "gpuarb: vram=8GiB prio=batch min=4GiB wait=1m")
        before = cluster.slurm_job(job)
        assert before.comment == "gpuarb/1: vram=8192MiB prio=batch min=4096MiB wait=1m shards=16"
        assert before.tres_per_node == "gres:shard:16"

        row = wait_row(cluster, "shrink", "degrade", after=first, job_id=job, timeout=150)
        cluster.wait([job], {"RUNNING"}, timeout=60)
        lease = cluster.wait_lease(job)
        after = cluster.slurm_job(job)
        cluster.go(job, *([filler] if filler else []))
        assert cluster.wait([job]) == {job: "COMPLETED"}, cluster.output(job)

    assert row.inputs["waited_s"] >= 60 and row.inputs["state_reason"] in ("Resources", "Priority"), row
    assert (row.requested_mib, row.granted_mib) == (8192, 4096)
    assert after.comment == "gpuarb/1: vram=4096MiB prio=batch shards=8"
    assert after.tres_per_node == "gres:shard:8"
    assert lease["vram_mib"] == 4096
    env = cluster.job_env(job)
    assert (env["GPUARB_VRAM_MB"], env["SLURM_SHARDS_ON_NODE"]) == ("4096", "8")
    story = [(d["plane"], d["action"], d["outcome"]) for d in cluster.decisions(job)]
    assert ("agent", "shrink", "degrade") in story, story
    # job_submit.lua let the agent (root) through: its modify hook refused nothing for this job.
    assert not [ln for ln in cluster.slurmctld_log().splitlines() if f"job={job} " in ln and "refused" in ln]
    cluster.assert_nodes_healthy()


# --------------------------------------------------------------------------- the RTX 3090 Ti story


class FakeOllama:
    """An Ollama-like HTTP server on loopback: ``/api/version`` and ``/api/ps`` with one model loaded
    (10.8 GiB, all of it on the GPU). :meth:`stop` and :meth:`start` take it down and bring it back."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.address = (host, port)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        size = OLLAMA_MIB * 1024 * 1024

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body: Any
                if self.path == "/api/version":
                    body = {"version": "0.12.6"}
                elif self.path == "/api/ps":
                    body = {"models": [{"name": "llama3:8b", "model": "llama3:8b", "size": size, "size_vram": size,
                                        "digest": "0" * 64, "details": {}, "expires_at": "2099-01-01T00:00:00Z"}]}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._server = http.server.ThreadingHTTPServer(self.address, Handler)
        self.address = self._server.server_address[:2]  # port 0: the one it got, kept for a restart
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


def grace_time_s(cluster: Cluster) -> int:
    """The batch QoS's GraceTime (seconds), as slurmdbd has it."""
    out = cluster.run("sacctmgr", "-n", "-P", "show", "qos", "batch", "format=gracetime").stdout.strip()
    h, m, s = (int(x) for x in (out or "00:00:00").split(":")[-3:])
    return h * 3600 + m * 60 + s


def holder_jobs() -> list[JobInfo]:
    return [j for j in select_adapter("cli").jobs() if j.name == "gpuarb-hold-ollama" and j.state != "CANCELLED"
            and (j.state == "PENDING" or j.holds_allocation)]


def wait_holder_running(timeout: float) -> JobInfo:
    deadline = time.monotonic() + timeout
    while True:
        running = [j for j in holder_jobs() if j.state == "RUNNING" and "n2" in j.nodes]
        if running:
            return running[0]
        if time.monotonic() > deadline:
            raise ClusterError(f"no holder job running on n2 within {timeout:.0f}s: {holder_jobs()}")
        time.sleep(0.5)


STATIC = 'mode = "static"\nmatch = { process = "ollama" }\n'


@contextlib.contextmanager
def holder_inventory(cluster: Cluster, tmp_path: Path, probe_url: str) -> Iterator[None]:
    """The cluster on the test inventory with n2's Ollama reservation in holder mode, probed at
    ``probe_url``; the default inventory again afterwards (both with a restart of the daemons)."""
    text = INVENTORY.read_text()
    assert text.count(STATIC) == 1, "the test inventory's static Ollama reservation moved"
    variant = tmp_path / "inventory-holder.toml"
    variant.write_text(text.replace(STATIC, 'mode = "holder"\nmatch = { process = "ollama" }\n'
                                            f'probe = {{ kind = "ollama", url = "{probe_url}", timeout = "1s" }}\n'
                                            'grace = "20s"\n'))
    try:
        native_up(cluster.dir, GPUARB_CLUSTER_INVENTORY=str(variant), RESTART="1")
        yield
    finally:
        native_up(cluster.dir, RESTART="1")


def test_ollama_reservation_is_held_lent_and_reclaimed(cluster: Cluster, tmp_path: Path) -> None:
    ollama = FakeOllama()
    ollama.start()
    host, port = ollama.address
    try:
        with holder_inventory(cluster, tmp_path, f"http://{host}:{port}"):
            _story(cluster, ollama)
    finally:
        ollama.stop()
    cluster.assert_nodes_healthy()


def _story(cluster: Cluster, ollama: FakeOllama) -> None:
    cfg = installed_config(cluster)
    res = next(r for r in cfg.reservations if r.name == "ollama")
    assert res.mode == "holder" and res.probe is not None, res
    total, _ = shards_free_on_n2(cluster)
    holder_shards = -(-max(res.size_mib, OLLAMA_MIB) // QUANTUM)
    big_shards = total - holder_shards + 1  # fits n2 only without the holder
    grace = grace_time_s(cluster)
    first = last_row_id(cluster)
    with running_agent(cluster):
        # 1. Up: the holder takes the reservation's shards; batch cannot cut into them.
        holder = wait_holder_running(timeout=60)
        assert holder.gres_shards == holder_shards and holder.qos == "llm", holder
        submitted = wait_row(cluster, "hold", "submitted", after=first, job_id=holder.job_id)
        assert "ollama up" in submitted.reason and f"{holder_shards} shards" in submitted.reason
        big = cluster.gated("-p", "shard", "--comment", f"gpuarb: vram={big_shards * QUANTUM}MiB prio=batch")
        time.sleep(5)  # a few scheduling passes (sched_interval=2): it must still be waiting, not running
        assert cluster.states([big])[big][0] == "PENDING", cluster.states([big])

        # 2. Down past the grace period: the holder is cancelled, its memory goes to batch.
        ollama.stop()
        cluster.remove_process("n2", OLLAMA_PID)
        down = wait_row(cluster, "service", "down", after=first)
        cancelled = wait_row(cluster, "unhold", "cancelled", after=first, timeout=res.grace_s + 60)
        assert cancelled.ts - down.ts >= res.grace_s - 1, (down, cancelled)
        assert "leasable to batch" in cancelled.reason and cancelled.job_id == holder.job_id
        cluster.wait([big], {"RUNNING"}, timeout=60)
        big_lease = cluster.wait_lease(big)
        assert big_lease["vram_mib"] == big_shards * QUANTUM

        # 3. Back: a new holder reclaims the memory from batch within GraceTime + 30 s.
        cluster.add_process("n2", GpuProcess(pid=OLLAMA_PID, gpu_index=0, used_mib=OLLAMA_MIB, name="ollama",
                                             uid=999, user="ollama"))
        ollama.start()
        # (plus one tick of the agent and its probe: the service must be seen back first)
        again = wait_holder_running(timeout=grace + 30 + float(INTERVAL) + 5)
        assert again.job_id != holder.job_id
        resubmitted = wait_row(cluster, "hold", "submitted", after=cancelled.id, job_id=again.job_id)
        assert "back after" in resubmitted.reason
        # The batch job was requeued, not suspended, and its run's lease revoked naming the holder.
        info = cluster.slurm_job(big)
        assert info.restart_count == 1 and info.state != "SUSPENDED", info
        revoke = wait_row(cluster, "revoke", "revoke", after=first, job_id=big, timeout=PREEMPT_RECORD_S)
        assert f"preempted by job {again.job_id}" in revoke.reason, revoke.reason
        rows = {r["id"]: r for r in cluster.leases(big)}
        assert rows[big_lease["id"]]["state"] == "revoked"
    story = [(r.action, r.outcome) for r in agent_rows(cluster, after=first) if r.inputs.get("reservation") == "ollama"]
    assert story[:4] == [("hold", "submitted"), ("service", "down"), ("unhold", "cancelled"), ("hold", "submitted")]

