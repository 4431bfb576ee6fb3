"""What an inventory means to Slurm: every node's GRES devices and every partition line.

The computed half of ``gpuarb render`` (:mod:`slurm_gpuarb.render` formats it): per-GPU shard
counts (usable VRAM ÷ quantum), device files (the ``/dev/nvidiaN`` minor, never assumed equal to
the NVML index), MIG devices from discovery (or stand-ins on fake test nodes), the slurm.conf
``Gres=`` sums and the partitions' tiers and preemption. Pure: no templates, no files written.
The daemon's GRES-index map (``daemon/jobs.py``) calls :func:`plan_node` too, so both read the
same ``gres.conf`` order.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from . import migplan, skus
from .config import GPU_MODES, Config, GpuConfig, NodeConfig, telemetry_for
from .discover import DiscoveredGpu, Discovery
from .errors import CapacityError, RenderError
from .model import Policy, Reservation
from .qos import PREEMPT_MODES

__all__ = [
    "GRES_MAP_VERSION",
    "MPS_COUNT_PER_GPU",
    "SHIM_NAMES",
    "GresDevice",
    "HookPaths",
    "NodeAddressing",
    "NodePlan",
    "PartitionPlan",
    "Plan",
    "ShardBudget",
    "gres_map",
    "gres_type",
    "mig_layout",
    "plan",
    "plan_node",
    "plan_partitions",
    "shard_budget",
    "static_reservations_mib",
]

GRES_MAP_VERSION: Final = 1
MPS_COUNT_PER_GPU = 100  # gres/mps counts percent of one GPU's compute

# Names Slurm reads as one token: no spaces, '#', '=', ',' or ':' (they split GRES specs).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
# A path as slurm.conf/gres.conf can hold it: absolute, no whitespace, no '#' (starts a comment).
_PATH_RE = re.compile(r"/[^\s#,]*", re.ASCII)
_MEM_SUFFIX_RE = re.compile(r"-\d+g$")


# --------------------------------------------------------------------------- computed plan


@dataclass(frozen=True)
class ShardBudget:
    """How one GPU's shard count follows from its memory (all MiB; usable never below zero)."""

    total_mib: int
    reserved_mib: int
    margin_mib: int
    static_reservations_mib: int
    quantum_mib: int

    @property
    def usable_mib(self) -> int:
        return skus.usable_mib(self.total_mib, self.reserved_mib, self.margin_mib, self.static_reservations_mib)

    @property
    def count(self) -> int:
        return skus.shards_for(self.usable_mib, self.quantum_mib)

    def explain(self) -> str:
        return (f"{self.total_mib} total - {self.reserved_mib} driver - {self.margin_mib} margin"
                f" - {self.static_reservations_mib} reserved = {self.usable_mib} MiB"
                f" / {self.quantum_mib} MiB = {self.count} shards")


@dataclass(frozen=True)
class GresDevice:
    """One ``gres.conf`` line: a GRES bound to one device file (``File=``), or to several
    (``MultipleFiles=``: a MIG instance's parent GPU and its GI and CI capability files)."""

    name: str  # gpu | shard | mps
    file: str  # the (parent) /dev/nvidiaN
    type: str | None = None
    count: int | None = None
    note: str = ""  # a comment line above it (why the count is what it is)
    files: tuple[str, ...] = ()  # MultipleFiles=, when set
    gpu_index: int | None = None  # the NVML index of the (parent) GPU
    uuid: str | None = None  # the GPU's UUID, when discovered
    mig_uuid: str | None = None  # the MIG device's UUID, when discovered

    @property
    def multiple_files(self) -> str:
        """The ``MultipleFiles=`` value, ``""`` for a one-file line."""
        return ",".join(self.files)


@dataclass(frozen=True)
class NodePlan:
    """Everything rendered for one node."""

    name: str
    devices: tuple[GresDevice, ...]
    gres: str  # slurm.conf ``Gres=`` value, "" for a CPU node
    params: str = ""  # cluster-local node parameters (NodeHostname=… Port=…)


@dataclass(frozen=True)
class PartitionPlan:
    name: str
    nodes: str
    default: bool
    priority_tier: int
    preempt_mode: str  # REQUEUE or CANCEL (a class is preemptible) | OFF
    classes: str
    mode: str


@dataclass(frozen=True)
class HookPaths:
    """Absolute paths of the installed hook programs; ``None`` leaves that hook out.

    Slurm runs Prolog, Epilog and the Slurmctld variants with no ``PATH``: these must be
    absolute. ``PrologEpilogTimeout`` is only a backstop (Slurm's default is 65534 s); the
    hooks keep their own, shorter deadline.
    """

    prolog: str | None = None
    epilog: str | None = None
    task_prolog: str | None = None
    prolog_slurmctld: str | None = None
    epilog_slurmctld: str | None = None
    health_check: str | None = None
    health_check_interval_s: int = 60
    prolog_epilog_timeout_s: int = 60

    @classmethod
    def at(cls, root: str | os.PathLike[str], *, installed_only: bool = False) -> HookPaths:
        """Every shim under ``root`` (its ``prolog/`` and ``epilog/`` folders) by its conventional
        name (:data:`SHIM_NAMES`). ``installed_only`` leaves out the shims not there (yet)."""
        base = Path(root)

        def pick(key: str) -> str | None:
            path = base / SHIM_NAMES[key]
            return str(path) if not installed_only or path.is_file() else None

        return cls(prolog=pick("prolog"), epilog=pick("epilog"), task_prolog=pick("task_prolog"),
                   prolog_slurmctld=pick("prolog_slurmctld"), epilog_slurmctld=pick("epilog_slurmctld"),
                   health_check=pick("health_check"))

    def lines(self) -> list[tuple[str, str]]:
        """``(slurm.conf key, value)`` pairs for the hooks that are set."""
        keys = (("Prolog", self.prolog), ("Epilog", self.epilog), ("TaskProlog", self.task_prolog),
                ("PrologSlurmctld", self.prolog_slurmctld), ("EpilogSlurmctld", self.epilog_slurmctld),
                ("HealthCheckProgram", self.health_check))
        out = [(k, _check_path(v, k)) for k, v in keys if v is not None]
        if out:
            out.append(("PrologEpilogTimeout", str(self.prolog_epilog_timeout_s)))
        if self.health_check is not None:
            # ANY: also idle nodes, where a foreign VRAM holder is found before a job lands.
            out += [("HealthCheckInterval", str(self.health_check_interval_s)), ("HealthCheckNodeState", "ANY")]
        return out


# Shim file names relative to the install root (the repo's prolog/ and epilog/ folders).
SHIM_NAMES: Mapping[str, str] = {
    "prolog": "prolog/gpuarb-prolog",
    "task_prolog": "prolog/gpuarb-task-prolog",
    "prolog_slurmctld": "prolog/gpuarb-prolog-slurmctld",
    "health_check": "prolog/gpuarb-health-check",
    "epilog": "epilog/gpuarb-epilog",
    "epilog_slurmctld": "epilog/gpuarb-epilog-slurmctld",
}


@dataclass(frozen=True)
class NodeAddressing:
    """Cluster-local node parameters for the ``NodeName`` lines.

    A real cluster resolves node names and needs none of these. The loopback test cluster
    runs every slurmd on one host: each node line then names the host, the address and a
    port of its own (``port_base`` + the node's position in the inventory).
    """

    hostname: str | None = None
    addr: str | None = None
    port_base: int | None = None

    def params(self, position: int) -> str:
        parts = []
        if self.hostname is not None:
            parts.append(f"NodeHostname={_check_name(self.hostname, 'node hostname')}")
        if self.addr is not None:
            parts.append(f"NodeAddr={_check_name(self.addr, 'node address')}")
        if self.port_base is not None:
            parts.append(f"Port={self.port_base + position}")
        return " ".join(parts)


# --------------------------------------------------------------------------- arithmetic


def gres_type(sku_key: str) -> str:
    """The GRES type for a SKU: its key without the memory suffix (``a100-80g`` → ``a100``).

    Slurm matches ``--gres=gpu:<type>:N`` against it; the memory size is what leases
    express, so GPUs of one family share a type."""
    t = _MEM_SUFFIX_RE.sub("", sku_key.lower())
    if not _NAME_RE.fullmatch(t) or t.isdigit():
        raise RenderError(f"SKU '{sku_key}' gives no usable GRES type '{t}' (Slurm needs a non-numeric name "
                          "of letters, digits, '.', '-' or '_'); fix the sku key in the inventory")
    return t


def static_reservations_mib(reservations: Iterable[Reservation], node: str, gpu: int) -> int:
    """MiB of static standing reservations on one GPU (``node=None`` means every node).

    Holder-mode reservations are held by a job at run time, so they are not subtracted."""
    return sum(r.size_mib for r in reservations
               if r.mode == "static" and r.gpu == gpu and (r.node is None or r.node == node))


def shard_budget(sku_key: str, policy: Policy, static_reservations: int = 0) -> ShardBudget:
    """The shard count of one GPU: (total − driver reserve − margin − static reservations) // quantum."""
    try:
        s = skus.sku(sku_key)
    except CapacityError as e:
        raise RenderError("the inventory names a GPU SKU this version does not know") from e
    return ShardBudget(s.total_mib, s.reserved_mib, policy.margin_mib, static_reservations, policy.quantum_mib)


# --------------------------------------------------------------------------- planning


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise RenderError(f"{what} '{value}' cannot be written to a Slurm config (use letters, digits, '.', '-', '_')")
    return value


def _check_path(value: str, what: str) -> str:
    if not _PATH_RE.fullmatch(value):
        raise RenderError(f"{what} path '{value}' cannot be written to a Slurm config "
                          "(it must be absolute, without spaces, commas or '#')")
    return value



def _device_file(dev_dir: str, node: str, number: int, name: str = "nvidia") -> str:
    # "{node}" lets several slurmd on one host each see their own fake devices.
    return _check_path(f"{dev_dir.replace('{node}', node).rstrip('/')}/{name}{number}", f"device of node {node}")


def _discovered(node: str, gpu: GpuConfig, discovery: Discovery | None) -> DiscoveredGpu | None:
    """The discovered twin of an inventory GPU, checked against it (None without discovery)."""
    if discovery is None:
        return None
    found = discovery.gpu(gpu.index)
    again = f"fix the inventory or run gpuarb discover on {node} again"
    if found is None:
        raise RenderError(f"node {node} gpu {gpu.index} is in the inventory but not in its discovery file "
                          f"(which has GPUs {[g.index for g in discovery.gpus]}); {again}")
    if found.sku is not None and found.sku != gpu.sku.lower():
        raise RenderError(f"node {node} gpu {gpu.index} is {gpu.sku} in the inventory but discovery found a "
                          f"{found.sku} ({found.name}); {again}")
    if gpu.minor is not None and gpu.minor != found.minor:
        raise RenderError(f"node {node} gpu {gpu.index}: the inventory says /dev/nvidia{gpu.minor} but discovery "
                          f"found /dev/nvidia{found.minor}; drop or fix minor in the inventory")
    if found.mig_enabled and gpu.mode != "mig":
        raise RenderError(f"node {node} gpu {gpu.index} is in MIG mode on the node but {gpu.mode} in the inventory; "
                          f"disable MIG there (nvidia-mig-parted apply -c gpuarb-{node}) or set mode = \"mig\"")
    return found


def _layout_text(profiles: Counter[str]) -> str:
    return " + ".join(f"{n}x{p}" for p, n in sorted(profiles.items())) or "no instances"


def _discovered_mig(node: str, gpu: GpuConfig, found: DiscoveredGpu, dev_dir: str) -> list[GresDevice]:
    """A MIG GPU's instances as discovery found them, in NVML's enumeration order."""
    live, planned = Counter(m.profile for m in found.mig), Counter(gpu.mig)
    if not found.mig_enabled or live != planned:
        state = _layout_text(live) if found.mig_enabled else "MIG off"
        raise RenderError(f"node {node} gpu {gpu.index}: its live MIG layout ({state}) is not the inventory's "
                          f"({_layout_text(planned)}); apply it (nvidia-mig-parted apply -f "
                          f"/etc/nvidia-mig-manager/config.yaml -c gpuarb-{node}), then run gpuarb discover again")
    parent = _device_file(dev_dir, node, found.minor)
    caps = dev_dir.rstrip("/") + "/nvidia-caps"
    return [GresDevice(
        "gpu", parent, type=_check_name(m.profile, f"MIG profile on node {node} gpu {gpu.index}"),
        files=(parent, _device_file(caps, node, m.gi_minor, "nvidia-cap"), _device_file(caps, node, m.ci_minor,
                                                                                         "nvidia-cap")),
        note=f"gpu{gpu.index} {gpu.sku} MIG {m.profile} GI {m.gi_id} CI {m.ci_id}: {m.uuid}",
        gpu_index=gpu.index, uuid=found.uuid, mig_uuid=m.uuid,
    ) for m in found.mig]


def plan_node(node: NodeConfig, cfg: Config, *, dev_dir: str = "/dev", discovery: Discovery | None = None) -> NodePlan:
    """The GRES of one node: its ``gres.conf`` devices and its ``slurm.conf`` ``Gres=`` value.

    ``discovery`` (what ``gpuarb discover`` found on the node) supplies the ``/dev/nvidiaN``
    minors and the MIG devices; a MIG GPU without it is a :class:`RenderError`, except on a
    ``fake:`` node, whose instances get one stand-in device file each (the test cluster)."""
    name = _check_name(node.name, "node name")
    devices: list[GresDevice] = []
    gpu_counts: dict[str, int] = {}
    shards = 0
    mps = 0
    found = [_discovered(name, g, discovery) for g in node.gpus]
    minors = [f.minor if f is not None else g.minor if g.minor is not None else g.index
              for g, f in zip(node.gpus, found, strict=True)]
    # MIG stand-ins are numbered after the node's other devices, in layout order: on a
    # MIG-only node Slurm's GRES index k is then MIG instance k.
    next_standin = max((m for g, m in zip(node.gpus, minors, strict=True) if g.mode != "mig"), default=-1) + 1
    for gpu, minor, twin in zip(node.gpus, minors, found, strict=True):
        if gpu.mode not in GPU_MODES:
            raise RenderError(f"node {name} gpu {gpu.index}: unknown mode '{gpu.mode}' "
                              f"(expected {', '.join(GPU_MODES)})")
        if gpu.mode == "mig":
            layout = mig_layout(name, gpu)
            if twin is not None:
                mig = _discovered_mig(name, gpu, twin, dev_dir)
            elif telemetry_for(cfg, name).startswith("fake:"):
                # Test-cluster stand-ins: one fake device file per MIG instance.
                mig = [GresDevice("gpu", _device_file(dev_dir, name, next_standin + j), type=profile,
                                  note=f"gpu{gpu.index} {gpu.sku} MIG instance {j}: {profile}", gpu_index=gpu.index)
                       for j, profile in enumerate(layout)]
                next_standin += len(mig)
            else:
                # MultipleFiles= needs the node's own minors and capability files: a guessed
                # device file would hand out the wrong GPU.
                raise RenderError(f"node {name} gpu {gpu.index} is in MIG mode: its gres.conf lines need the node's "
                                  f"live MIG devices; run `gpuarb discover --out {name}.json` on {name} and render "
                                  "with --discovery DIR (the directory holding it)")
            devices += mig
            for d in mig:
                assert d.type is not None
                gpu_counts[d.type] = gpu_counts.get(d.type, 0) + 1
            continue
        t = gres_type(gpu.sku)
        file = _device_file(dev_dir, name, minor)
        uuid = twin.uuid if twin is not None else None
        devices.append(GresDevice("gpu", file, type=t, note=f"gpu{gpu.index} {gpu.sku} ({gpu.mode})",
                                  gpu_index=gpu.index, uuid=uuid))
        gpu_counts[t] = gpu_counts.get(t, 0) + 1
        if gpu.mode == "shard":
            budget = shard_budget(gpu.sku, cfg.policy, static_reservations_mib(cfg.reservations, name, gpu.index))
            if budget.count == 0:
                raise RenderError(f"node {name} gpu {gpu.index} ({gpu.sku}) has no room for one shard: "
                                  f"{budget.explain()}; lower [policy] margin, the quantum or the reservations")
            devices.append(GresDevice("shard", file, count=budget.count, note=f"gpu{gpu.index}: {budget.explain()}",
                                      gpu_index=gpu.index, uuid=uuid))
            shards += budget.count
        elif gpu.mode == "mps":
            devices.append(GresDevice("mps", file, count=MPS_COUNT_PER_GPU, gpu_index=gpu.index, uuid=uuid))
            mps += MPS_COUNT_PER_GPU
    gres = [f"gpu:{t}:{n}" for t, n in gpu_counts.items()]
    if shards:
        gres.append(f"shard:{shards}")
    if mps:
        gres.append(f"mps:{mps}")
    return NodePlan(name, tuple(devices), ",".join(gres))


def mig_layout(node: str, gpu: GpuConfig) -> tuple[str, ...]:
    """The MIG profiles of a MIG-mode GPU in inventory order, checked against its SKU: each
    profile exists, and together they have a valid placement (:func:`migplan.check`)."""
    if not gpu.mig:
        raise RenderError(f"node {node} gpu {gpu.index} is in MIG mode but has no layout; "
                          'add mig = ["7x1g.10gb"] (one profile per instance) to it')
    try:
        s = skus.sku(gpu.sku)
        migplan.check(s, gpu.mig)
        names = [skus.mig_profile(s, name).name for name in gpu.mig]
    except CapacityError as e:
        raise RenderError(f"node {node} gpu {gpu.index}: its MIG layout does not fit its SKU") from e
    return tuple(_check_name(p, f"MIG profile on node {node} gpu {gpu.index}") for p in names)


def _check_reservations(cfg: Config) -> None:
    gpus = {(n.name, g.index) for n in cfg.nodes for g in n.gpus}
    for r in cfg.reservations:
        if r.node is not None and (r.node, r.gpu) not in gpus:
            raise RenderError(f"reservation '{r.name}' is on node {r.node} gpu {r.gpu}, which the inventory "
                              "does not have; fix its node/gpu")


def _preempt_mode(cfg: Config, mode: str) -> str:
    """REQUEUE or CANCEL; SUSPEND is refused while the inventory has GPUs, saying why."""
    wanted = mode.upper()
    if wanted == "SUSPEND" and any(n.gpus for n in cfg.nodes):
        raise RenderError("PreemptMode=SUSPEND is refused for GPU partitions: a suspended job keeps its GPU memory, "
                          "so the job that preempted it finds none free (it waits or runs out of memory); use "
                          "REQUEUE or CANCEL")
    if wanted not in PREEMPT_MODES:
        raise RenderError(f"PreemptMode {mode[:20]!r} is not one of {', '.join(PREEMPT_MODES)}")
    return wanted


def plan_partitions(cfg: Config, *, preempt_mode: str = "REQUEUE") -> list[PartitionPlan]:
    """``PartitionName`` lines (config.load has checked their nodes, classes and default).

    A partition is as preemptible as the weakest class it admits: its ``PriorityTier`` ranks
    the lowest class priority among its classes (partition-priority preemption needs only the
    order), and it is requeued (or cancelled: ``preempt_mode``) when any of its classes is
    preemptible, never suspended (a suspended job keeps its GPU memory)."""
    mode = _preempt_mode(cfg, preempt_mode)
    classes = cfg.policy.classes
    floor = {p.name: min((classes[c].priority for c in p.classes), default=0) for p in cfg.partitions}
    tiers = {prio: i + 1 for i, prio in enumerate(sorted(set(floor.values())))}
    return [PartitionPlan(
        name=_check_name(p.name, "partition name"),
        nodes=",".join(_check_name(n, "node name") for n in p.nodes),
        default=p.default,
        priority_tier=tiers[floor[p.name]],
        preempt_mode=mode if any(classes[c].preemptible for c in p.classes) else "OFF",
        classes=",".join(p.classes),
        mode=p.mode,
    ) for p in cfg.partitions]



# --------------------------------------------------------------------------- the whole plan


@dataclass(frozen=True)
class Plan:
    """Everything the templates format, computed once from the inventory."""

    nodes: tuple[NodePlan, ...]
    partitions: tuple[PartitionPlan, ...]


def plan(cfg: Config, *, dev_dir: str = "/dev", discovery: Mapping[str, Discovery] | None = None,
         preempt_mode: str = "REQUEUE") -> Plan:
    """Compute every node's GRES and every partition line (raises RenderError on a bad inventory).

    ``dev_dir`` holds the ``nvidiaN`` device files; ``{node}`` in it is replaced by the node
    name (the loopback test cluster gives each node its own fake devices)."""
    _check_reservations(cfg)
    found = discovery or {}
    return Plan(tuple(plan_node(n, cfg, dev_dir=dev_dir, discovery=found.get(n.name)) for n in cfg.nodes),
                tuple(plan_partitions(cfg, preempt_mode=preempt_mode)))


def gres_map(node: NodePlan, autodetect: str = "off") -> dict[str, Any]:
    """The Prolog's map of one node: Slurm GRES index (position among the node's ``gpu`` lines)
    → NVML index, GPU UUID, MIG UUID (``None`` for a whole GPU) and the device files."""
    gpus = [d for d in node.devices if d.name == "gpu"]
    return {"version": GRES_MAP_VERSION, "node": node.name, "autodetect": autodetect,
            "gres": [{"index": k, "gpu": d.gpu_index, "type": d.type, "uuid": d.uuid, "mig_uuid": d.mig_uuid,
                      "files": list(d.files or (d.file,))} for k, d in enumerate(gpus)]}


