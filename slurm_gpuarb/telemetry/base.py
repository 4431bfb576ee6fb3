"""The telemetry interface, the backend registry and the one ``select()`` factory.

A backend answers two questions about the local node: which GPUs are there (with their
memory and MIG layout) and which processes hold GPU memory. Three backends ship:
``nvml`` (nvidia-ml-py, the primary), ``smi`` (parses ``nvidia-smi``; for hosts where the
Python bindings are missing) and ``fake`` (presets of real GPUs, for tests, the demo
cluster and laptops). Backends register themselves with a *deferred error* (ReFrame's
``register_scheduler(..., error=...)``): one whose optional dependency is missing is
still known by name, and choosing it says what to install instead of "unknown backend".

``select("auto")`` follows mig-parted's ``NewMigModeManager``: NVML if it initialises,
else ``nvidia-smi`` if it runs, else a :class:`~slurm_gpuarb.errors.ConfigError`. It never
falls back to ``fake`` silently: a node that reports fake GPUs to a real scheduler would
hand out memory that does not exist.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .. import procfs
from ..errors import ConfigError, TelemetryError
from ..model import GpuInfo, GpuProcess

__all__ = [
    "Factory",
    "Telemetry",
    "backends",
    "proc_identity",
    "register",
    "select",
]


class Telemetry(ABC):
    """What the arbiter, the hooks and the agent may ask about the GPUs of *this* node.

    Every call reads the current state: implementations may cache what cannot change
    while the node is up (the index↔UUID↔minor mapping), never memory usage or the set
    of processes. All sizes are whole MiB. Nothing a backend returns refers to a library
    handle: only the frozen types of :mod:`slurm_gpuarb.model` cross this boundary.

    Errors: a reading that fails raises :class:`~slurm_gpuarb.errors.TelemetryError` whose
    message names the GPU or command and the cause; a backend that cannot be used at all
    as configured raises :class:`~slurm_gpuarb.errors.ConfigError` from its constructor.

    A backend is a context manager: ``with select("auto") as t: …`` closes it.
    """

    #: the name it is selected by (``nvml``, ``smi``, ``fake:h100-80g``); shown in logs and the ledger
    name: str

    @abstractmethod
    def gpus(self) -> list[GpuInfo]:
        """Every GPU of the node, ordered by NVML index.

        Indices are the NVML indices: unique, and ``0..n-1`` unless a GPU is hidden from
        the backend (then the gaps are real and must not be renumbered). ``total_mib >
        reserved_mib >= 0`` and ``used_mib <= total_mib``; ``used_mib`` excludes the driver's
        reservation (NVML v2 semantics). ``minor`` is the ``/dev/nvidiaN`` number when the
        backend can know it, else ``None``. On a MIG-enabled GPU ``mig_instances`` lists the
        GPU instances that exist now (possibly none).
        """

    @abstractmethod
    def processes(self) -> list[GpuProcess]:
        """Every process holding memory on a GPU of :meth:`gpus`, one entry per (pid, GPU, MIG instance).

        ``gpu_index`` refers to an index that :meth:`gpus` returns; ``mig_uuid`` is set when
        the backend can tell which MIG instance the process runs in. Fields the backend
        cannot know (``uid``/``user`` of a process in another PID namespace, memory a
        driver does not report) are ``None`` or ``0``; ``job_id`` is left to attribution.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release what the backend holds (an NVML session). Idempotent; the default does nothing."""

    def __enter__(self) -> Telemetry:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- process identity


def proc_identity(pid: int, proc_root: Path = Path("/proc")) -> tuple[str | None, int | None, str | None]:
    """``(comm, uid, user)`` of a live process (see :func:`slurm_gpuarb.procfs.identity`)."""
    return procfs.identity(pid, proc_root)


# --------------------------------------------------------------------------- registry

#: builds a backend from the text after ``name:`` (``""`` when there is none) and the node name
Factory = Callable[[str, str | None], Telemetry]


@dataclass(frozen=True)
class _Backend:
    name: str
    factory: Factory
    error: str | None


_REGISTRY: dict[str, _Backend] = {}


def register(name: str, factory: Factory, error: str | None = None) -> None:
    """Make a backend selectable as ``name`` or ``name:<arg>``.

    ``error`` is the deferred error: when set, the backend cannot work here (its optional
    package is missing) and choosing it raises ``ConfigError(error)``, which should say
    what to install. Registering a name again replaces the earlier entry.
    """
    _REGISTRY[name] = _Backend(name, factory, error)


def backends() -> dict[str, str | None]:
    """Registered backend names and their deferred errors (``None``: usable)."""
    return {b.name: b.error for b in _REGISTRY.values()}


def _presets() -> list[str]:
    from .fake import presets

    return presets()


def _presets_hint() -> str:
    return ", ".join(_presets())


def _choices() -> list[str]:
    return ["auto", *sorted(n for n in _REGISTRY if n != "fake"), *(f"fake:{p}" for p in _presets())]


def _build(backend: _Backend, arg: str, node: str | None) -> Telemetry:
    if backend.error is not None:
        raise ConfigError(backend.error)
    return backend.factory(arg, node)


def select(choice: str, *, node: str | None = None) -> Telemetry:
    """The telemetry backend named by ``choice``: ``auto`` | ``nvml`` | ``smi`` | ``fake:<preset>``.

    ``node`` is the Slurm node name; only ``fake`` uses it (several ``slurmd`` on one test
    host each see their own overlay). ``auto`` tries NVML, then ``nvidia-smi``, and raises
    :class:`ConfigError` naming both failures when neither works. An unknown choice
    raises :class:`ConfigError` with the nearest valid one.

    Example::

        with select("fake:rtx3090ti-24g") as t:
            free = [g.total_mib - g.reserved_mib - g.used_mib for g in t.gpus()]
    """
    text = choice.strip()
    if text == "auto":
        return _auto(node)
    name, _, arg = text.partition(":")
    backend = _REGISTRY.get(name)
    if backend is None:
        import difflib  # only on this error path: keeps the package import cheap

        options = _choices()
        close = difflib.get_close_matches(text.lower(), options, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown telemetry '{choice}'{hint} (expected auto, nvml, smi or fake:<preset>; "
            f"presets: {_presets_hint()})"
        )
    return _build(backend, arg, node)


def _auto(node: str | None) -> Telemetry:
    reasons: list[str] = []
    for name in ("nvml", "smi"):
        backend = _REGISTRY.get(name)
        if backend is None:
            reasons.append(f"no '{name}' backend is registered")
            continue
        if backend.error is not None:
            reasons.append(backend.error)
            continue
        try:
            return backend.factory("", node)
        except (TelemetryError, ConfigError) as e:
            from ..subproc import CommandNotFound

            if name == "smi" and isinstance(e.__cause__, CommandNotFound):
                reasons.append("nvidia-smi was not found")
            else:
                reasons.append(str(e))
    raise ConfigError(
        f"no GPU telemetry: {' and '.join(reasons)}; on a machine without GPUs use --telemetry fake:<preset> "
        f"(or GPUARB_TELEMETRY=fake:<preset>), presets: {_presets_hint()}"
    )


# --------------------------------------------------------------------------- built-in backends
# Factories import their module only when chosen: ``import pynvml`` alone costs ~60 ms, and
# the hooks import this package on every job.


def _nvml_factory(arg: str, node: str | None) -> Telemetry:
    _no_arg("nvml", arg)
    from .nvml import NvmlTelemetry

    return NvmlTelemetry()


def _smi_factory(arg: str, node: str | None) -> Telemetry:
    _no_arg("smi", arg)
    from .smi import SmiTelemetry

    return SmiTelemetry(probe=True)


def _fake_factory(arg: str, node: str | None) -> Telemetry:
    if not arg:
        raise ConfigError(f"telemetry 'fake' needs a preset: fake:<preset>, presets: {_presets_hint()}")
    from .fake import FakeTelemetry

    return FakeTelemetry(arg, node=node)


def _no_arg(name: str, arg: str) -> None:
    if arg:
        raise ConfigError(f"telemetry '{name}' takes no argument (got '{name}:{arg}'); write just '{name}'")


NVML_MISSING = "telemetry 'nvml' needs the nvidia-ml-py package: pip install nvidia-ml-py"

register("nvml", _nvml_factory, None if importlib.util.find_spec("pynvml") is not None else NVML_MISSING)
register("smi", _smi_factory)
register("fake", _fake_factory)
