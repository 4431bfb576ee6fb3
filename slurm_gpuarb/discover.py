"""``gpuarb discover``: what a node's GPUs really are, for the renderer.

A MIG instance's ``gres.conf`` line names three device files (``MultipleFiles=``): the parent
GPU's ``/dev/nvidia<minor>`` and the instance's two capability files,
``/dev/nvidia-caps/nvidia-cap<N>`` for its GPU instance (GI) and for its compute instance (CI).
None of these can be computed from a planned layout: the minor is whatever the driver gave the
board (not the NVML index), the GI ids are whatever the driver handed out when the instances
were created, and the capability minors come from the driver's table. So ``discover`` runs on
the node, reads them once, and writes a JSON file the renderer reads (``render --discovery DIR``
with one ``<node>.json`` per node).

The capability table is ``/proc/driver/nvidia-caps/mig-minors`` (NVIDIA MIG user guide, "Device
Nodes and Capabilities"; the same file nvidia-container-toolkit's ``nvcaps`` package parses). One
``<capability> <minor>`` per line::

    config 1
    monitor 2
    gpu0/gi0/access 3
    gpu0/gi0/ci0/access 4
    ...

where ``gpuN`` is the GPU's **minor number** (``/dev/nvidiaN``), ``giG`` the GPU instance id and
``ciC`` the compute instance id. The driver lists every possible entry up front (15 GIs × 8 CIs per
GPU: ``gpuN/giG/access`` is ``3 + 135·N + 9·G`` and its ``ciC`` follows at ``+1+C``);
:func:`driver_mig_minors` writes that table for fake nodes and fixtures. Lines of any other shape
are skipped, as NVIDIA's own parser does: a newer driver may add capabilities.

Discovery file, version 1 (``dump``/``load``; unknown keys are refused)::

    {"version": 1, "node": "dgx01", "telemetry": "nvml", "mig_minors": "/proc/driver/nvidia-caps/mig-minors",
     "note": "", "gpus": [{"index": 0, "minor": 2, "uuid": "GPU-…", "name": "NVIDIA H100 80GB HBM3",
       "sku": "h100-80g", "total_mib": 81559, "pci_bus_id": "00000000:1B:00.0", "mig_enabled": true,
       "mig": [{"uuid": "MIG-…", "profile": "1g.10gb", "memory_mib": 9984, "gi_id": 7, "ci_id": 0,
                "placement_start": 4, "placement_size": 1,
                "gi_cap": "gpu2/gi7/access", "gi_minor": 336, "ci_cap": "gpu2/gi7/ci0/access", "ci_minor": 337}]}]}

``mig`` lists the instances in the order telemetry enumerates them (NVML's MIG device index),
which is the order the renderer writes their ``gres.conf`` lines in.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .errors import ConfigError, TelemetryError
from .telemetry.base import Telemetry

__all__ = [
    "DISCOVERY_VERSION",
    "MIG_MINORS",
    "DiscoveredGpu",
    "Discovery",
    "MigDevice",
    "discover",
    "driver_mig_minors",
    "dump",
    "from_dict",
    "load",
    "load_dir",
    "parse_mig_minors",
    "to_dict",
]

DISCOVERY_VERSION: Final = 1
MIG_MINORS: Final = "driver/nvidia-caps/mig-minors"  # under /proc
# The driver's table: 15 GPU instances per GPU, 8 compute instances per GPU instance.
_GIS_PER_GPU: Final = 15
_CIS_PER_GI: Final = 8
_MINORS_LINE_RE: Final = re.compile(r"(config|monitor|gpu\d{1,4}/gi\d{1,3}(?:/ci\d{1,3})?/access) (\d{1,9})", re.ASCII)
_GPU_UUID_RE: Final = re.compile(r"GPU-[A-Za-z0-9-]{1,80}", re.ASCII)
_MIG_UUID_RE: Final = re.compile(r"MIG-[A-Za-z0-9/-]{1,80}", re.ASCII)
_NODE_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_PROFILE_RE: Final = re.compile(r"[1-8]g\.[0-9]{1,3}gb(?:\+[a-z]{1,8})?", re.ASCII)


@dataclass(frozen=True)
class MigDevice:
    """One MIG device (GPU instance + compute instance) and its two capability device minors."""

    uuid: str
    profile: str
    memory_mib: int
    gi_id: int
    ci_id: int
    gi_minor: int  # /dev/nvidia-caps/nvidia-cap<gi_minor>
    ci_minor: int
    placement_start: int | None = None
    placement_size: int | None = None

    def gi_cap(self, gpu_minor: int) -> str:
        return f"gpu{gpu_minor}/gi{self.gi_id}/access"

    def ci_cap(self, gpu_minor: int) -> str:
        return f"gpu{gpu_minor}/gi{self.gi_id}/ci{self.ci_id}/access"


@dataclass(frozen=True)
class DiscoveredGpu:
    """One physical GPU of the node: its NVML index, its ``/dev/nvidiaN`` minor, its MIG devices."""

    index: int
    minor: int
    uuid: str
    name: str
    total_mib: int
    sku: str | None = None
    pci_bus_id: str = ""
    mig_enabled: bool = False
    mig: tuple[MigDevice, ...] = ()


@dataclass(frozen=True)
class Discovery:
    """What ``gpuarb discover`` found on one node (``mig_minors`` says where the cap minors came from)."""

    node: str
    gpus: tuple[DiscoveredGpu, ...]
    telemetry: str = ""
    mig_minors: str = ""
    note: str = ""

    def gpu(self, index: int) -> DiscoveredGpu | None:
        """The GPU with NVML index ``index``, or None."""
        for g in self.gpus:
            if g.index == index:
                return g
        return None


# --------------------------------------------------------------------------- mig-minors


def parse_mig_minors(text: str) -> dict[str, int]:
    """``{capability: minor}`` from the text of ``/proc/driver/nvidia-caps/mig-minors``.

    Lines of another shape are skipped (a newer driver may list more capabilities)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        m = _MINORS_LINE_RE.fullmatch(line.strip())
        if m is not None:
            out[m.group(1)] = int(m.group(2))
    return out


def driver_mig_minors(gpus: int) -> str:
    """The ``mig-minors`` table the NVIDIA driver creates for GPU minors ``0..gpus-1``.

    For fake nodes (no driver) and for constructed fixtures; a real node's file is always read."""
    lines = ["config 1", "monitor 2"]
    minor = 3
    for gpu in range(gpus):
        for gi in range(_GIS_PER_GPU):
            lines.append(f"gpu{gpu}/gi{gi}/access {minor}")
            minor += 1
            for ci in range(_CIS_PER_GI):
                lines.append(f"gpu{gpu}/gi{gi}/ci{ci}/access {minor}")
                minor += 1
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- discovery


def discover(telemetry: Telemetry, *, node: str, proc_root: str | os.PathLike[str] = "/proc",
             note: str = "") -> Discovery:
    """Read the node's GPUs from ``telemetry`` and the MIG capability minors from ``proc_root``.

    Every GPU needs its minor number (the NVML and ``nvidia-smi`` backends report it). The
    ``mig-minors`` file is read only when some GPU has MIG instances; on a ``fake:`` backend
    without one, the driver's table (:func:`driver_mig_minors`) stands in, and the result says so.
    Raises :class:`TelemetryError` naming the GPU or file that is missing.
    """
    gpus = telemetry.gpus()
    for g in gpus:
        if g.minor is None:
            raise TelemetryError(f"telemetry {telemetry.name} cannot tell the /dev/nvidiaN minor of GPU {g.index}; "
                                 "run gpuarb discover with --telemetry nvml (nvmlDeviceGetMinorNumber)")
    caps: dict[str, int] = {}
    source = ""
    if any(g.mig_instances for g in gpus):
        path = Path(proc_root) / MIG_MINORS
        try:
            caps, source = parse_mig_minors(path.read_text(encoding="ascii", errors="replace")), str(path)
        except OSError as e:
            if not telemetry.name.startswith("fake:"):
                raise TelemetryError(f"cannot read {path}, the driver's table of MIG capability minors; is the "
                                     "NVIDIA driver (R450 or later) loaded on this node?") from e
            top = max(g.minor or 0 for g in gpus) + 1
            caps, source = parse_mig_minors(driver_mig_minors(top)), "synthesized (fake telemetry: the driver's table)"
    out = []
    for g in gpus:
        minor = g.minor if g.minor is not None else g.index
        devices = []
        for m in g.mig_instances:
            gi_cap, ci_cap = f"gpu{minor}/gi{m.gi_id}/access", f"gpu{minor}/gi{m.gi_id}/ci{m.ci_id}/access"
            missing = [c for c in (gi_cap, ci_cap) if c not in caps]
            if missing:
                raise TelemetryError(f"{source or MIG_MINORS} has no entry {missing[0]} for MIG device {m.uuid} of GPU "
                                     f"{g.index}; the driver and NVML disagree: reload the driver or recreate the "
                                     "MIG instances")
            devices.append(MigDevice(m.uuid, m.profile, m.memory_mib, m.gi_id, m.ci_id, caps[gi_cap], caps[ci_cap],
                                     m.placement_start, m.placement_size))
        out.append(DiscoveredGpu(g.index, minor, g.uuid, g.name, g.total_mib, g.sku, g.pci_bus_id, g.mig_enabled,
                                 tuple(devices)))
    return Discovery(node, tuple(out), telemetry.name, source, note)


# --------------------------------------------------------------------------- JSON


def to_dict(d: Discovery) -> dict[str, Any]:
    """The discovery as the JSON-serialisable document of the module docstring."""
    return {
        "version": DISCOVERY_VERSION, "node": d.node, "telemetry": d.telemetry, "mig_minors": d.mig_minors,
        "note": d.note,
        "gpus": [{
            "index": g.index, "minor": g.minor, "uuid": g.uuid, "name": g.name, "sku": g.sku,
            "total_mib": g.total_mib, "pci_bus_id": g.pci_bus_id, "mig_enabled": g.mig_enabled,
            "mig": [{
                "uuid": m.uuid, "profile": m.profile, "memory_mib": m.memory_mib, "gi_id": m.gi_id, "ci_id": m.ci_id,
                "placement_start": m.placement_start, "placement_size": m.placement_size,
                "gi_cap": m.gi_cap(g.minor), "gi_minor": m.gi_minor, "ci_cap": m.ci_cap(g.minor),
                "ci_minor": m.ci_minor,
            } for m in g.mig],
        } for g in d.gpus],
    }


def dump(d: Discovery) -> str:
    """The discovery file's text (stable key order, so files diff cleanly)."""
    return json.dumps(to_dict(d), indent=2) + "\n"


class _Obj:
    """One JSON object of a discovery file being read: unknown keys and wrong types are errors."""

    def __init__(self, where: str, raw: object, keys: Iterable[str]) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected an object")
        unknown = sorted(set(raw) - set(keys))
        if unknown:
            raise ConfigError(f"{where}: unknown key '{str(unknown[0])[:40]}' (expected: {', '.join(keys)})")
        self.where = where
        self.raw: dict[str, Any] = raw

    def get(self, key: str, kind: type, *, optional: bool = False, pattern: re.Pattern[str] | None = None) -> Any:
        if key not in self.raw or (optional and self.raw[key] is None):
            if optional:
                return None
            raise ConfigError(f"{self.where}: missing '{key}'")
        value: Any = self.raw[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{self.where}: '{key}' must be {'an integer' if kind is int else kind.__name__}")
        if kind is int and self.raw[key] < 0:
            raise ConfigError(f"{self.where}: '{key}' must not be negative")
        if pattern is not None and not pattern.fullmatch(self.raw[key]):
            raise ConfigError(f"{self.where}: '{key}' {str(value)[:60]!r} is not valid")
        return value


def _mig_device(where: str, raw: object, minor: int) -> MigDevice:
    o = _Obj(where, raw, ("uuid", "profile", "memory_mib", "gi_id", "ci_id", "placement_start", "placement_size",
                          "gi_cap", "gi_minor", "ci_cap", "ci_minor"))
    m = MigDevice(o.get("uuid", str, pattern=_MIG_UUID_RE), o.get("profile", str, pattern=_PROFILE_RE),
                  o.get("memory_mib", int), o.get("gi_id", int), o.get("ci_id", int), o.get("gi_minor", int),
                  o.get("ci_minor", int), o.get("placement_start", int, optional=True),
                  o.get("placement_size", int, optional=True))
    # The cap names are redundant with (minor, gi, ci); a file edited by hand must stay consistent.
    for key, expected in (("gi_cap", m.gi_cap(minor)), ("ci_cap", m.ci_cap(minor))):
        if o.get(key, str) != expected:
            raise ConfigError(f"{where}: '{key}' is {str(o.raw[key])[:60]!r} but GPU minor {minor}, GI {m.gi_id} "
                              f"and CI {m.ci_id} make it {expected!r}; run gpuarb discover again")
    return m


def from_dict(raw: object, where: str = "<discovery>") -> Discovery:
    """Read a discovery document; :class:`ConfigError` names the file, the entry and the problem."""
    top = _Obj(where, raw, ("version", "node", "telemetry", "mig_minors", "note", "gpus"))
    if top.get("version", int) != DISCOVERY_VERSION:
        raise ConfigError(f"{where}: discovery version {top.raw['version']} is not {DISCOVERY_VERSION}; "
                          "run this gpuarb's discover on the node again")
    gpus: list[DiscoveredGpu] = []
    raw_gpus = top.get("gpus", list)
    for i, g_raw in enumerate(raw_gpus):
        gw = f"{where}: gpus[{i}]"
        g = _Obj(gw, g_raw, ("index", "minor", "uuid", "name", "sku", "total_mib", "pci_bus_id", "mig_enabled", "mig"))
        minor = g.get("minor", int)
        mig = tuple(_mig_device(f"{gw}.mig[{j}]", m, minor) for j, m in enumerate(g.get("mig", list)))
        gpu = DiscoveredGpu(g.get("index", int), minor, g.get("uuid", str, pattern=_GPU_UUID_RE), g.get("name", str),
                            g.get("total_mib", int), g.get("sku", str, optional=True), g.get("pci_bus_id", str),
                            g.get("mig_enabled", bool), mig)
        if mig and not gpu.mig_enabled:
            raise ConfigError(f"{gw}: lists MIG devices but mig_enabled is false")
        if any(x.index == gpu.index or x.minor == gpu.minor for x in gpus):
            raise ConfigError(f"{gw}: GPU index {gpu.index} or minor {gpu.minor} appears twice")
        gpus.append(gpu)
    return Discovery(top.get("node", str, pattern=_NODE_RE), tuple(gpus), top.get("telemetry", str),
                     top.get("mig_minors", str), top.get("note", str))


def load(path: str | os.PathLike[str]) -> Discovery:
    """Read one discovery file (``ConfigError`` when it is missing, not JSON or malformed)."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the discovery file; run `gpuarb discover --out {p.name}` on "
                          "the node") from e
    except ValueError as e:
        raise ConfigError(f"{p}: is not JSON; run gpuarb discover on the node again") from e
    return from_dict(raw, str(p))


def load_dir(directory: str | os.PathLike[str], nodes: Iterable[str]) -> Mapping[str, Discovery]:
    """The discovery files ``<node>.json`` in ``directory`` for those of ``nodes`` that have one.

    A file must describe the node it is named after (a copied file would bind the wrong devices)."""
    base = Path(directory)
    if not base.is_dir():
        raise ConfigError(f"{base}: the discovery directory does not exist; it holds one <node>.json per node")
    out: dict[str, Discovery] = {}
    for node in nodes:
        path = base / f"{node}.json"
        if path.is_file():
            d = load(path)
            if d.node != node:
                raise ConfigError(f"{path}: describes node {d.node!r}, not {node!r}; run gpuarb discover on {node}")
            out[node] = d
    return out
