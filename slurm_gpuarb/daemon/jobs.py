"""How a Slurm job's allocation becomes a lease: GRES indices → GPUs, the lease size, the exports.

The Prolog *verifies and records*: the lease is what Slurm allocated, never more. This module
turns the Prolog's raw inputs (``SLURM_JOB_GPUS``, the job's comment, its partition) into the
spec the arbiter checks against live telemetry, and the arbiter's answer into the grant the
TaskProlog exports. Pure functions; the handler does the I/O.

**GRES index → GPU.** ``SLURM_JOB_GPUS`` holds GRES indices: positions among the node's ``gpu``
lines in ``gres.conf``. The map is the one :func:`slurm_gpuarb.render.plan_node` rendered
``gres.conf`` with (node's GPUs in inventory order, a MIG GPU as one line per instance of its
layout), so the Prolog reads the same order slurmd was given. A GPU's NVML index comes from the
inventory (``index``; ``minor`` is the ``/dev/nvidiaN`` the line names), never from assuming the
numbers agree. The k-th instance of a MIG GPU's layout is the k-th instance telemetry lists on
that GPU (NVML's enumeration order, which the fake presets mirror).

**The lease size**, by how Slurm gave the GPU:

* *shard* (``shards × quantum`` on the GPU of ``SLURM_JOB_GPUS``): the count is the canonical
  comment's ``shards=`` (job_submit wrote what it enforced), else the job's requested GRES as the
  daemon learns it from Slurm, else the spec's ``vram`` rounded up to whole quanta, else one
  quantum (recorded as a guess: the TaskProlog, which sees ``SLURM_SHARDS_ON_NODE``, cross-checks);
* *MIG*: the instance Slurm gave, whole (``pinned_mig_uuid``); a job given several instances
  records the first (one lease per job and node) and exports them all;
* *whole GPU(s)*: the spec's ``vram`` capped at what a GPU could ever lease (total − driver
  reserve − margin − standing reservations on it), or all of that without a spec.

A job is a shard job when its comment says ``shards=``, or Slurm says it asked for shards, or its
partition is a shard partition; else its GPU's own mode decides (a ``whole`` partition on a shard
GPU takes the GPU whole, as Slurm's ``gres/gpu`` hands it out). A spec's ``ttl``/``wait`` do not
apply under Slurm: the job's time limit bounds the lease, the Epilog releases it and the daemon's
reconcile expires it if the Epilog never ran.

**The grant's exports** (:func:`make_grant`): ``GPUARB_VRAM_MB``, ``GPUARB_LEASE_ID``,
``GPUARB_PRIO``; a MIG instance's UUID as ``CUDA_VISIBLE_DEVICES``; the knobs of the spec's
``engine=`` (:mod:`slurm_gpuarb.engines`, against the GPU's total and driver reserve); and for a
``share=mps`` lease ``GPUARB_SHARE=mps``, the class's ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` (when
its policy has ``mps_thread_percent``) and, for a lease on one GPU, that GPU's UUID
(``GPUARB_MPS_DEVICE``) and ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``: the Prolog starts the MPS control
daemon for it (:mod:`slurm_gpuarb.mps`) and keeps the limit only when a server runs. The Prolog's
in-process fallback builds the same grant: it runs these same functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from .. import engines, skus
from ..config import Config, NodeConfig, node_config, reservations_for
from ..errors import NodeFault, ProtocolError, RenderError
from ..gresplan import GRES_MAP_VERSION
from ..model import Decision, Engine, GpuInfo, Lease, LeaseSpec, MigInstance, Share, Vram
from ..protocol import Grant

__all__ = [
    "GresSlot",
    "Sizing",
    "engine_exports",
    "fraction",
    "gres_slots",
    "make_grant",
    "mps_exports",
    "needs_slurm",
    "parse_gres",
    "pick",
    "size_job",
]

MAX_GRES_INDEX: Final = 4095
_GRES_RE: Final = re.compile(r"[0-9]{1,4}(?:-[0-9]{1,4})?", re.ASCII)
_WHOLE_MODES: Final = ("whole", "mps")


@dataclass(frozen=True)
class GresSlot:
    """One ``gpu`` line of a node's ``gres.conf``: GRES index ``gres_index`` is NVML GPU ``gpu_index``
    (its ``mig_position``-th MIG instance when the GPU is in MIG mode)."""

    gres_index: int
    gpu_index: int
    mode: str  # the GPU's mode: whole | shard | mig | mps
    device: str = ""  # the device file gres.conf binds it to (for messages)
    mig_position: int | None = None
    profile: str | None = None
    mig_uuid: str | None = None  # from the rendered GRES map: the instance as discovered, by UUID


@dataclass(frozen=True)
class Sizing:
    """What the Prolog asks the arbiter for, and why (``notes`` and :meth:`context` say how it was sized)."""

    mode: str  # whole | shard | mig
    spec: LeaseSpec  # the effective spec: the user's class, min, engine; the allocation's size
    pinned: tuple[int, ...]
    mig_uuids: tuple[str, ...] = ()
    shards: int | None = None
    shards_from: str | None = None  # comment | slurm | vram | guess
    totals: Mapping[int, int] = field(default_factory=dict)  # NVML index → total MiB (for engine fractions)
    notes: tuple[str, ...] = ()
    reserved: Mapping[int, int] = field(default_factory=dict)  # NVML index → driver reserve MiB (Ollama's overhead)
    uuids: tuple[str, ...] = ()  # the pinned GPUs' UUIDs, in ``pinned`` order (an MPS server is started on one)
    mps_thread_percent: int | None = None  # the class's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, for share=mps leases

    @property
    def pinned_mig_uuid(self) -> str | None:
        return self.mig_uuids[0] if self.mig_uuids else None

    def context(self) -> dict[str, Any]:
        """JSON for the decision's inputs (``"slurm"``): how the allocation became this request."""
        out: dict[str, Any] = {"mode": self.mode, "gpus": list(self.pinned)}
        if self.mig_uuids:
            out["mig_uuids"] = list(self.mig_uuids)
        if self.shards is not None:
            out.update(shards=self.shards, shards_from=self.shards_from)
        if self.notes:
            out["notes"] = list(self.notes)
        return out


# --------------------------------------------------------------------------- GRES → GPUs


def parse_gres(text: str | None) -> tuple[int, ...]:
    """GRES indices from ``SLURM_JOB_GPUS`` (``"0,2"``; ranges such as ``"0-3"`` too). Empty or absent: ``()``.

    The value comes from slurmd, not the user; a malformed one is a :class:`ProtocolError`.
    """
    if not text or not text.strip():
        return ()
    out: list[int] = []
    for part in text.strip().split(","):
        if _GRES_RE.fullmatch(part) is None:
            raise ProtocolError(f"gres {text[:60]!r} is not a list of GRES indices such as 0,2 (SLURM_JOB_GPUS)")
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if last < first or last > MAX_GRES_INDEX:
            raise ProtocolError(f"gres {text[:60]!r} has a bad index range {part!r} (SLURM_JOB_GPUS)")
        out.extend(range(first, last + 1))
    return tuple(dict.fromkeys(out))


def gres_slots(cfg: Config, node: str) -> tuple[GresSlot, ...] | None:
    """The node's ``gpu`` GRES lines in ``gres.conf`` order, or ``None`` when the inventory has no such node
    (then GRES index = NVML index, every GPU whole: a site that wrote gres.conf by hand, or a host-plane node).
    """
    inv = node_config(cfg, node)
    if inv is None:
        return None
    mapped = _read_gres_map(cfg.gres_map_dir / f"{node}.json", node, inv)
    if mapped is not None:
        return mapped
    slots = _derive(inv)
    from ..render import plan_node  # jinja2 comes with it: only the daemon and the fallback pay, once per node

    try:
        devices = [d for d in plan_node(inv, cfg).devices if d.name == "gpu"]
    except RenderError:
        # Real MIG instances are not rendered (their files are known only on the node); the order
        # is still the inventory's, which is what a hand-written gres.conf is asked to follow.
        return slots
    if len(devices) != len(slots):  # plan_node and this module disagree: a bug, not a site problem
        raise NodeFault(f"node {node}: gres.conf has {len(devices)} gpu lines but the inventory maps {len(slots)}")
    return tuple(replace(s, device=d.file) for s, d in zip(slots, devices, strict=True))


def _read_gres_map(path: Path, node: str, inv: NodeConfig) -> tuple[GresSlot, ...] | None:
    """The slots of ``gpuarb render``'s ``gres-map/<node>.json`` (:func:`slurm_gpuarb.gresplan.gres_map`),
    or ``None`` when there is no such file. It names each MIG instance by the UUID ``gpuarb discover``
    found, so the order Slurm gives the lines (``AutoDetect=nvml`` sorts them itself) cannot hand a job
    another instance. A map that cannot be read is a :class:`NodeFault`: exporting the wrong slice's
    UUID would put the job on someone else's memory."""
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NodeFault(f"cannot read the GRES map {path}: {e.strerror}; fix its permissions or re-render") from e
    fix = f"re-run `gpuarb discover` and `gpuarb render` for node {node}, or remove {path} to map by the inventory"
    try:
        doc = json.loads(raw)
        entries = doc["gres"]
        if doc.get("version") != GRES_MAP_VERSION or doc.get("node") != node or not isinstance(entries, list):
            raise ValueError(f"version {doc.get('version')!r} and node {doc.get('node')!r}, not "
                             f"{GRES_MAP_VERSION} and {node!r}")
        modes = {g.index: g.mode for g in inv.gpus}
        slots = []
        for k, entry in enumerate(entries):
            gpu, mig_uuid, files = entry["gpu"], entry.get("mig_uuid"), entry.get("files") or [""]
            if entry["index"] != k or type(gpu) is not int or gpu not in modes:
                raise ValueError(f"entry {k} (index {entry['index']!r}, gpu {gpu!r}) is not GRES index {k} of a "
                                 f"GPU the inventory lists ({sorted(modes)})")
            if mig_uuid is not None and not isinstance(mig_uuid, str):
                raise ValueError(f"entry {k}: mig_uuid {mig_uuid!r} is not a string")
            slots.append(GresSlot(k, gpu, "mig" if mig_uuid else modes[gpu], device=str(files[0]),
                                  profile=entry.get("type") if mig_uuid else None, mig_uuid=mig_uuid))
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise NodeFault(f"the GRES map {path} is not one gpuarb render wrote: {e}; {fix}") from e
    return tuple(slots)


def _derive(inv: NodeConfig) -> tuple[GresSlot, ...]:
    out: list[GresSlot] = []
    for gpu in inv.gpus:
        if gpu.mode == "mig":
            for j, profile in enumerate(gpu.mig):  # config.load expanded "7x1g.10gb" to one entry each
                out.append(GresSlot(len(out), gpu.index, "mig", mig_position=j, profile=profile))
        else:
            out.append(GresSlot(len(out), gpu.index, gpu.mode))
    return tuple(out)


def pick(slots: Sequence[GresSlot] | None, indices: Sequence[int], node: str,
         gpus: Sequence[GpuInfo]) -> list[GresSlot]:
    """The slots of ``indices``; every GPU they name must exist in telemetry.

    A GRES index gres.conf does not have, or a GPU telemetry does not see, is a :class:`NodeFault`:
    Slurm handed out a device this node cannot back (the one case a Prolog may drain a node for).
    """
    present = {g.index: g for g in gpus}
    if slots is None:
        chosen = [GresSlot(i, i, "whole") for i in indices]
    else:
        by_index = {s.gres_index: s for s in slots}
        bad = [i for i in indices if i not in by_index]
        if bad:
            raise NodeFault(f"Slurm gave GRES index {bad[0]} on node {node}, but its gres.conf has {len(slots)} gpu "
                            "lines; re-render gres.conf (gpuarb render) and restart slurmd")
        chosen = [by_index[i] for i in indices]
    for s in chosen:
        gpu = present.get(s.gpu_index)
        if gpu is None:
            raise NodeFault(f"Slurm gave GPU {s.gpu_index} (GRES index {s.gres_index}) on node {node}, but telemetry "
                            f"sees GPUs {sorted(present)}; check the GPU and the inventory")
        if s.mig_uuid is not None and not any(m.uuid == s.mig_uuid for m in gpu.mig_instances):
            raise NodeFault(f"Slurm gave GRES index {s.gres_index} on node {node}, MIG instance {s.mig_uuid} of GPU "
                            f"{s.gpu_index} by the GRES map, but the GPU has no such instance now: its MIG layout "
                            "changed since `gpuarb discover`; re-run discover and render, then restart slurmd")
        if s.mig_position is not None and s.mig_position >= len(gpu.mig_instances):
            raise NodeFault(f"Slurm gave MIG instance {s.mig_position} of GPU {s.gpu_index} on node {node}, but the "
                            f"GPU has {len(gpu.mig_instances)} instances; recreate the MIG layout (gpuarb render mig)")
    return chosen


# --------------------------------------------------------------------------- sizing


def needs_slurm(spec: LeaseSpec | None, chosen: Sequence[GresSlot]) -> bool:
    """Whether only Slurm can say how many shards the job holds: a GPU in shard mode and no canonical
    ``shards=`` (the daemon then asks Slurm for the job's requested GRES; the Prolog itself may not)."""
    return (spec is None or spec.shards is None) and any(s.mode == "shard" for s in chosen)


def size_job(cfg: Config, node: str, user: LeaseSpec | None, chosen: Sequence[GresSlot], gpus: Sequence[GpuInfo],
             *, partition: str | None = None, slurm_asked: bool = False, slurm_shards: int | None = None) -> Sizing:
    """The lease a job with GRES ``chosen`` on ``node`` gets (see the module docstring).

    ``slurm_asked``: Slurm was asked for the job's GRES and ``slurm_shards`` is its answer (``None``:
    the job asked for no shards, so it holds its GPUs whole)."""
    spec = user or LeaseSpec()
    by_index = {g.index: g for g in gpus}
    pinned = tuple(sorted(dict.fromkeys(s.gpu_index for s in chosen)))
    totals = {i: by_index[i].total_mib for i in pinned}
    gpu_facts: dict[str, Any] = {"reserved": {i: by_index[i].reserved_mib for i in pinned},
                                 "uuids": tuple(by_index[i].uuid for i in pinned),
                                 "mps_thread_percent": _thread_percent(cfg, spec)}
    # The allocation decides how many GPUs and for how long: the spec's gpus/ttl/wait do not apply.
    base = replace(spec, gpus=None, ttl_s=None, wait_s=None, shards=None)
    notes: list[str] = []

    mig = [s for s in chosen if s.mode == "mig"]
    if mig:
        instances = [_instance(by_index[s.gpu_index], s) for s in mig]
        first = instances[0]
        if len(mig) < len(chosen):
            notes.append("the job holds MIG and whole GPUs: its lease is its first MIG instance")
        if len(instances) > 1:
            notes.append(f"{len(instances)} MIG instances allocated: the lease records the first, all are exported")
        vram = _fit_vram(spec.vram, first.memory_mib, first.memory_mib, notes, f"MIG instance {first.profile}")
        return Sizing("mig", replace(base, vram=vram, mig=first.profile, share=None), (mig[0].gpu_index,),
                      tuple(i.uuid for i in instances), totals={mig[0].gpu_index: first.memory_mib},
                      notes=tuple(notes))

    pmode = _partition_mode(cfg, partition)
    if spec.shards is not None or slurm_shards:
        shard = True
    elif slurm_asked:
        shard = False  # Slurm says the job asked for whole GPUs, whatever its partition
    else:
        shard = pmode == "shard" or (pmode is None and any(s.mode == "shard" for s in chosen))
    quantum = cfg.policy.quantum_mib
    if shard:
        if spec.shards is not None:
            count, source = spec.shards, "comment"
        elif slurm_shards:
            count, source = slurm_shards, "slurm"
        elif spec.vram is not None:
            total = min(totals.values())
            count, source = skus.shards_needed(spec.vram.resolve(total), quantum), "vram"
        else:
            count, source = 1, "guess"
            notes.append("shard count unknown (no canonical comment, Slurm not asked): recorded 1 shard; the "
                         "TaskProlog checks SLURM_SHARDS_ON_NODE")
        if len(pinned) > 1:
            notes.append(f"shards on {len(pinned)} GPUs: each GPU's lease is {count} shards")
        return Sizing("shard", replace(base, vram=Vram(mib=count * quantum), mig=None), pinned, shards=count,
                      shards_from=source, totals=totals, notes=tuple(notes), **gpu_facts)

    res = reservations_for(cfg, node)
    ever = min(skus.usable_mib(by_index[i].total_mib, by_index[i].reserved_mib, cfg.policy.margin_mib,
                               [r.size_mib for r in res if r.gpu == i]) for i in pinned)
    total = min(totals.values())
    what = f"GPU {pinned[0]}" if len(pinned) == 1 else f"each of GPUs {', '.join(map(str, pinned))}"
    vram = _fit_vram(spec.vram, total, ever, notes, what)
    return Sizing("whole", replace(base, vram=vram, mig=None), pinned, totals=totals, notes=tuple(notes),
                  **gpu_facts)


def _thread_percent(cfg: Config, spec: LeaseSpec) -> int | None:
    """The class's MPS thread cap for a ``share=mps`` spec (``None``: not MPS, or a class without one)."""
    if spec.share is not Share.MPS:
        return None
    cls = cfg.policy.classes.get(spec.prio or cfg.policy.default_class)
    return None if cls is None else cls.mps_thread_percent


def _instance(gpu: GpuInfo, slot: GresSlot) -> MigInstance:
    """The MIG instance a slot names: by UUID from the GRES map, else by its position in the inventory."""
    if slot.mig_uuid is not None:
        return next(m for m in gpu.mig_instances if m.uuid == slot.mig_uuid)  # pick() checked it is there
    return gpu.mig_instances[slot.mig_position or 0]


def _fit_vram(asked: Vram | None, total: int, ever: int, notes: list[str], what: str) -> Vram:
    """The spec's vram capped at what ``what`` could ever lease (all of it without a spec)."""
    if asked is None:
        return Vram(mib=ever)
    mib = asked.resolve(total)
    if mib > ever:
        notes.append(f"vram={asked} is more than {what} can lease ({ever}MiB): the lease is what Slurm gave")
        return Vram(mib=ever)
    return Vram(mib=mib)


def _partition_mode(cfg: Config, partition: str | None) -> str | None:
    if partition is None:
        return None
    for p in cfg.partitions:
        if p.name == partition:
            return "whole" if p.mode in _WHOLE_MODES else p.mode
    return None


# --------------------------------------------------------------------------- the grant


def fraction(part_mib: int, total_mib: int) -> str:
    """``part ÷ total`` rounded *down* (:func:`slurm_gpuarb.engines.fraction`): never more than granted."""
    return engines.fraction(part_mib, total_mib)


def engine_exports(engine: Engine | None, granted_mib: int, total_mib: int, reserved_mib: int = 0) -> dict[str, str]:
    """Knobs for the serving engine a spec names, so it stays inside its lease (:mod:`slurm_gpuarb.engines`).

    vLLM's ``--gpu-memory-utilization`` and TensorFlow's / PyTorch's memory fractions are shares of
    the GPU's *total* memory; Ollama's overhead is the bytes it must leave of what it sees free.
    """
    return engines.engine_knobs(None if engine is None else engine.value, granted_mib, total_mib,
                                reserved_mib=reserved_mib).exports


def mps_exports(sizing: Sizing, granted_mib: int) -> dict[str, str]:
    """The MPS knobs of a ``share=mps`` lease (see the module docstring); ``{}`` for any other lease."""
    if sizing.spec.share is not Share.MPS:
        return {}
    one_gpu = len(sizing.pinned) == 1 and len(sizing.uuids) == 1
    total = sizing.totals.get(sizing.pinned[0]) if one_gpu else None
    out = {"GPUARB_SHARE": Share.MPS.value}
    if one_gpu:
        # The Prolog starts the control daemon on this UUID (CUDA_VISIBLE_DEVICES of an MPS server
        # remaps device indices: NVIDIA recommends UUIDs) and drops the limit when no server runs.
        out["GPUARB_MPS_DEVICE"] = sizing.uuids[0]
    out.update(engines.mps_exports(granted_mib, thread_percent=sizing.mps_thread_percent, total_mib=total,
                                   server=one_gpu))
    return out


def make_grant(base: Grant, sizing: Sizing, decision: Decision, lease: Lease | None) -> Grant:
    """The grant for the TaskProlog: the lease's exports, or the refusal when the arbiter said wait/deny."""
    if lease is None:
        return replace(base, prio=decision.prio, refused=f"gpuarb: the job's GPU memory is not available on "
                                                         f"{base.node}: {decision.reason}")
    exports = {"GPUARB_VRAM_MB": str(lease.vram_mib), "GPUARB_LEASE_ID": lease.id, "GPUARB_PRIO": lease.prio}
    if sizing.mig_uuids:
        # Slurm's CUDA_VISIBLE_DEVICES names the parent GPU; CUDA needs the instance's UUID.
        exports["CUDA_VISIBLE_DEVICES"] = ",".join(sizing.mig_uuids)
    elif sizing.mode == "shard" and sizing.uuids:
        # Slurm 22.05 gives a shard job GPU_DEVICE_ORDINAL, not CUDA_VISIBLE_DEVICES: without it CUDA
        # would see every GPU of the node and start on GPU 0, wherever the shards are. A UUID names the
        # GPU whether or not the cgroup hides (and so renumbers) the others.
        exports["CUDA_VISIBLE_DEVICES"] = ",".join(sizing.uuids)
    total = min(sizing.totals.values()) if sizing.totals else lease.vram_mib
    reserved = max(sizing.reserved.values()) if sizing.reserved else 0
    exports.update(engine_exports(sizing.spec.engine, lease.vram_mib, total, reserved))
    exports.update(mps_exports(sizing, lease.vram_mib))
    return replace(base, lease_id=lease.id, vram_mib=lease.vram_mib, gpus=lease.gpus, mig_uuid=lease.mig_uuid,
                   prio=lease.prio, exports=exports)
