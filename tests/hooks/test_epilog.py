"""The Epilog: an idempotent job_end keyed by (job, restart count, node), and the grant file's removal."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from slurm_gpuarb import protocol
from slurm_gpuarb.errors import NodeFault
from slurm_gpuarb.hooks import common, epilog, grants

from .conftest import HANG, Cluster, FakeDaemon, Respond, err, ok

Factory = Callable[[Respond], FakeDaemon]


class Ledger:
    """A fake daemon's memory of live leases, so that a second job_end really releases nothing."""

    def __init__(self) -> None:
        self.live = {("12", 0, "n1"): "L0", ("12", 1, "n1"): "L1"}

    def respond(self, req: dict[str, Any]) -> dict[str, Any]:
        lease = self.live.pop((req["job_id"], req["restart_count"], req["node"]), None)
        return ok("job_end", released=[] if lease is None else [lease])


def _grant(cluster: Cluster, restart: int) -> None:
    grants.write_grant(str(cluster.state_dir), grants.Grant(grants.GRANTED, "12", "n1", restart, lease_id="L"),
                       gid=os.getgid())


def test_releases_and_removes_the_grant(cluster: Cluster, daemon_factory: Factory) -> None:
    led = Ledger()
    d = daemon_factory(led.respond)
    _grant(cluster, 0)
    assert epilog.main(cluster.env(SLURM_JOB_EXIT_CODE="256")) == 0
    assert d.requests == [{"v": 1, "op": "job_end", "job_id": "12", "restart_count": 0, "node": "n1",
                           "exit_code": 256}]
    protocol.parse_request(d.requests[0])
    assert not cluster.grant_file().exists()
    assert "epilog: released job=12 node=n1 restart=0 leases=L0 exit_code=256" in cluster.log()


def test_twice_is_harmless(cluster: Cluster, daemon_factory: Factory) -> None:
    led = Ledger()
    daemon_factory(led.respond)
    _grant(cluster, 0)
    assert epilog.main(cluster.env()) == 0
    assert epilog.main(cluster.env()) == 0
    assert "epilog: nothing to release job=12" in cluster.log()
    assert ("12", 1, "n1") in led.live


def test_late_epilog_of_a_requeued_run_leaves_the_next_run_alone(cluster: Cluster, daemon_factory: Factory) -> None:
    led = Ledger()
    d = daemon_factory(led.respond)
    _grant(cluster, 1)  # run 1's Prolog already wrote its grant
    assert epilog.main(cluster.env()) == 0  # run 0's Epilog (SLURM_JOB_RESTART_COUNT absent)
    assert d.requests[0]["restart_count"] == 0
    g = grants.read_grant(str(cluster.state_dir), "n1", "12")
    assert g is not None and g.restart_count == 1
    assert led.live == {("12", 1, "n1"): "L1"}


def test_cpu_job_does_nothing(cluster: Cluster, daemon_factory: Factory) -> None:
    d = daemon_factory(Ledger().respond)
    assert epilog.main(cluster.env(SLURM_JOB_GPUS="")) == 0
    assert d.requests == [] and cluster.fallback_calls == []


def test_daemon_down_falls_back(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    led = Ledger()
    monkeypatch.setattr(common, "in_process", lambda msg, env: led.respond(msg))
    _grant(cluster, 0)
    assert epilog.main(cluster.env()) == 0
    assert "leases=L0" in cluster.log() and not cluster.grant_file().exists()


def test_daemon_hung_falls_back(cluster: Cluster, daemon_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.fast_deadline(monkeypatch, 0.4)
    daemon_factory(lambda req: HANG)
    led = Ledger()
    monkeypatch.setattr(common, "in_process", lambda msg, env: led.respond(msg))
    assert epilog.main(cluster.env()) == 0
    assert ("12", 0, "n1") not in led.live


def test_outage_logs_exits_zero_and_still_removes_the_grant(cluster: Cluster) -> None:
    _grant(cluster, 0)
    assert epilog.main(cluster.env()) == 0
    assert "release not recorded; the reconcile will expire the lease" in cluster.log()
    assert not cluster.grant_file().exists()


def test_error_answer_is_logged_not_fatal(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: err("LedgerError", "database is locked"))
    assert epilog.main(cluster.env()) == 0


def test_node_fault_exits_non_zero(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "in_process", lambda msg, env: protocol.error(NodeFault("gpu 0 fell off the bus")))
    assert epilog.main(cluster.env()) == 1


def test_a_bug_does_not_drain(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: ok("job_end", released="not a list"))
    assert epilog.main(cluster.env()) == 0
