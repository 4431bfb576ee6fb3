"""``smi``: GPUs and their processes parsed from ``nvidia-smi``, through :func:`slurm_gpuarb.subproc.run`.

For hosts where nvidia-ml-py is not installed. Commands (CSV without header or units):

* ``--query-gpu=index,uuid,name,memory.total,memory.reserved,memory.used,pci.bus_id,mig.mode.current``
  on every :meth:`~SmiTelemetry.gpus` call. A driver too old to know ``memory.reserved``
  refuses the whole query; it is asked again without that field, and reserved reads 0
  (``used`` then includes the reservation, as with NVML's v1 struct).
* ``--query-compute-apps=pid,gpu_uuid,used_memory,process_name`` for processes. nvidia-smi has
  no such query for graphics processes, nor a MIG column: ``mig_uuid`` stays ``None``.
* ``nvidia-smi -q`` for ``Minor Number`` (read once and cached: it cannot change while the
  node is up) and, only when a GPU is in MIG mode, for the MIG devices' GPU/compute instance
  ids and memory, joined by device index with ``nvidia-smi -L`` for their profiles and UUIDs.
  Placements are not printed by either (``nvidia-smi mig -lgi`` is root-only): ``None``.

``[N/A]`` and ``[Not Supported]`` read as "unknown": 0 for reserved memory and process memory,
an error for a GPU's total. Any other unparsable line raises :class:`TelemetryError` quoting it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import TelemetryError
from ..model import GpuInfo, GpuProcess, MigInstance
from ..subproc import CommandFailed, SubprocessError, run
from .base import Telemetry, proc_identity

__all__ = ["SmiTelemetry", "parse_apps_csv", "parse_gpu_csv", "parse_list", "parse_query"]

SMI = "nvidia-smi"
GPU_FIELDS = "index,uuid,name,memory.total,memory.reserved,memory.used,pci.bus_id,mig.mode.current"
GPU_FIELDS_OLD = GPU_FIELDS.replace("memory.reserved,", "")
APP_FIELDS = "pid,gpu_uuid,used_memory,process_name"
CSV = "--format=csv,noheader,nounits"
GPU_ARGV = (SMI, f"--query-gpu={GPU_FIELDS}", CSV)
GPU_ARGV_OLD = (SMI, f"--query-gpu={GPU_FIELDS_OLD}", CSV)
APPS_ARGV = (SMI, f"--query-compute-apps={APP_FIELDS}", CSV)
QUERY_ARGV = (SMI, "-q")
LIST_ARGV = (SMI, "-L")

_UNKNOWN = {"[N/A]", "N/A", "[Not Supported]", "Not Supported", "[Unknown Error]", "[Insufficient Permissions]"}
_GPU_HEADER_RE = re.compile(r"GPU ([0-9A-Fa-f]{4,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}\.[0-9A-Fa-f])")
_L_GPU_RE = re.compile(r"GPU (\d+): .*\(UUID: (GPU-[^)]+)\)")
_L_MIG_RE = re.compile(r"MIG (\S+)\s+Device\s+(\d+): \(UUID: (MIG-[^)]+)\)")
_MIB_RE = re.compile(r"(\d+) MiB")


def _unknown(field: str) -> bool:
    return field in _UNKNOWN


def _int(field: str, what: str, line: str, source: str, *, unknown: int | None = None) -> int:
    if _unknown(field) and unknown is not None:
        return unknown
    try:
        value = int(field)
    except ValueError:
        raise TelemetryError(f"{source}: {what} is '{field}', not a number, in line '{line}'") from None
    if value < 0:
        raise TelemetryError(f"{source}: {what} is negative in line '{line}'")
    return value


def _norm_bus(bus: str) -> str:
    return bus.strip().upper()


@dataclass(frozen=True)
class GpuRow:
    """One line of ``--query-gpu``."""

    index: int
    uuid: str
    name: str
    total_mib: int
    reserved_mib: int
    used_mib: int | None  # None: nvidia-smi printed [N/A]
    pci_bus_id: str
    mig_enabled: bool


def parse_gpu_csv(text: str, *, reserved_field: bool = True) -> list[GpuRow]:
    """Parse ``--query-gpu`` output (with or without the ``memory.reserved`` column)."""
    source = f"{SMI} --query-gpu"
    width = 8 if reserved_field else 7
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = [x.strip() for x in line.split(",")]
        if len(f) != width:
            raise TelemetryError(f"{source}: expected {width} fields, got {len(f)}, in line '{line}'")
        if not reserved_field:
            f.insert(4, "[N/A]")
        index, uuid, name, total, reserved, used, bus, mig = f
        if _unknown(total):
            raise TelemetryError(f"{source}: GPU {index} reports no total memory in line '{line}'")
        mode = mig.lower()
        if mode not in ("enabled", "disabled") and not _unknown(mig):
            raise TelemetryError(f"{source}: MIG mode is '{mig}', expected Enabled or Disabled, in line '{line}'")
        rows.append(GpuRow(
            index=_int(index, "the index", line, source), uuid=uuid, name=name,
            total_mib=_int(total, "memory.total", line, source),
            reserved_mib=_int(reserved, "memory.reserved", line, source, unknown=0),
            used_mib=None if _unknown(used) else _int(used, "memory.used", line, source),
            pci_bus_id=bus, mig_enabled=mode == "enabled",
        ))
    return rows


@dataclass(frozen=True)
class AppRow:
    """One line of ``--query-compute-apps``."""

    pid: int
    gpu_uuid: str
    used_mib: int
    process_name: str


def parse_apps_csv(text: str) -> list[AppRow]:
    """Parse ``--query-compute-apps`` output; the process name is last and may contain commas."""
    source = f"{SMI} --query-compute-apps"
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.strip() == "No running processes found":
            continue
        f = [x.strip() for x in line.split(",", 3)]
        if len(f) != 4:
            raise TelemetryError(f"{source}: expected 4 fields, got {len(f)}, in line '{line}'")
        pid, uuid, used, name = f
        if not uuid.startswith("GPU-"):
            raise TelemetryError(f"{source}: '{uuid}' is not a GPU UUID in line '{line}'")
        rows.append(AppRow(_int(pid, "the pid", line, source), uuid,
                           _int(used, "used_memory", line, source, unknown=0), name))
    return rows


@dataclass(frozen=True)
class QueryGpu:
    """What ``nvidia-smi -q`` says about one GPU that the CSV queries do not."""

    minor: int | None
    mig_devices: dict[int, tuple[int, int, int, int]]  # MIG device index → (gi_id, ci_id, total, used MiB)


def parse_query(text: str) -> dict[str, QueryGpu]:
    """Parse ``nvidia-smi -q`` into per-GPU facts, keyed by upper-case PCI bus id."""
    source = f"{SMI} -q"
    out: dict[str, QueryGpu] = {}
    bus: str | None = None
    stack: list[tuple[int, str]] = []  # (indent, header) of the enclosing sections
    device: dict[str, int] | None = None
    minor: int | None = None
    devices: dict[int, tuple[int, int, int, int]] = {}

    def finish_device() -> None:
        nonlocal device
        if device is not None:
            missing = {"Index", "GPU Instance ID", "Compute Instance ID", "Total", "Used"} - set(device)
            if missing:
                raise TelemetryError(f"{source}: a MIG device of GPU {bus} lacks {', '.join(sorted(missing))}")
            devices[device["Index"]] = (device["GPU Instance ID"], device["Compute Instance ID"], device["Total"],
                                        device["Used"])
        device = None

    def finish_gpu() -> None:
        finish_device()
        if bus is not None:
            out[_norm_bus(bus)] = QueryGpu(minor, dict(devices))

    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("="):
            continue
        indent = len(line) - len(line.lstrip(" "))
        header = _GPU_HEADER_RE.fullmatch(stripped)
        if header is not None and indent == 0:
            finish_gpu()
            bus, minor, devices, stack = header.group(1), None, {}, []
            continue
        if bus is None:
            continue  # the preamble: timestamp, driver version
        while stack and stack[-1][0] >= indent:
            if stack[-1][1] == "MIG Device":
                finish_device()
            stack.pop()
        key, sep, value = stripped.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or (not value and key in ("MIG Devices", "MIG Device")):
            stack.append((indent, key))
            if key == "MIG Device":
                device = {}
            continue
        path = [h for _, h in stack]
        if not path and key == "Minor Number":
            minor = None if _unknown(value) else _int(value, "Minor Number", line, source)
        elif device is not None and path[-1:] == ["MIG Device"] and key in ("Index", "GPU Instance ID",
                                                                            "Compute Instance ID"):
            device[key] = _int(value, key, line, source)
        elif device is not None and path[-2:] == ["MIG Device", "FB Memory Usage"] and key in ("Total", "Used"):
            m = _MIB_RE.fullmatch(value)
            if m is None:
                raise TelemetryError(f"{source}: MIG device memory is '{value}', expected 'N MiB', in line '{line}'")
            device[key] = int(m.group(1))
    finish_gpu()
    return out


def parse_list(text: str) -> dict[str, list[tuple[int, str, str]]]:
    """Parse ``nvidia-smi -L``: GPU UUID → [(MIG device index, profile, MIG UUID)]."""
    out: dict[str, list[tuple[int, str, str]]] = {}
    current: list[tuple[int, str, str]] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if (g := _L_GPU_RE.fullmatch(stripped)) is not None:
            current = out.setdefault(g.group(2), [])
        elif (m := _L_MIG_RE.fullmatch(stripped)) is not None and current is not None:
            profile = re.sub(r"^\d+c\.", "", m.group(1))  # compute-instance prefix: leases name GI profiles
            current.append((int(m.group(2)), profile, m.group(3)))
        else:
            raise TelemetryError(f"{SMI} -L: cannot read line '{line}'")
    return out


class SmiTelemetry(Telemetry):
    """``nvidia-smi`` telemetry. ``probe`` reads the GPUs once now, so a broken nvidia-smi fails early."""

    name = "smi"

    def __init__(self, *, probe: bool = False, timeout: float = 10.0, proc_root: Path = Path("/proc")) -> None:
        self._timeout = timeout
        self._proc_root = proc_root
        self._reserved_field = True
        self._minors: dict[str, int | None] | None = None
        self._index_by_uuid: dict[str, int] = {}
        if probe:
            self.gpus()

    def _run(self, argv: Sequence[str]) -> str:
        try:
            return run(argv, timeout=self._timeout).stdout
        except SubprocessError as e:
            raise TelemetryError(f"'{' '.join(argv)}' failed") from e

    def _gpu_rows(self) -> list[GpuRow]:
        if self._reserved_field:
            try:
                return parse_gpu_csv(run(GPU_ARGV, timeout=self._timeout).stdout)
            except CommandFailed as e:
                if "memory.reserved" not in e.stdout + e.stderr:
                    raise TelemetryError(f"'{' '.join(GPU_ARGV)}' failed") from e
                self._reserved_field = False  # a driver older than the field
            except SubprocessError as e:
                raise TelemetryError(f"'{' '.join(GPU_ARGV)}' failed") from e
        return parse_gpu_csv(self._run(GPU_ARGV_OLD), reserved_field=False)

    def gpus(self) -> list[GpuInfo]:
        rows = self._gpu_rows()
        self._index_by_uuid = {r.uuid: r.index for r in rows}
        any_mig = any(r.mig_enabled for r in rows)
        query: dict[str, QueryGpu] = {}
        if self._minors is None or any_mig:
            query = parse_query(self._run(QUERY_ARGV))
            self._minors = {b: q.minor for b, q in query.items()}
        listing = parse_list(self._run(LIST_ARGV)) if any_mig else {}
        out = []
        for r in rows:
            bus = _norm_bus(r.pci_bus_id)
            instances: tuple[MigInstance, ...] = ()
            mig_used = 0
            if r.mig_enabled:
                instances, mig_used = self._mig(r, query.get(bus), listing.get(r.uuid, []))
            used = r.used_mib
            if used is None:
                if not r.mig_enabled:
                    raise TelemetryError(f"{SMI} reports no memory.used for GPU {r.index} ({r.uuid})")
                used = mig_used  # some drivers print [N/A] for a MIG parent: the sum over its instances
            out.append(GpuInfo(
                index=r.index, uuid=r.uuid, name=r.name, total_mib=r.total_mib, reserved_mib=r.reserved_mib,
                used_mib=used, minor=self._minors.get(bus), pci_bus_id=r.pci_bus_id, mig_enabled=r.mig_enabled,
                mig_instances=instances,
            ))
        return out

    def _mig(self, row: GpuRow, query: QueryGpu | None,
             listed: list[tuple[int, str, str]]) -> tuple[tuple[MigInstance, ...], int]:
        instances = []
        used = 0
        for dev, profile, uuid in listed:
            if query is None or dev not in query.mig_devices:
                raise TelemetryError(f"{SMI} -L lists MIG device {dev} ({uuid}) of GPU {row.index}, "
                                     f"but {SMI} -q does not describe it")
            gi, ci, mib, mib_used = query.mig_devices[dev]
            used += mib_used
            instances.append(MigInstance(uuid=uuid, profile=profile, memory_mib=mib, gi_id=gi, ci_id=ci))
        return tuple(instances), used

    def processes(self) -> list[GpuProcess]:
        apps = parse_apps_csv(self._run(APPS_ARGV))
        if any(a.gpu_uuid not in self._index_by_uuid for a in apps):
            rows = self._gpu_rows()
            self._index_by_uuid = {r.uuid: r.index for r in rows}
        out = []
        for a in apps:
            index = self._index_by_uuid.get(a.gpu_uuid)
            if index is None:
                raise TelemetryError(f"{SMI} lists process {a.pid} on GPU {a.gpu_uuid}, which --query-gpu does not")
            comm, uid, user = proc_identity(a.pid, self._proc_root)
            out.append(GpuProcess(pid=a.pid, gpu_index=index, used_mib=a.used_mib,
                                  name=comm or os.path.basename(a.process_name)[:15], uid=uid, user=user))
        return out
