"""``fake:<preset>``: a real backend that reports GPUs which are not there.

For tests, the demo cluster, docker-slurm and laptops (mig-parted's fake DGX-A100). A
*preset* (``presets/<name>.json``, shipped with the package) describes a node's GPUs with
the numbers NVML reports for that SKU — total and reserved memory, name, MIG layout — and
the processes already on them (the ``rtx3090ti-24g`` preset carries the Ollama server of
the user story). Fake UUIDs are stable (``GPU-fake-<preset>-<i>``,
``MIG-fake-<preset>-<i>-<j>``) and the minor number equals the index.

Run-time changes (a test injecting a foreign process into one node, the demo starting an
"Ollama") go into an *overlay*, a JSON file ``$GPUARB_FAKE_STATE/<node>.json`` (or
``default.json`` without a node)::

    {"version": 1,
     "add": [{"pid": 77, "gpu_index": 0, "used_mib": 2048, "name": "python3", "uid": 1000}],
     "remove": [4242],
     "used_extra_mib": {"0": 512}}

``add`` puts processes on GPUs (replacing a preset process with the same pid), ``remove``
hides preset processes by pid, ``used_extra_mib`` is memory used outside any visible
process (another PID namespace, a leak). A GPU's ``used_mib`` is the sum of its processes
plus its extra. The overlay is re-read on every call, so a change made by another process
shows up at once; :func:`add_process`, :func:`remove_process`, :func:`set_used_extra` and
:func:`clear` change it atomically (``fcntl`` lock, then write-and-rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError, TelemetryError
from ..model import GpuInfo, GpuProcess, MigInstance
from .base import Telemetry

__all__ = [
    "STATE_ENV",
    "FakeTelemetry",
    "Overlay",
    "add_process",
    "clear",
    "load_preset",
    "overlay_path",
    "presets",
    "read_overlay",
    "remove_process",
    "set_used_extra",
]

STATE_ENV = "GPUARB_FAKE_STATE"
PRESET_DIR = Path(__file__).with_name("presets")
_NODE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PROCESS_KEYS = {f.name for f in dataclasses.fields(GpuProcess)}


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class Preset:
    """A parsed preset: the GPUs (with ``used_mib`` = 0) and the processes it starts with."""

    name: str
    description: str
    gpus: tuple[GpuInfo, ...]
    processes: tuple[GpuProcess, ...]


def presets() -> list[str]:
    """Names of the shipped presets, sorted (``fake:<name>`` selects one)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


class _Strict:
    """Reads one JSON object strictly; every error names the file and the key."""

    def __init__(self, where: str, obj: Any, context: str, error: type[Exception]) -> None:
        if not isinstance(obj, dict):
            raise error(f"{where}: {context} must be a JSON object, got {type(obj).__name__}")
        self.where, self.obj, self.context, self.error = where, obj, context, error

    def keys(self, allowed: set[str]) -> None:
        unknown = sorted(set(self.obj) - allowed)
        if unknown:
            raise self.error(f"{self.where}: unknown key '{unknown[0]}' in {self.context} "
                             f"(expected {', '.join(sorted(allowed))})")

    def int_(self, key: str, default: int | None = None, minimum: int = 0) -> int:
        value = self.obj.get(key, default)
        if value is None:
            raise self.error(f"{self.where}: {self.context} needs '{key}' (an integer)")
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(f"{self.where}: '{key}' in {self.context} must be an integer >= {minimum}, got {value!r}")
        return value

    def opt_int(self, key: str) -> int | None:
        return self.int_(key) if self.obj.get(key) is not None else None

    def str_(self, key: str, default: str | None = None) -> str:
        value = self.obj.get(key, default)
        if not isinstance(value, str):
            raise self.error(f"{self.where}: '{key}' in {self.context} must be a string, got {value!r}")
        return value

    def opt_str(self, key: str) -> str | None:
        return self.str_(key) if self.obj.get(key) is not None else None

    def list_(self, key: str) -> list[Any]:
        value = self.obj.get(key, [])
        if not isinstance(value, list):
            raise self.error(f"{self.where}: '{key}' in {self.context} must be a list, got {value!r}")
        return value


def _process(where: str, raw: Any, context: str, error: type[Exception]) -> GpuProcess:
    r = _Strict(where, raw, context, error)
    r.keys(_PROCESS_KEYS)
    return GpuProcess(
        pid=r.int_("pid", minimum=1), gpu_index=r.int_("gpu_index"), used_mib=r.int_("used_mib"),
        name=r.str_("name", ""), uid=r.opt_int("uid"), user=r.opt_str("user"),
        mig_uuid=r.opt_str("mig_uuid"), job_id=r.opt_str("job_id"),
    )


def _process_dict(p: GpuProcess) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(p).items() if v is not None}


@lru_cache(maxsize=32)
def load_preset(name: str) -> Preset:
    """The preset ``name``; ``ConfigError`` (with the nearest name and the list) when there is none."""
    path = PRESET_DIR / f"{name}.json"
    if "/" in name or not path.is_file():
        names = presets()
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown fake telemetry preset '{name}'{hint} (presets: {', '.join(names)})")
    where = str(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not read fake telemetry preset {where}") from e
    top = _Strict(where, raw, "the preset", ConfigError)
    top.keys({"version", "description", "gpus", "processes"})
    if top.int_("version") != 1:
        raise ConfigError(f"{where}: unsupported preset version {raw['version']} (expected 1)")
    gpus: list[GpuInfo] = []
    for g_raw in top.list_("gpus"):
        g = _Strict(where, g_raw, f"gpus[{len(gpus)}]", ConfigError)
        g.keys({"sku", "name", "total_mib", "reserved_mib", "count", "pci_bus_ids", "mig_enabled", "mig"})
        count = g.int_("count", 1, minimum=1)
        if g.int_("reserved_mib") >= g.int_("total_mib", minimum=1):
            raise ConfigError(f"{where}: gpus[{len(gpus)}] reserves all of its memory (reserved_mib >= total_mib)")
        buses = g.list_("pci_bus_ids")
        if buses and len(buses) != count:
            raise ConfigError(f"{where}: gpus[{len(gpus)}] has {len(buses)} pci_bus_ids for count {count}")
        mig_raw = g.list_("mig")
        mig_enabled = g.obj.get("mig_enabled", bool(mig_raw))
        if not isinstance(mig_enabled, bool) or (mig_raw and not mig_enabled):
            raise ConfigError(f"{where}: 'mig_enabled' in gpus[{len(gpus)}] must be true or false "
                              "(and true when 'mig' lists instances)")
        for k in range(count):
            index = len(gpus)
            instances = []
            for j, m_raw in enumerate(mig_raw):
                m = _Strict(where, m_raw, f"gpus[{index}].mig[{j}]", ConfigError)
                m.keys({"profile", "memory_mib", "gi_id", "ci_id", "placement_start", "placement_size"})
                instances.append(MigInstance(
                    uuid=f"MIG-fake-{name}-{index}-{j}", profile=m.str_("profile"), memory_mib=m.int_("memory_mib"),
                    gi_id=m.int_("gi_id"), ci_id=m.int_("ci_id", 0), placement_start=m.opt_int("placement_start"),
                    placement_size=m.opt_int("placement_size"),
                ))
            gpus.append(GpuInfo(
                index=index, uuid=f"GPU-fake-{name}-{index}", name=g.str_("name"), total_mib=g.int_("total_mib"),
                reserved_mib=g.int_("reserved_mib"), used_mib=0, minor=index, sku=g.opt_str("sku"),
                pci_bus_id=str(buses[k]) if buses else f"00000000:{index + 1:02X}:00.0",
                mig_enabled=mig_enabled, mig_instances=tuple(instances),
            ))
    procs = tuple(_process(where, p, f"processes[{i}]", ConfigError) for i, p in enumerate(top.list_("processes")))
    preset = Preset(name, top.str_("description", ""), tuple(gpus), procs)
    _check(preset.gpus, procs, {}, where, ConfigError)
    return preset


# --------------------------------------------------------------------------- overlay


@dataclass(frozen=True)
class Overlay:
    """Run-time changes to a preset (see the module docstring)."""

    add: tuple[GpuProcess, ...] = ()
    remove: tuple[int, ...] = ()
    used_extra_mib: Mapping[int, int] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "version": 1,
            "add": [_process_dict(p) for p in self.add],
            "remove": list(self.remove),
            "used_extra_mib": {str(k): v for k, v in sorted(self.used_extra_mib.items())},
        }, indent=1) + "\n"


def overlay_path(state_dir: str | os.PathLike[str], node: str | None) -> Path:
    """``<state_dir>/<node>.json``, or ``<state_dir>/default.json`` without a node."""
    if node is not None and (_NODE_RE.fullmatch(node) is None or node in (".", "..")):
        raise ConfigError(f"node name '{node}' cannot name a fake telemetry overlay file "
                          "(expected letters, digits, '.', '_' or '-')")
    return Path(state_dir) / f"{node or 'default'}.json"


def read_overlay(path: Path) -> Overlay:
    """The overlay in ``path`` (empty when the file does not exist). ``TelemetryError`` names a bad file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Overlay()
    except OSError as e:
        raise TelemetryError(f"could not read fake telemetry overlay {path}") from e
    where = str(path)
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise TelemetryError(f"fake telemetry overlay {where} is not valid JSON (fix or delete it)") from e
    top = _Strict(where, raw, "the overlay", TelemetryError)
    top.keys({"version", "add", "remove", "used_extra_mib"})
    if top.int_("version", 1) != 1:
        raise TelemetryError(f"{where}: unsupported overlay version {raw['version']} (expected 1)")
    add = tuple(_process(where, p, f"add[{i}]", TelemetryError) for i, p in enumerate(top.list_("add")))
    remove = top.list_("remove")
    if not all(isinstance(p, int) and not isinstance(p, bool) for p in remove):
        raise TelemetryError(f"{where}: 'remove' must be a list of pids (integers), got {remove!r}")
    extra_raw = top.obj.get("used_extra_mib", {})
    extra = _Strict(where, extra_raw, "'used_extra_mib'", TelemetryError)
    used_extra: dict[int, int] = {}
    for key in extra_raw:
        if not (isinstance(key, str) and key.isdigit()):
            raise TelemetryError(f"{where}: 'used_extra_mib' keys must be GPU indices, got {key!r}")
        used_extra[int(key)] = extra.int_(key)
    return Overlay(add, tuple(remove), used_extra)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A separate lock file: the overlay itself is replaced by rename, so a lock on it
    # would be held on an inode that is no longer the file.
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _update(state_dir: str | os.PathLike[str], node: str | None, change: Callable[[Overlay], Overlay]) -> Overlay:
    path = overlay_path(state_dir, node)
    try:
        with _locked(path):
            new = change(read_overlay(path))
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(new.to_json())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        raise TelemetryError(f"could not write fake telemetry overlay {path}") from e
    return new


def add_process(state_dir: str | os.PathLike[str], node: str | None, process: GpuProcess) -> Overlay:
    """Put ``process`` on its GPU (replacing any process with the same pid, un-hiding a removed one)."""

    def change(o: Overlay) -> Overlay:
        add = (*(p for p in o.add if p.pid != process.pid), process)
        return dataclasses.replace(o, add=add, remove=tuple(p for p in o.remove if p != process.pid))

    return _update(state_dir, node, change)


def remove_process(state_dir: str | os.PathLike[str], node: str | None, pid: int) -> Overlay:
    """Take process ``pid`` off the GPUs: drop it from ``add`` and hide a preset process with that pid."""

    def change(o: Overlay) -> Overlay:
        remove = o.remove if pid in o.remove else (*o.remove, pid)
        return dataclasses.replace(o, add=tuple(p for p in o.add if p.pid != pid), remove=remove)

    return _update(state_dir, node, change)


def set_used_extra(state_dir: str | os.PathLike[str], node: str | None, gpu: int, mib: int) -> Overlay:
    """Set the memory used outside any visible process on GPU ``gpu`` (0 removes it)."""
    if mib < 0 or gpu < 0:
        raise ValueError("set_used_extra needs gpu >= 0 and mib >= 0")

    def change(o: Overlay) -> Overlay:
        extra = {k: v for k, v in o.used_extra_mib.items() if k != gpu}
        if mib:
            extra[gpu] = mib
        return dataclasses.replace(o, used_extra_mib=extra)

    return _update(state_dir, node, change)


def clear(state_dir: str | os.PathLike[str], node: str | None) -> None:
    """Drop every run-time change for ``node``: the preset shows as shipped."""
    path = overlay_path(state_dir, node)
    try:
        with _locked(path):
            path.unlink(missing_ok=True)
    except OSError as e:
        raise TelemetryError(f"could not remove fake telemetry overlay {path}") from e


# --------------------------------------------------------------------------- backend


def _check(gpus: tuple[GpuInfo, ...], procs: list[GpuProcess] | tuple[GpuProcess, ...],
           extra: Mapping[int, int], where: str, error: type[Exception]) -> list[int]:
    """Used MiB per GPU; refuses what real hardware could not show (memory beyond the GPU's)."""
    used = [0] * len(gpus)
    per_mig: dict[str, int] = {}
    for p in procs:
        if not 0 <= p.gpu_index < len(gpus):
            raise error(f"{where}: process {p.pid} is on GPU {p.gpu_index}, but there are {len(gpus)} GPUs")
        gpu = gpus[p.gpu_index]
        if p.mig_uuid is not None:
            if p.mig_uuid not in {m.uuid for m in gpu.mig_instances}:
                raise error(f"{where}: process {p.pid} names MIG instance {p.mig_uuid}, "
                            f"which GPU {p.gpu_index} does not have")
            per_mig[p.mig_uuid] = per_mig.get(p.mig_uuid, 0) + p.used_mib
        used[p.gpu_index] += p.used_mib
    for index, mib in extra.items():
        if not 0 <= index < len(gpus):
            raise error(f"{where}: used_extra_mib names GPU {index}, but there are {len(gpus)} GPUs")
        used[index] += mib
    for gpu in gpus:
        if used[gpu.index] > gpu.total_mib - gpu.reserved_mib:
            raise error(f"{where}: {used[gpu.index]} MiB used on GPU {gpu.index}, more than its "
                        f"{gpu.total_mib - gpu.reserved_mib} MiB (a real GPU would have failed the allocation)")
        for m in gpu.mig_instances:
            if per_mig.get(m.uuid, 0) > m.memory_mib:
                raise error(f"{where}: {per_mig[m.uuid]} MiB used in MIG instance {m.uuid}, "
                            f"more than its {m.memory_mib} MiB")
    return used


class FakeTelemetry(Telemetry):
    """The GPUs of a preset, plus the overlay of ``state_dir`` (default ``$GPUARB_FAKE_STATE``) for ``node``."""

    def __init__(self, preset: str, *, node: str | None = None,
                 state_dir: str | os.PathLike[str] | None = None) -> None:
        self.preset = load_preset(preset)
        self.name = f"fake:{preset}"
        self.node = node
        state = state_dir if state_dir is not None else os.environ.get(STATE_ENV) or None
        self.overlay_path = overlay_path(state, node) if state is not None else None

    def _read(self) -> tuple[list[GpuProcess], list[int]]:
        overlay = read_overlay(self.overlay_path) if self.overlay_path is not None else Overlay()
        hidden = set(overlay.remove) | {p.pid for p in overlay.add}
        procs = [p for p in self.preset.processes if p.pid not in hidden] + list(overlay.add)
        where = str(self.overlay_path) if self.overlay_path is not None else f"preset {self.preset.name}"
        used = _check(self.preset.gpus, procs, overlay.used_extra_mib, where, TelemetryError)
        return procs, used

    def gpus(self) -> list[GpuInfo]:
        _, used = self._read()
        return [dataclasses.replace(g, used_mib=used[g.index]) for g in self.preset.gpus]

    def processes(self) -> list[GpuProcess]:
        procs, _ = self._read()
        return procs
