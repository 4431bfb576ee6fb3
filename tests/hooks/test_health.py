"""The health check: consecutive sightings of a foreign process drain the node (once); resume undoes it."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from slurm_gpuarb.errors import LedgerError
from slurm_gpuarb.hooks import common, health
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.slurm import JobInfo, SlurmAdapter, SlurmError

from .conftest import Cluster, FakeDaemon, Respond, err, ok

Factory = Callable[[Respond], FakeDaemon]
OLLAMA_LIKE = {"pid": 4242, "gpu": 0, "mib": 10800, "name": "python3 (bob)"}


class FakeAdapter(SlurmAdapter):
    """Records drains and resumes (what the cli adapter would turn into scontrol argv)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.fail = fail

    def jobs(self, job_ids: Iterable[str | int] | None = None) -> list[JobInfo]:
        return []

    def drain(self, node: str, reason: str) -> None:
        if self.fail:
            raise SlurmError("scontrol: error: Invalid node state specified")
        self.calls.append(("drain", node, reason))

    def resume(self, node: str) -> None:
        self.calls.append(("resume", node))

    def node_state(self, node: str) -> str:
        return "IDLE"


def _env(cluster: Cluster) -> dict[str, str]:
    return {"GPUARB_CONFIG": str(cluster.config), "SLURMD_NODENAME": "n1"}  # all slurmd gives it


def _daemon(daemon_factory: Factory, foreign: list[dict[str, Any]]) -> FakeDaemon:
    return daemon_factory(lambda req: ok("health", node=req["node"], foreign=list(foreign)))


@pytest.fixture
def ledger_cluster(cluster: Cluster, tmp_path: Path) -> Cluster:
    cluster.write_config(extra=f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n')
    return cluster


def _rows(tmp_path: Path) -> list[tuple[str, str, str, str]]:
    with Ledger.open(f"sqlite:///{tmp_path}/ledger.db") as ledger:
        return [(r.plane, r.action, r.outcome, r.reason) for r in ledger.decisions(node="n1")]


def test_three_sightings_in_a_row_drain_once(ledger_cluster: Cluster, daemon_factory: Factory,
                                             tmp_path: Path) -> None:
    d = _daemon(daemon_factory, [OLLAMA_LIKE])
    adapter = FakeAdapter()
    assert [health.main(_env(ledger_cluster), adapter=adapter) for _ in range(2)] == [0, 0]
    assert adapter.calls == []
    assert health.main(_env(ledger_cluster), adapter=adapter) == 1
    assert adapter.calls == [("drain", "n1", "gpuarb: foreign pid 4242 holds 10800 MiB on gpu0")]
    assert health.main(_env(ledger_cluster), adapter=adapter) == 1  # still there: no second drain
    assert len(adapter.calls) == 1
    assert d.requests[0] == {"v": 1, "op": "health", "node": "n1"}
    assert _rows(tmp_path) == [("health", "drain", "drained", "gpuarb: foreign pid 4242 holds 10800 MiB on gpu0")]
    assert "health: node drained node=n1 pid=4242" in ledger_cluster.log()


def test_count_resets_when_the_process_goes(cluster: Cluster, daemon_factory: Factory) -> None:
    foreign = [OLLAMA_LIKE]
    daemon_factory(lambda req: ok("health", node="n1", foreign=list(foreign)))
    adapter = FakeAdapter()
    health.main(_env(cluster), adapter=adapter)
    health.main(_env(cluster), adapter=adapter)
    foreign.clear()
    assert health.main(_env(cluster), adapter=adapter) == 0
    foreign.append(OLLAMA_LIKE)
    health.main(_env(cluster), adapter=adapter)
    health.main(_env(cluster), adapter=adapter)
    assert adapter.calls == []
    state = json.loads((cluster.state_dir / "health" / "n1.json").read_text())
    assert state["seen"]["4242@0"]["count"] == 2


def test_a_reused_pid_with_another_name_starts_over() -> None:
    state = health.update({"seen": {}, "drained": []}, [health.Sighting(7, 0, 100, "a")])
    state = health.update(state, [health.Sighting(7, 0, 100, "a")])
    assert state["seen"]["7@0"]["count"] == 2
    state = health.update(state, [health.Sighting(7, 0, 100, "b")])
    assert state["seen"]["7@0"]["count"] == 1


def test_largest_confirmed_first() -> None:
    state: dict[str, Any] = {"seen": {}, "drained": []}
    for _ in range(3):
        state = health.update(state, [health.Sighting(1, 0, 100), health.Sighting(2, 1, 900)])
    assert [s.pid for s in health.confirmed(state)] == [2, 1]


def test_failed_drain_is_retried(cluster: Cluster, daemon_factory: Factory) -> None:
    _daemon(daemon_factory, [OLLAMA_LIKE])
    broken = FakeAdapter(fail=True)
    for _ in range(3):
        health.main(_env(cluster), adapter=broken)
    assert "could not drain the node; will retry" in cluster.log()
    adapter = FakeAdapter()
    assert health.main(_env(cluster), adapter=adapter) == 1
    assert [c[0] for c in adapter.calls] == ["drain"]


def test_resume_clears_counts_resumes_and_records(ledger_cluster: Cluster, daemon_factory: Factory,
                                                  tmp_path: Path) -> None:
    _daemon(daemon_factory, [OLLAMA_LIKE])
    adapter = FakeAdapter()
    for _ in range(3):
        health.main(_env(ledger_cluster), adapter=adapter)
    health.resume_node("n1", adapter=adapter, env={"GPUARB_CONFIG": str(ledger_cluster.config)})
    assert adapter.calls[-1] == ("resume", "n1")
    assert not (ledger_cluster.state_dir / "health" / "n1.json").exists()
    assert _rows(tmp_path)[-1][:3] == ("cli", "resume", "resumed")
    # Still there: the count starts again from one, and drains again after three more sightings.
    assert [health.main(_env(ledger_cluster), adapter=adapter) for _ in range(3)] == [0, 0, 1]
    assert [c[0] for c in adapter.calls] == ["drain", "resume", "drain"]


def test_resume_raises_when_the_row_cannot_be_written(cluster: Cluster, tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where the ledger's directory should be")
    cluster.write_config(extra=f'[ledger]\nurl = "sqlite:///{tmp_path}/blocker/ledger.db"\n')
    adapter = FakeAdapter()
    with pytest.raises(LedgerError, match="was resumed, but its decision row"):
        health.resume_node("n1", adapter=adapter, env={"GPUARB_CONFIG": str(cluster.config)})
    assert adapter.calls == [("resume", "n1")]


def test_resume_rejects_a_bad_node_name() -> None:
    with pytest.raises(common.SlurmEnvError):
        health.resume_node("../n1", adapter=FakeAdapter(), env={})


def test_outage_cannot_judge_and_exits_zero(cluster: Cluster) -> None:
    adapter = FakeAdapter()
    assert health.main(_env(cluster), adapter=adapter) == 0
    assert adapter.calls == [] and "cannot judge the node" in cluster.log()


def test_fallback_answers_when_the_daemon_is_down(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "in_process", lambda msg, env: ok("health", node="n1", foreign=[OLLAMA_LIKE]))
    health.main(_env(cluster), adapter=FakeAdapter())
    state = json.loads((cluster.state_dir / "health" / "n1.json").read_text())
    assert state["seen"]["4242@0"]["count"] == 1


def test_node_fault_exits_non_zero(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: err("NodeFault", "NVML: GPU is lost"))
    assert health.main(_env(cluster), adapter=FakeAdapter()) == 1


def test_malformed_entries_are_skipped() -> None:
    got = health.sightings_from_answer({"foreign": [OLLAMA_LIKE, {"pid": "1", "gpu": 0, "mib": 5}, "x",
                                                    {"pid": 3, "gpu": 1, "mib": True}]})
    assert [(s.pid, s.gpu, s.mib, s.name) for s in got] == [(4242, 0, 10800, "python3 (bob)")]
    assert health.sightings_from_answer({"foreign": None}) == []


def test_missing_node_name(cluster: Cluster) -> None:
    assert health.main({"GPUARB_CONFIG": str(cluster.config)}, adapter=FakeAdapter()) == 0
    assert "cannot identify the node" in cluster.log()


def test_corrupt_state_file_is_a_fresh_start(cluster: Cluster, daemon_factory: Factory) -> None:
    (cluster.state_dir / "health").mkdir(parents=True)
    (cluster.state_dir / "health" / "n1.json").write_text("{not json")
    _daemon(daemon_factory, [OLLAMA_LIKE])
    assert health.main(_env(cluster), adapter=FakeAdapter()) == 0
