"""``nvml``: GPUs and their processes from NVML, through nvidia-ml-py (``import pynvml``).

Memory comes from ``nvmlDeviceGetMemoryInfo`` with the v2 struct, whose ``used`` excludes
the driver's ``reserved`` memory (about 0.5 GiB on an H100). On a driver without v2 the
v1 struct is read instead: ``reserved`` is then reported as 0 and ``used`` includes it, which
leaves ``total − reserved − used`` (what the arbiter cares about) unchanged.

Bytes become MiB rounding the total *down* and reserved/used *up*, so rounding never makes
memory look free that is not.

MIG: a MIG-enabled GPU lists its MIG devices (``nvmlDeviceGetMigDeviceHandleByIndex``;
empty slots answer ``NOT_FOUND``). The profile is the GPU-instance profile read from the
MIG device's name (``… MIG 1g.10gb``; a compute-instance prefix as in ``1c.3g.20gb`` is
dropped, because leases name GPU-instance profiles); the placement needs
``nvmlDeviceGetGpuInstanceById``, which NVML allows root only, so it is ``None`` otherwise.
Processes on a MIG-enabled GPU are read per MIG device, which works unprivileged and tells
which instance each process runs in (the parent handle answers only root, in aggregate).

Processes are compute *and* graphics processes (an Xorg on a workstation GPU holds real
memory), one entry per (pid, GPU, MIG instance); NVML reports ``None`` memory for some (WDDM,
no permission), read as 0. Names and owners come from ``/proc/PID`` when visible.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TelemetryError
from ..model import GpuInfo, GpuProcess, MigInstance
from .base import NVML_MISSING, Telemetry, proc_identity

__all__ = ["NvmlTelemetry"]

_MIB = 1 << 20
_MIG_PROFILE_RE = re.compile(r"MIG\s+(?:\d+c\.)?(\d+g\.\d+gb\S*)")
# Error codes (nvml.h), in case a pynvml build lacks a constant.
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_NOT_FOUND = 6
_FUNCTION_NOT_FOUND = 13
_ARGUMENT_VERSION_MISMATCH = 25


def _floor_mib(n: int | None) -> int:
    return int(n or 0) // _MIB


def _ceil_mib(n: int | None) -> int:
    return -(-int(n or 0) // _MIB)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class _Static:
    """What cannot change while the node is up: read once per GPU index."""

    uuid: str
    name: str
    minor: int | None
    pci_bus_id: str


class NvmlTelemetry(Telemetry):
    """NVML telemetry. ``module`` replaces ``pynvml`` (tests inject a recorded double)."""

    name = "nvml"

    def __init__(self, module: Any | None = None, *, proc_root: Path = Path("/proc")) -> None:
        if module is None:
            try:
                import pynvml
            except ImportError as e:
                raise ConfigError(NVML_MISSING) from e
            module = pynvml
        self._nv: Any = module
        self._proc_root = proc_root
        self._static: dict[int, _Static] = {}
        self._v2 = hasattr(module, "nvmlMemory_v2")
        self._lock = threading.Lock()
        self._open = False
        try:
            self._nv.nvmlInit()
        except self._nv.NVMLError as e:
            raise TelemetryError("NVML did not initialise (is the NVIDIA driver loaded?)") from e
        self._open = True

    # -- NVML access -------------------------------------------------------------------

    def _code(self, e: Exception) -> int:
        return int(getattr(e, "value", -1))

    def _call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self._open:
            raise TelemetryError(f"NVML telemetry is closed (reading {what})")
        try:
            return fn(*args, **kwargs)
        except self._nv.NVMLError as e:
            raise TelemetryError(f"NVML: could not read {what}") from e

    def _optional(self, what: str, fn: Callable[..., Any], *args: Any, allow: tuple[int, ...]) -> Any:
        """Like _call, but the NVML error codes in ``allow`` mean "not available" (``None``)."""
        try:
            return fn(*args)
        except self._nv.NVMLError as e:
            if self._code(e) in allow:
                return None
            raise TelemetryError(f"NVML: could not read {what}") from e

    def _handles(self) -> list[tuple[int, Any]]:
        count = int(self._call("the GPU count", self._nv.nvmlDeviceGetCount))
        return [(i, self._call(f"GPU {i}", self._nv.nvmlDeviceGetHandleByIndex, i)) for i in range(count)]

    def _static_info(self, index: int, h: Any) -> _Static:
        info = self._static.get(index)
        if info is None:
            nv, where = self._nv, f"GPU {index}"
            minor = self._optional(f"{where} minor number", nv.nvmlDeviceGetMinorNumber, h, allow=(_NOT_SUPPORTED,))
            pci = self._call(f"{where} PCI info", nv.nvmlDeviceGetPciInfo, h)
            info = _Static(
                uuid=_text(self._call(f"{where} UUID", nv.nvmlDeviceGetUUID, h)),
                name=_text(self._call(f"{where} name", nv.nvmlDeviceGetName, h)),
                minor=None if minor is None else int(minor),
                pci_bus_id=_text(getattr(pci, "busId", "")),
            )
            with self._lock:
                self._static[index] = info
        return info

    def _memory(self, where: str, h: Any) -> tuple[int, int, int]:
        """``(total, reserved, used)`` MiB, v2 struct when the driver has it."""
        nv = self._nv
        if self._v2:
            try:
                m = nv.nvmlDeviceGetMemoryInfo(h, version=nv.nvmlMemory_v2)
                return _floor_mib(m.total), _ceil_mib(m.reserved), _ceil_mib(m.used)
            except nv.NVMLError as e:
                if self._code(e) not in (_NOT_SUPPORTED, _FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH):
                    raise TelemetryError(f"NVML: could not read {where} memory") from e
                self._v2 = False  # an older driver: do not ask again on every call
        m = self._call(f"{where} memory", nv.nvmlDeviceGetMemoryInfo, h)
        return _floor_mib(m.total), 0, _ceil_mib(m.used)

    def _mig_enabled(self, where: str, h: Any) -> bool:
        mode = self._optional(f"{where} MIG mode", self._nv.nvmlDeviceGetMigMode, h, allow=(_NOT_SUPPORTED,))
        return mode is not None and int(mode[0]) == int(getattr(self._nv, "NVML_DEVICE_MIG_ENABLE", 1))

    def _mig_handles(self, where: str, h: Any) -> list[Any]:
        nv = self._nv
        count = int(self._call(f"{where} MIG device count", nv.nvmlDeviceGetMaxMigDeviceCount, h))
        found = []
        for j in range(count):
            mh = self._optional(f"{where} MIG device {j}", nv.nvmlDeviceGetMigDeviceHandleByIndex, h, j,
                                allow=(_NOT_FOUND,))
            if mh is not None:
                found.append(mh)
        return found

    def _mig_instance(self, where: str, h: Any, mh: Any) -> MigInstance:
        nv = self._nv
        uuid = _text(self._call(f"{where} MIG device UUID", nv.nvmlDeviceGetUUID, mh))
        what = f"{where} MIG device {uuid}"
        gi = int(self._call(f"{what} GPU instance id", nv.nvmlDeviceGetGpuInstanceId, mh))
        ci = int(self._call(f"{what} compute instance id", nv.nvmlDeviceGetComputeInstanceId, mh))
        mem = self._call(f"{what} memory", nv.nvmlDeviceGetMemoryInfo, mh)
        name = _text(self._call(f"{what} name", nv.nvmlDeviceGetName, mh))
        match = _MIG_PROFILE_RE.search(name)
        if match is None:
            raise TelemetryError(f"NVML: cannot tell the MIG profile of {what} from its name '{name}'")
        start = size = None
        gi_handle = self._optional(f"{what} GPU instance", nv.nvmlDeviceGetGpuInstanceById, h, gi,
                                   allow=(_NO_PERMISSION, _NOT_SUPPORTED, _FUNCTION_NOT_FOUND))
        if gi_handle is not None:
            info = self._optional(f"{what} GPU instance info", nv.nvmlGpuInstanceGetInfo, gi_handle,
                                  allow=(_NO_PERMISSION, _NOT_SUPPORTED, _FUNCTION_NOT_FOUND))
            if info is not None:
                start, size = int(info.placement.start), int(info.placement.size)
        return MigInstance(uuid=uuid, profile=match.group(1), memory_mib=_floor_mib(mem.total), gi_id=gi, ci_id=ci,
                           placement_start=start, placement_size=size)

    # -- the interface -----------------------------------------------------------------

    def gpus(self) -> list[GpuInfo]:
        out = []
        for index, h in self._handles():
            where = f"GPU {index}"
            static = self._static_info(index, h)
            total, reserved, used = self._memory(where, h)
            mig = self._mig_enabled(where, h)
            instances = tuple(self._mig_instance(where, h, mh) for mh in self._mig_handles(where, h)) if mig else ()
            out.append(GpuInfo(
                index=index, uuid=static.uuid, name=static.name, total_mib=total, reserved_mib=reserved,
                used_mib=used, minor=static.minor, pci_bus_id=static.pci_bus_id, mig_enabled=mig,
                mig_instances=instances,
            ))
        return out

    def _running(self, what: str, h: Any) -> dict[int, int]:
        """pid → used MiB of the compute and graphics processes on one (MIG) device."""
        nv = self._nv
        found: dict[int, int] = {}
        lists = [self._call(f"{what} compute processes", nv.nvmlDeviceGetComputeRunningProcesses, h)]
        graphics = getattr(nv, "nvmlDeviceGetGraphicsRunningProcesses", None)
        if graphics is not None:
            # best effort: compute processes are what leases are about
            allow = (_NOT_SUPPORTED, _NO_PERMISSION)
            lists.append(self._optional(f"{what} graphics processes", graphics, h, allow=allow) or [])
        for entries in lists:
            for p in entries:
                pid = int(p.pid)
                # a process using both engines is listed twice, with the same memory
                found[pid] = max(found.get(pid, 0), _ceil_mib(p.usedGpuMemory))
        return found

    def processes(self) -> list[GpuProcess]:
        out = []
        for index, h in self._handles():
            where = f"GPU {index}"
            places: list[tuple[str | None, Any]]
            if self._mig_enabled(where, h):
                places = []
                for mh in self._mig_handles(where, h):
                    uuid = _text(self._call(f"{where} MIG device UUID", self._nv.nvmlDeviceGetUUID, mh))
                    places.append((uuid, mh))
            else:
                places = [(None, h)]
            for mig_uuid, handle in places:
                for pid, mib in self._running(f"{where}" + (f" MIG device {mig_uuid}" if mig_uuid else ""),
                                              handle).items():
                    comm, uid, user = proc_identity(pid, self._proc_root)
                    out.append(GpuProcess(pid=pid, gpu_index=index, used_mib=mib, name=comm or "", uid=uid,
                                          user=user, mig_uuid=mig_uuid))
        return out

    def close(self) -> None:
        if self._open:
            self._open = False
            # close() runs in finally blocks and __exit__: a failing shutdown (the driver went
            # away) must not replace the error being handled, and there is nothing to retry.
            with contextlib.suppress(self._nv.NVMLError):
                self._nv.nvmlShutdown()
