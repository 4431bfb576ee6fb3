"""Fixtures for the daemon tests: the test cluster's inventory with a temp ledger, state and fake
telemetry overlay, a fake Slurm adapter, and handlers over them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from slurm_gpuarb import logsink, protocol
from slurm_gpuarb.config import Config, load
from slurm_gpuarb.daemon.handlers import Handlers, Peer
from slurm_gpuarb.slurm.base import JobInfo, SlurmAdapter, SlurmError

REPO = Path(__file__).resolve().parents[2]
INVENTORY = REPO / "docker-slurm" / "inventory.toml"
ROOT = Peer(uid=0, gid=0, pid=1)
USER = Peer(uid=1000, gid=1000, pid=4321)


def job(job_id: str, node: str = "n1", *, state: str = "RUNNING", restart_count: int = 0,
        shards: int | None = None) -> JobInfo:
    """A JobInfo as the adapter would report it."""
    return JobInfo(job_id=job_id, state=state, restart_count=restart_count,
                   nodes=(node,) if state != "PENDING" else (), comment="", partition="batch", qos="normal",
                   user="alice", uid=1000, tres_per_node=f"gres:shard:{shards}" if shards else "gres:gpu:1",
                   gres_shards=shards)


@dataclass
class FakeSlurm(SlurmAdapter):
    """Slurm as the tests script it: ``known`` jobs, and a switch that makes every call fail."""

    known: dict[str, JobInfo] = field(default_factory=dict)
    down: bool = False
    calls: list[tuple[str, ...]] = field(default_factory=list)
    name: str = "fake"

    def add(self, *infos: JobInfo) -> None:
        for info in infos:
            self.known[info.job_id] = info

    def jobs(self, job_ids: Iterable[str | int] | None = None) -> list[JobInfo]:
        ids = None if job_ids is None else [str(j) for j in job_ids]
        self.calls.append(tuple(ids or ()))
        if self.down:
            raise SlurmError("squeue: slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
        return [j for j in self.known.values() if ids is None or j.job_id in ids]

    def drain(self, node: str, reason: str) -> None:
        raise NotImplementedError

    def resume(self, node: str) -> None:
        raise NotImplementedError

    def node_state(self, node: str) -> str:
        return "IDLE"


@pytest.fixture(autouse=True)
def log_file(tmp_path: Path) -> Iterator[Path]:
    """Log lines go to a file the test can read, never to this machine's syslog."""
    path = tmp_path / "log" / "gpuarb.log"
    logsink.configure(log_file=path, syslog=False)
    yield path
    logsink.configure(log_file=None, syslog=None)


@pytest.fixture
def fake_state(tmp_path: Path) -> Path:
    path = tmp_path / "fake"
    path.mkdir()
    return path


@pytest.fixture
def cfg(tmp_path: Path, fake_state: Path) -> Config:
    """docker-slurm/inventory.toml (n1 8×H100 whole, n2 3090 Ti shards + ollama, n3 H100 7×1g.10gb MIG)
    with a fresh SQLite ledger, state dir, socket, log file and fake-telemetry overlay under tmp_path."""
    return load(INVENTORY, env={}, overrides={
        "node": "n1",
        "ledger_url": f"sqlite:///{tmp_path / 'ledger.db'}",
        "state_dir": str(tmp_path / "state"),
        "socket_path": str(tmp_path / "run" / "gpuarb.sock"),
        "log_file": str(tmp_path / "log" / "gpuarb.log"),
        "fake_state": str(fake_state),
        "gres_map_dir": str(tmp_path / "gres-map"),
    })


@pytest.fixture
def slurm() -> FakeSlurm:
    return FakeSlurm()


@pytest.fixture
def handlers(cfg: Config, slurm: FakeSlurm) -> Iterator[Handlers]:
    h = Handlers(cfg, slurm=slurm, nodes=("n1", "n2", "n3"))
    yield h
    h.close()


def start_msg(job_id: str = "12", node: str = "n1", gres: str | None = "0", comment: str | None = None, *,
              restart_count: int = 0, uid: int = 1000, partition: str | None = None) -> protocol.JobStartMsg:
    return protocol.JobStartMsg(job_id=job_id, restart_count=restart_count, node=node, uid=uid, comment=comment,
                                gres=gres, user="alice", partition=partition)


def answer(h: Handlers, msg: protocol.Message, peer: Peer = ROOT) -> dict[str, Any]:
    """The handler's answer, checked to be one the protocol can carry (and decoded as a client would)."""
    response = h.handle(msg, peer)
    line = protocol.encode(response)
    if response.get("ok"):
        return protocol.decode_response(line, op=msg.op)
    return response
