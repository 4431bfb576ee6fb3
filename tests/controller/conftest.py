"""Fixtures of the controller tests: an in-memory Slurm, a real SQLite ledger, a settable clock and probe.

:class:`FakeSlurm` keeps jobs as :class:`JobInfo` records and records every job-changing call; a test
moves jobs through their states itself (``set``), so nothing here sleeps or guesses Slurm's timing.
The config mirrors the test cluster's inventory (docker-slurm/inventory.toml) with the Ollama on n2
held by a holder job, and a MIG node with two profiles so a MIG lease can shrink.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slurm_gpuarb.config import Config, load
from slurm_gpuarb.controller import Controller
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.model import Reservation
from slurm_gpuarb.slurm.base import JobInfo, JobNotPending, SlurmAdapter, SlurmError
from slurm_gpuarb.slurm.cli import shard_count

T0 = 1_800_000_000.0  # the fake clock's start (Unix seconds)
AGENT_UID = 0
USER_UID = 1000

INVENTORY = """\
version = 1
[ledger]
url = "sqlite:///{dir}/ledger.db"
[daemon]
state_dir = "{dir}/run"
log_file = "{dir}/gpuarb.log"

[policy]
margin = "1GiB"
quantum = "512MiB"
default_class = "batch"

[classes.llm]
priority = 1000
preemptible = false

[classes.batch]
priority = 10
preemptible = true
may_degrade = true

[classes.fixed]
priority = 5
preemptible = true
may_degrade = false

[[reservations]]
name = "ollama"
size = "12GiB"
node = "n2"
gpu = 0
mode = "holder"
match = {{ process = "ollama" }}
probe = {{ kind = "ollama", url = "http://127.0.0.1:11434" }}
grace = "5m"

[[nodes]]
name = "n1"
gpus = [{{ count = 2, sku = "h100-80g", mode = "whole" }}]

[[nodes]]
name = "n2"
gpus = [{{ index = 0, sku = "rtx3090ti-24g", mode = "shard" }}]

[[nodes]]
name = "n3"
gpus = [{{ index = 0, sku = "h100-80g", mode = "mig", mig = ["3g.40gb", "3x1g.10gb"] }}]

[[partitions]]
name = "batch"
nodes = ["n1", "n2"]
classes = ["batch", "fixed"]
default = true

[[partitions]]
name = "llm"
nodes = ["n1", "n2"]
classes = ["llm"]

[[partitions]]
name = "shard"
nodes = ["n2"]
mode = "shard"

[[partitions]]
name = "mig"
nodes = ["n3"]
mode = "mig"
"""


def make_job(job_id: str, *, state: str = "PENDING", comment: str = "", reason: str = "",
             submit: float | None = T0, start: float | None = None, tres: str = "", partition: str = "shard",
             nodes: Sequence[str] = (), restart: int = 0, name: str = "wrap", uid: int = USER_UID,
             qos: str = "") -> JobInfo:
    """A job as the cli adapter would report it."""
    return JobInfo(job_id=job_id, state=state, restart_count=restart, nodes=tuple(nodes), comment=comment,
                   partition=partition, qos=qos, user="root" if uid == 0 else "alice", uid=uid, tres_per_node=tres,
                   gres_shards=shard_count(tres), submit_time=submit, start_time=start, state_reason=reason, name=name)


def sbatch_options(args: Sequence[str]) -> dict[str, str]:
    """``--key value`` pairs of sbatch arguments; a flag without a value (``--no-requeue``) maps to ``""``."""
    opts: dict[str, str] = {}
    i = 0
    while i < len(args):
        if i + 1 < len(args) and not args[i + 1].startswith("--"):
            opts[args[i]] = args[i + 1]
            i += 2
        else:
            opts[args[i]] = ""
            i += 1
    return opts


@dataclass
class FakeSlurm(SlurmAdapter):
    """Slurm in memory. ``fail``: the next listing raises; ``refuse``: job-changing calls raise it."""

    name = "fake"
    job_list: list[JobInfo] = field(default_factory=list)
    updates: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    submitted: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    fail: Exception | None = None
    refuse: SlurmError | None = None
    next_id: int = 100
    clock: Callable[[], float] = lambda: T0  # the submit time of jobs it is given

    def add(self, *jobs: JobInfo) -> None:
        self.job_list.extend(jobs)

    def get(self, job_id: str) -> JobInfo:
        return next(j for j in self.job_list if j.job_id == job_id)

    def set(self, job_id: str, **changes: object) -> JobInfo:
        job = dataclasses.replace(self.get(job_id), **changes)  # type: ignore[arg-type]
        self.job_list = [job if j.job_id == job_id else j for j in self.job_list]
        return job

    def jobs(self, job_ids: Iterable[str | int] | None = None) -> list[JobInfo]:
        if self.fail is not None:
            raise self.fail
        wanted = None if job_ids is None else {str(j) for j in job_ids}
        return [j for j in self.job_list if wanted is None or j.job_id in wanted]

    def drain(self, node: str, reason: str) -> None:
        raise AssertionError("the controller never drains")

    def resume(self, node: str) -> None:
        raise AssertionError("the controller never resumes")

    def node_state(self, node: str) -> str:
        return "IDLE"

    def update_job(self, job_id: str, **fields: str) -> None:
        self.updates.append((job_id, dict(fields)))
        if self.refuse is not None:
            raise self.refuse
        job = self.get(job_id)
        if job.state != "PENDING":
            raise JobNotPending(f"could not update job {job_id}: the job is no longer pending")
        tres = fields.get("TresPerNode", job.tres_per_node)
        self.set(job_id, comment=fields.get("Comment", job.comment), tres_per_node=tres, gres_shards=shard_count(tres))

    def submit(self, args: Sequence[str], script: str) -> str:
        self.submitted.append((tuple(args), script))
        if self.refuse is not None:
            raise self.refuse
        opts = sbatch_options(args)
        job_id = str(self.next_id)
        self.next_id += 1
        self.add(make_job(job_id, comment=opts.get("--comment", ""), name=opts.get("--job-name", "sbatch"),
                          partition=opts.get("--partition", ""), uid=AGENT_UID, reason="Resources",
                          submit=self.clock(), qos=opts.get("--qos", "")))
        return job_id

    def cancel(self, job_id: str) -> None:
        self.cancelled.append(job_id)
        if self.refuse is not None:
            raise self.refuse
        self.set(job_id, state="CANCELLED")

    def start(self, job_id: str, node: str, *, at: float, shards: int | None = None) -> JobInfo:
        """What the scheduler does: the job runs on ``node`` (with job_submit's shards, when given)."""
        changes: dict[str, object] = {"state": "RUNNING", "nodes": (node,), "start_time": at, "state_reason": ""}
        if shards is not None:
            changes.update(tres_per_node=f"gres:shard:{shards}", gres_shards=shards)
        return self.set(job_id, **changes)


class Clock:
    """A settable clock: ``clock()`` is now, ``clock.advance(s)`` moves it."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@dataclass(frozen=True)
class Status:
    """A probe's answer (the fields the controller reads of services.ServiceStatus)."""

    state: str
    reason: str = "answers"
    observed_vram_mib: int | None = None


class Probe:
    """A settable probe: ``probe.status`` is what every reservation's service answers (None: no probe)."""

    def __init__(self, status: Status | None = None) -> None:
        self.status = status
        self.calls: list[str] = []

    def __call__(self, res: Reservation) -> Status | None:
        self.calls.append(res.name)
        return self.status


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    path = tmp_path / "gpuarb.toml"
    path.write_text(INVENTORY.format(dir=tmp_path), encoding="utf-8")
    return load(path, env={})


@pytest.fixture
def ledger(cfg: Config) -> Iterator[Ledger]:
    with Ledger.open(cfg.ledger_url) as opened:
        yield opened


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def slurm(clock: Clock) -> FakeSlurm:
    return FakeSlurm(clock=clock)


@pytest.fixture
def probe() -> Probe:
    return Probe(Status("up", "llama3:8b loaded", 11059))


@pytest.fixture
def controller(cfg: Config, ledger: Ledger, slurm: FakeSlurm, clock: Clock, probe: Probe) -> Controller:
    return Controller(cfg, ledger=ledger, slurm=slurm, probe_fn=probe, clock=clock, uid=AGENT_UID)
