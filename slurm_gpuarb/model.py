"""Frozen dataclasses that cross every module boundary.

Nothing here does I/O. Sizes are whole MiB (``int``) everywhere inside the
project; only the spec parser and the config loader read human units.
Telemetry handles, ORM rows and HTTP answers never leave their modules: they
are turned into these types first.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

MIB_PER_GIB = 1024


class Outcome(enum.StrEnum):
    """What the arbiter answered to one request."""

    GRANT = "grant"  # the full size, now
    DEGRADE = "degrade"  # less than asked, at least ``min``, now
    WAIT = "wait"  # not now; could fit later (queue, retry)
    DENY = "deny"  # never on this node as configured (too big, unknown class, …)
    REVOKE = "revoke"  # an existing lease is taken back (LLM over batch, TTL, admin)


class LeaseState(enum.StrEnum):
    """A lease's state machine: granted → released | expired | revoked (all final)."""

    GRANTED = "granted"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"


class Share(enum.StrEnum):
    SHARD = "shard"
    MPS = "mps"
    EXCLUSIVE = "exclusive"


class Engine(enum.StrEnum):
    VLLM = "vllm"
    OLLAMA = "ollama"
    TF = "tf"
    TORCH = "torch"


class TenantKind(enum.StrEnum):
    LEASE = "lease"
    RESERVATION = "reservation"
    FOREIGN = "foreign"


# --------------------------------------------------------------------------- lease spec


@dataclass(frozen=True)
class Vram:
    """A memory size as written in a spec: absolute MiB, or a percent of the GPU's *total* memory."""

    mib: int | None = None
    percent: int | None = None

    def __post_init__(self) -> None:
        if (self.mib is None) == (self.percent is None):
            raise ValueError("Vram needs exactly one of mib or percent")

    def resolve(self, total_mib: int) -> int:
        """Absolute MiB on a GPU with ``total_mib`` of memory (percent rounds down)."""
        if self.mib is not None:
            return self.mib
        assert self.percent is not None
        return total_mib * self.percent // 100

    def __str__(self) -> str:
        return f"{self.mib}MiB" if self.mib is not None else f"{self.percent}%"


@dataclass(frozen=True)
class LeaseSpec:
    """A parsed lease spec. ``None`` means "not given" (policy defaults apply later).

    ``shards`` is only ever set by job_submit in the canonical ``gpuarb/1:`` form: it
    carries the shard count Slurm was asked for, because the Prolog cannot see it.
    """

    vram: Vram | None = None
    gpus: int | None = None
    prio: str | None = None
    min: Vram | None = None
    mig: str | None = None  # a profile name such as "1g.10gb", or "any"
    share: Share | None = None
    ttl_s: int | None = None
    wait_s: int | None = None
    engine: Engine | None = None
    shards: int | None = None


# --------------------------------------------------------------------------- telemetry


@dataclass(frozen=True)
class MigInstance:
    """One MIG GPU instance (+ its compute instance) on a parent GPU."""

    uuid: str
    profile: str  # e.g. "1g.10gb"
    memory_mib: int
    gi_id: int
    ci_id: int = 0
    placement_start: int | None = None
    placement_size: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    """One physical GPU as telemetry sees it.

    ``index`` is the NVML index; ``minor`` is the ``/dev/nvidiaN`` number. They can
    differ, and Slurm's GRES index is yet another thing: never assume they agree.
    """

    index: int
    uuid: str
    name: str
    total_mib: int
    reserved_mib: int  # driver/firmware reserved (NVML v2 ``reserved``)
    used_mib: int
    minor: int | None = None
    sku: str | None = None  # key into skus.SKUS when known
    pci_bus_id: str = ""
    mig_enabled: bool = False
    mig_instances: tuple[MigInstance, ...] = ()


@dataclass(frozen=True)
class GpuProcess:
    """A process holding GPU memory. Fields a backend cannot know stay ``None``;
    attribution fills ``job_id`` from ``/proc/PID/cgroup`` for real processes."""

    pid: int
    gpu_index: int
    used_mib: int
    name: str = ""
    uid: int | None = None
    user: str | None = None
    mig_uuid: str | None = None
    job_id: str | None = None


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class ClassPolicy:
    """A priority class (``prio=`` in a spec)."""

    name: str
    priority: int
    preemptible: bool
    may_degrade: bool
    mps_thread_percent: int | None = None  # CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for share=mps leases
    qos: str | None = None  # Slurm QoS this class maps to (defaults to the class name)


@dataclass(frozen=True)
class Matcher:
    """How a standing reservation recognises its own processes (any field that is set must match)."""

    process: str | None = None  # process name (comm), exact
    user: str | None = None
    pidfile: str | None = None


@dataclass(frozen=True)
class Probe:
    """How to ask an inference server over HTTP whether it is up (``gpuarb services``, the controller).

    ``url`` is ``http://HOST:PORT`` with no path: each kind knows its own endpoints (vLLM ``/health``,
    ``/metrics``, ``/v1/models``; Ollama ``/api/version``, ``/api/ps``; TF Serving ``/v1/models/NAME``).
    ``model`` is the model the service is there for (TF Serving: the model name it is asked about).
    """

    kind: str  # "vllm" | "ollama" | "tfserving"
    url: str
    model: str | None = None
    timeout_s: float = 2.0


@dataclass(frozen=True)
class Reservation:
    """Standing VRAM for a tenant outside the lease protocol (an Ollama on the host, a vLLM service)."""

    name: str
    size_mib: int
    gpu: int = 0
    node: str | None = None  # None: every node of the inventory that has that GPU index
    match: Matcher = field(default_factory=Matcher)
    mode: str = "static"  # "static" (subtracted at render time) | "holder" (held by a holder job)
    probe: Probe | None = None  # required for mode="holder": the controller follows the service's health
    grace_s: float = 300.0  # how long the service may be down before the controller cancels its holder job

    def held_mib(self, observed_mib: int | None) -> int:
        """What the reservation holds: max(declared size, what its service was seen using). Ollama
        unloads idle models (then reports 0) and loads bigger ones on demand: the size is the floor."""
        return max(self.size_mib, observed_mib or 0)


@dataclass(frozen=True)
class ServiceConfig:
    """An inference backend ``gpuarb services`` probes and ``gpuarb route`` may send requests to.

    Every reservation with a probe is one (``reservation`` = its name); ``[[services]]`` adds backends
    that hold no reservation. ``models`` are the model names it serves as declared in the config
    (the probe adds those the backend reports).
    """

    name: str
    probe: Probe
    models: tuple[str, ...] = ()
    reservation: str | None = None


@dataclass(frozen=True)
class ControllerConfig:
    """The controller agent (``gpuarbd --role controller``): how often it reconciles, and its holder jobs.

    ``None`` means "derive it": the holder partition is one holding the reservation's node that admits
    the holder class; the holder class is the non-preemptible class with the highest priority.
    """

    interval_s: float = 15.0
    holder_partition: str | None = None
    holder_class: str | None = None
    shrink: bool = True  # shrink pending jobs that declared min= and waited past wait=
    holder_time_limit: str = "UNLIMITED"  # sbatch --time of holder jobs (Slurm's time format)


@dataclass(frozen=True)
class Policy:
    """Everything the pure arbiter needs besides the request and the GPU states."""

    classes: Mapping[str, ClassPolicy]
    margin_mib: int
    quantum_mib: int
    default_class: str
    max_ttl_s: int | None = None
    default_ttl_s: int | None = None


# --------------------------------------------------------------------------- leases and decisions


@dataclass(frozen=True)
class Lease:
    """A lease as the ledger holds it. Keyed by (job_id, restart_count, node) for Slurm jobs."""

    id: str
    node: str
    gpus: tuple[int, ...]
    vram_mib: int  # per GPU (or the MIG instance's memory)
    prio: str
    priority: int
    preemptible: bool
    state: LeaseState
    created_at: float
    spec: str = ""  # canonical spec text
    min_mib: int | None = None
    mig_uuid: str | None = None
    job_id: str | None = None
    restart_count: int = 0
    owner_uid: int | None = None
    pid: int | None = None
    expires_at: float | None = None
    ended_at: float | None = None
    end_reason: str | None = None
    # The holder-mode reservation this lease holds (the controller's holder job for it: its processes
    # count in this lease, not twice). Set by the daemon only for a privileged job on that GPU.
    holds: str | None = None


@dataclass(frozen=True)
class Tenant:
    """Something that holds memory on one GPU: a live lease, a standing reservation, or a foreign process.

    What it *holds* is max(declared size, observed usage of its processes): a reservation
    and its own process are never counted twice.
    """

    kind: TenantKind
    id: str  # lease id | reservation name | "pid:N"
    size_mib: int  # declared (0 for foreign)
    observed_mib: int = 0
    pids: tuple[int, ...] = ()
    prio: str | None = None
    priority: int = 0
    preemptible: bool = False
    label: str = ""  # process name / user, for explanations
    mig_uuid: str | None = None  # the MIG instance it occupies, on a MIG-enabled GPU
    # The holder-mode reservation this tenant accounts for: on a LEASE tenant, the one its holder job
    # holds (the reservation's processes are in its observed usage); on the reservation's own
    # RESERVATION tenant while no holder job holds it (size 0: only what its processes use).
    reservation: str | None = None

    @property
    def held_mib(self) -> int:
        return max(self.size_mib, self.observed_mib)


@dataclass(frozen=True)
class GpuState:
    """One GPU's capacity at decision time. ``usable`` and ``free`` are derived, never stored."""

    node: str
    gpu: GpuInfo
    margin_mib: int
    tenants: tuple[Tenant, ...] = ()

    @property
    def usable_mib(self) -> int:
        """total − driver reserve − safety margin (standing reservations are tenants)."""
        return max(0, self.gpu.total_mib - self.gpu.reserved_mib - self.margin_mib)

    @property
    def held_mib(self) -> int:
        return sum(t.held_mib for t in self.tenants)

    @property
    def free_mib(self) -> int:
        return max(0, self.usable_mib - self.held_mib)


@dataclass(frozen=True)
class Request:
    """A lease request as the arbiter sees it (the spec plus who and where)."""

    spec: LeaseSpec
    node: str
    now: float
    gpu: int | None = None  # pin to one GPU index (the Prolog knows which GPU Slurm gave)
    job_id: str | None = None
    restart_count: int = 0
    owner_uid: int | None = None
    pid: int | None = None
    # Under Slurm the allocation is already made: the Prolog pins the request to the GPUs (NVML
    # indices) or the MIG instance Slurm gave, and never preempts (Slurm's QoS already did).
    pinned: tuple[int, ...] = ()
    pinned_mig_uuid: str | None = None
    preempt: bool = True
    holds: str | None = None  # the holder-mode reservation the new lease will hold (Lease.holds)


@dataclass(frozen=True)
class Decision:
    """The arbiter's answer, with a reason a person can act on and the inputs behind it.

    ``inputs`` is JSON-serialisable: it is stored in the ledger's decision row and is what
    ``gpuarb explain`` reads back.
    """

    outcome: Outcome
    node: str
    reason: str
    prio: str
    requested_mib: int | None
    granted_mib: int = 0
    gpus: tuple[int, ...] = ()
    mig_uuid: str | None = None
    revoke: tuple[str, ...] = ()  # lease ids an LLM-class grant preempts
    inputs: Mapping[str, Any] = field(default_factory=dict)
    decision_id: int | None = None  # the ledger's row id, once recorded (``gpuarb explain D<id>``)

    @property
    def granted(self) -> bool:
        return self.outcome in (Outcome.GRANT, Outcome.DEGRADE)


@dataclass(frozen=True)
class DecisionRecord:
    """One row of the append-only decision log, as read back from the ledger."""

    id: int
    ts: float
    plane: str  # host | submit | prolog | epilog | agent | cli | health
    action: str  # request | release | expire | revoke | reconcile | …
    outcome: str  # an Outcome value, or released / expired / noop
    node: str | None
    reason: str
    lease_id: str | None = None
    job_id: str | None = None
    restart_count: int = 0
    prio: str | None = None
    requested_mib: int | None = None
    granted_mib: int | None = None
    inputs: Mapping[str, Any] = field(default_factory=dict)
