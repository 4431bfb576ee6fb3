"""A stand-in for the ``pynvml`` module, built from a fixture in ``tests/data/nvml/``.

Only the calls the ``nvml`` backend makes exist; anything else is an ``AttributeError``
(so a new call in the backend fails the tests until the double learns it). Errors carry
NVML's codes, as nvidia-ml-py's ``NVMLError`` does (``e.value``).
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path
from typing import Any

NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNINITIALIZED = 1

_STRINGS = {
    1: "Uninitialized", 3: "Not Supported", 4: "Insufficient Permissions", 6: "Not Found",
    12: "NVML Shared Library Not Found", 13: "Function Not Found", 15: "GPU is lost",
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _STRINGS.get(self.value, f"NVML error {self.value}")


class _Dev:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw


class _Mig:
    def __init__(self, parent: _Dev, raw: dict[str, Any]) -> None:
        self.parent, self.raw = parent, raw


class _GpuInstance:
    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw


def _procs(entries: list[dict[str, Any]]) -> list[types.SimpleNamespace]:
    return [types.SimpleNamespace(**e) for e in entries]


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def build(fixture: dict[str, Any], *, privileged: bool = False, memory_v2: bool = True,
          init_error: int | None = None, fail: dict[str, int] | None = None) -> types.ModuleType:
    """A module object behaving like ``pynvml`` on the node ``fixture`` describes.

    ``privileged``: root-only calls (GPU instance lookup, aggregate MIG processes) work.
    ``memory_v2``: the driver has ``nvmlDeviceGetMemoryInfo_v2``. ``init_error``: ``nvmlInit``
    fails with that code. ``fail``: function name → error code it raises.
    """
    data = copy.deepcopy(fixture)
    devices = [_Dev(d) for d in data["devices"]]
    fail = fail or {}
    m = types.ModuleType("pynvml")
    state: dict[str, Any] = {"init": 0, "shutdown": 0, "calls": {}}
    m.state = state  # type: ignore[attr-defined]
    m.NVMLError = NVMLError  # type: ignore[attr-defined]
    m.nvmlMemory_v2 = 0x02000028  # type: ignore[attr-defined]
    m.NVML_DEVICE_MIG_ENABLE = 1  # type: ignore[attr-defined]
    m.NVML_DEVICE_MIG_DISABLE = 0  # type: ignore[attr-defined]

    def api(fn: Any) -> Any:
        name = fn.__name__

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            state["calls"][name] = state["calls"].get(name, 0) + 1
            if name in fail:
                raise NVMLError(fail[name])
            if name not in ("nvmlInit", "nvmlShutdown") and state["init"] <= state["shutdown"]:
                raise NVMLError(NVML_ERROR_UNINITIALIZED)
            return fn(*args, **kwargs)

        wrapper.__name__ = name
        setattr(m, name, wrapper)
        return wrapper

    @api
    def nvmlInit() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        state["init"] += 1

    @api
    def nvmlShutdown() -> None:
        state["shutdown"] += 1

    @api
    def nvmlDeviceGetCount() -> int:
        return len(devices)

    @api
    def nvmlDeviceGetHandleByIndex(i: int) -> _Dev:
        if not 0 <= i < len(devices):
            raise NVMLError(2)
        return devices[i]

    @api
    def nvmlDeviceGetUUID(h: _Dev | _Mig) -> str:
        return str(h.raw["uuid"])

    @api
    def nvmlDeviceGetName(h: _Dev | _Mig) -> str:
        return str(h.raw["name"])

    @api
    def nvmlDeviceGetMinorNumber(h: _Dev) -> int:
        if h.raw.get("minor") is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return int(h.raw["minor"])

    @api
    def nvmlDeviceGetPciInfo(h: _Dev) -> types.SimpleNamespace:
        # nvidia-ml-py returns the ctypes struct: busId is bytes
        return types.SimpleNamespace(busId=h.raw["pci_bus_id"].encode(), busIdLegacy=b"")

    @api
    def nvmlDeviceGetMemoryInfo(h: _Dev | _Mig, version: int | None = None) -> types.SimpleNamespace:
        mem = h.raw["memory"]
        if version:
            if not memory_v2:
                raise NVMLError(NVML_ERROR_FUNCTION_NOT_FOUND)
            free = mem["total"] - mem["reserved"] - mem["used"]
            return types.SimpleNamespace(version=version, total=mem["total"], reserved=mem["reserved"],
                                         used=mem["used"], free=free)
        # the v1 struct counts the driver's reservation as used
        used = mem["used"] + mem["reserved"]
        return types.SimpleNamespace(total=mem["total"], used=used, free=mem["total"] - used)

    @api
    def nvmlDeviceGetMigMode(h: _Dev) -> list[int]:
        if h.raw.get("mig_mode") is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return list(h.raw["mig_mode"])

    @api
    def nvmlDeviceGetMaxMigDeviceCount(h: _Dev) -> int:
        return int(h.raw.get("max_mig_device_count", 0))

    @api
    def nvmlDeviceGetMigDeviceHandleByIndex(h: _Dev, j: int) -> _Mig:
        for raw in h.raw["mig_devices"]:
            if raw["slot"] == j:
                return _Mig(h, raw)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    @api
    def nvmlDeviceGetGpuInstanceId(h: _Mig) -> int:
        return int(h.raw["gi_id"])

    @api
    def nvmlDeviceGetComputeInstanceId(h: _Mig) -> int:
        return int(h.raw["ci_id"])

    @api
    def nvmlDeviceGetGpuInstanceById(h: _Dev, gi: int) -> _GpuInstance:
        if not privileged:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        for raw in h.raw["mig_devices"]:
            if raw["gi_id"] == gi:
                return _GpuInstance(raw)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    @api
    def nvmlGpuInstanceGetInfo(gi: _GpuInstance) -> types.SimpleNamespace:
        p = gi.raw["placement"]
        return types.SimpleNamespace(id=gi.raw["gi_id"], placement=types.SimpleNamespace(**p))

    @api
    def nvmlDeviceGetComputeRunningProcesses(h: _Dev | _Mig) -> list[types.SimpleNamespace]:
        if isinstance(h, _Mig):
            return _procs(h.raw["compute_processes"])
        if h.raw.get("mig_mode") and h.raw["mig_mode"][0] == 1:
            # NVML: on a MIG-enabled parent, aggregate information needs privileges
            if not privileged:
                raise NVMLError(NVML_ERROR_NO_PERMISSION)
            return _procs([p for d in h.raw["mig_devices"] for p in d["compute_processes"]])
        return _procs(h.raw["compute_processes"])

    @api
    def nvmlDeviceGetGraphicsRunningProcesses(h: _Dev | _Mig) -> list[types.SimpleNamespace]:
        if isinstance(h, _Mig):
            return []
        return _procs(h.raw.get("graphics_processes", []))

    return m
