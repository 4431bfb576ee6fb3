"""The Slurm interface, the job record that crosses it, and the adapter registry.

The daemon asks Slurm three kinds of question: which jobs exist (to reconcile the ledger:
a lease whose job no longer runs on its node is expired), what a job asked for (its comment
and its requested GRES, when the Prolog could not see them), and — for the health check and
``gpuarb node resume`` — to drain or resume a node. The controller agent (``gpuarbd --role
controller``) also changes jobs: it shrinks a pending job's GRES (:meth:`SlurmAdapter.update_job`),
and submits and cancels reservation holder jobs (:meth:`SlurmAdapter.submit`,
:meth:`SlurmAdapter.cancel`). :class:`SlurmAdapter` is that whole surface. Two adapters ship:

* ``cli`` (the default): ``squeue --json`` and ``scontrol`` through :mod:`slurm_gpuarb.subproc`,
  parsed by the JSON's version (openapi v0.0.38 of Slurm 22.05; data_parser v0.0.39–v0.0.42 of
  23.02–24.11, where numbers became ``{set, infinite, number}``);
* ``pyslurm``: registered with a *deferred error* (ReFrame's ``register_scheduler(...,
  error=...)``), because no pyslurm release builds against Slurm 22.05; a site whose Slurm
  matches its pyslurm gets it behind the same interface.

Hooks never use this module: Slurm's Prolog guide warns against calling ``squeue`` or
``scontrol`` from a Prolog, and everything a hook needs is in its environment or the daemon.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from ..errors import ConfigError, GpuArbError

__all__ = [
    "DEFAULT_BIN_DIR",
    "DEFAULT_TIMEOUT",
    "IDLE_STATES",
    "PYSLURM_ERROR",
    "UPDATE_KEYS",
    "Factory",
    "JobInfo",
    "JobNotPending",
    "SlurmAdapter",
    "SlurmError",
    "adapters",
    "register",
    "select_adapter",
]

#: where Debian's (and SchedMD's RPMs') Slurm client commands live: hooks and daemons get no PATH
DEFAULT_BIN_DIR: Final = "/usr/bin"
#: seconds a Slurm command may take; a busy slurmctld answers in well under a second
DEFAULT_TIMEOUT: Final = 10.0

#: job states that hold no allocation on any node (pending, or finished for good). Every other
#: state — RUNNING, SUSPENDED, STOPPED and the transitional CONFIGURING (the Prolog runs then),
#: COMPLETING (the Epilog runs then), REQUEUED, RESIZING, SIGNALING, STAGE_OUT — still does.
IDLE_STATES: Final = frozenset({
    "PENDING", "COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "OUT_OF_MEMORY", "REVOKED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT",
})

#: the job fields :meth:`SlurmAdapter.update_job` may change (``scontrol update JobId=X Key=Value``):
#: a fixed table, so no caller can reach a field such as ``UserId`` or ``TimeLimit`` by accident
UPDATE_KEYS: Final = frozenset({"Comment", "TresPerNode", "Gres", "Partition", "QOS"})

PYSLURM_ERROR: Final = (
    "pyslurm has no release matching Slurm 22.05 (PyPI: 17.11, 18.8, 25.11; 25.11 refuses libslurm ≠ 25.11): "
    "use the default cli adapter"
)


class SlurmError(GpuArbError):
    """Slurm could not be asked, refused, or answered something this version cannot read."""


class JobNotPending(SlurmError):
    """A change that Slurm allows only on a pending job was asked of a job that has started (or ended)
    meanwhile: Slurm answers "Job is no longer pending execution"."""


@dataclass(frozen=True)
class JobInfo:
    """One Slurm job as the adapter saw it; the same for every adapter and Slurm version.

    ``job_id`` is Slurm's job id as text (the ``SLURM_JOB_ID`` a hook sees). ``state`` is the
    job state as Slurm 22.05's ``job_state_string()`` names it: a transitional flag when one is
    set (``CONFIGURING``, ``COMPLETING``, ``REQUEUED`` …), else the base state (``PENDING``,
    ``RUNNING``, ``COMPLETED`` …); newer Slurm reports a list of base state and flags, which the
    adapter folds the same way. ``restart_count`` is ``SLURM_JOB_RESTART_COUNT`` (0 until the
    job is requeued). ``nodes`` is the expanded node list of the allocation (empty while
    pending). ``comment`` is the raw ``--comment``; ``tres_per_node`` the raw per-node TRES
    request (``gres:shard:12`` in 22.05, ``gres/shard:12`` later) and ``gres_shards`` the shard
    count parsed from it (or from ``tres_per_job``), ``None`` for a job without shards.
    ``uid`` is ``None`` only where the adapter could not know it. ``name`` is the job name
    (``--job-name``). ``submit_time`` and ``start_time`` are Unix times, ``None`` when Slurm
    has none; for a *pending* job ``start_time`` is Slurm's expected start, not a fact.
    ``state_reason`` is why a pending job waits, as Slurm names it (``Resources``,
    ``Priority``, ``BeginTime``, ``Dependency`` …), empty when Slurm gives none (it prints
    ``None``).
    """

    job_id: str
    state: str
    restart_count: int
    nodes: tuple[str, ...]
    comment: str
    partition: str
    qos: str
    user: str
    uid: int | None
    tres_per_node: str
    gres_shards: int | None
    submit_time: float | None = None
    start_time: float | None = None
    state_reason: str = ""
    name: str = ""

    @property
    def holds_allocation(self) -> bool:
        """Whether the job occupies its nodes now (not pending, not finished): see :data:`IDLE_STATES`."""
        return bool(self.nodes) and self.state not in IDLE_STATES


class SlurmAdapter(ABC):
    """What slurm-gpuarb asks of Slurm's controller: jobs, and node drain/resume.

    Every method asks Slurm afresh (nothing is cached: the answer feeds decisions that expire
    leases). Errors: any failure to ask or to understand the answer raises
    :class:`SlurmError` whose message names the command or call, what went wrong and what to
    do (the cause is chained); an adapter that cannot work here at all raises
    :class:`~slurm_gpuarb.errors.ConfigError` from its constructor. No method ever passes text
    through a shell: a node name or a drain reason is one argument.

    Subclasses implement :meth:`jobs`, :meth:`drain`, :meth:`resume` and :meth:`node_state`;
    :meth:`running_on` has a default built on :meth:`jobs`. The job-changing methods the
    controller agent needs (:meth:`update_job`, :meth:`submit`, :meth:`cancel`) raise
    :class:`SlurmError` unless an adapter implements them (the ``cli`` adapter does), so an
    adapter that only reads keeps working.
    """

    #: the name it is selected by (``cli``, ``pyslurm``)
    name: str

    @abstractmethod
    def jobs(self, job_ids: Iterable[str | int] | None = None) -> list[JobInfo]:
        """The jobs slurmctld knows now: pending, active, and finished ones it still remembers
        (for ``MinJobAge``, 300 s by default), in Slurm's order.

        With ``job_ids``, only those jobs; an id Slurm does not know is simply absent (a job
        that finished long ago), never an error. Raises :class:`SlurmError`.
        """

    def running_on(self, node: str) -> list[JobInfo]:
        """The jobs that hold an allocation on ``node`` now (:attr:`JobInfo.holds_allocation`).

        Includes jobs whose Prolog (``CONFIGURING``) or Epilog (``COMPLETING``) is running,
        so the reconcile never expires the lease of a job that is starting or ending.
        """
        return [j for j in self.jobs() if node in j.nodes and j.holds_allocation]

    @abstractmethod
    def drain(self, node: str, reason: str) -> None:
        """Drain ``node``: running jobs go on, no new ones start, ``sinfo -R`` shows ``reason``.

        ``reason`` is free text (Slurm requires one); it is passed as data, never parsed by a
        shell, and control characters in it become spaces (``scontrol show node -o`` prints one
        line per node). Draining a drained node replaces its reason. Needs root or SlurmUser.
        """

    @abstractmethod
    def resume(self, node: str) -> None:
        """Undo a drain (``State=RESUME``). Resuming a node that is not drained does nothing."""

    @abstractmethod
    def node_state(self, node: str) -> str:
        """The node's state as ``scontrol show node`` prints it: ``IDLE``, ``MIXED+DRAIN``, ``DOWN*`` …

        A node Slurm does not know raises :class:`SlurmError`.
        """

    # The controller agent's writes. Not abstract: read-only adapters (and test doubles) need not care.

    def update_job(self, job_id: str, **fields: str) -> None:
        """Change fields of a job (``scontrol update JobId=X Comment=… TresPerNode=…``), all in one call.

        Keys are from :data:`UPDATE_KEYS` (another key is a ``ValueError``: a caller's bug). Values
        are passed as data, never through a shell. GRES can only change while the job is pending:
        a job that started meanwhile raises :class:`JobNotPending`. Slurm runs job_submit.lua's
        ``slurm_job_modify`` for the change, which lets root and SlurmUser shrink a job's GRES.
        """
        raise SlurmError(f"the {self.name} Slurm adapter cannot change jobs; use the cli adapter")

    def submit(self, args: Sequence[str], script: str) -> str:
        """Submit a batch job (``sbatch --parsable ARGS`` with ``script`` on stdin); returns its job id.

        ``args`` are sbatch options, one argv element each. A refusal (job_submit.lua's message,
        an unknown partition) raises :class:`SlurmError` carrying Slurm's own words.
        """
        raise SlurmError(f"the {self.name} Slurm adapter cannot submit jobs; use the cli adapter")

    def cancel(self, job_id: str) -> None:
        """Cancel a job (``scancel``). A job that has already ended, or that Slurm no longer knows, is
        not an error: the caller wanted it gone."""
        raise SlurmError(f"the {self.name} Slurm adapter cannot cancel jobs; use the cli adapter")


# --------------------------------------------------------------------------- registry

#: builds an adapter from the Slurm client directory and the per-command timeout (seconds)
Factory = Callable[[str, float], SlurmAdapter]


@dataclass(frozen=True)
class _Entry:
    name: str
    factory: Factory
    error: str | None


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, factory: Factory, error: str | None = None) -> None:
    """Make an adapter selectable as ``name``.

    ``error`` is the deferred error: when set, the adapter cannot work here and choosing it
    raises ``ConfigError(error)``, which should say what to use or install instead.
    Registering a name again replaces the earlier entry.
    """
    _REGISTRY[name] = _Entry(name, factory, error)


def adapters() -> dict[str, str | None]:
    """Registered adapter names and their deferred errors (``None``: usable)."""
    return {e.name: e.error for e in _REGISTRY.values()}


def select_adapter(name: str = "cli", *, bin_dir: str = DEFAULT_BIN_DIR,
                   timeout: float = DEFAULT_TIMEOUT) -> SlurmAdapter:
    """The Slurm adapter called ``name`` (``cli`` or ``pyslurm``).

    ``bin_dir`` is the absolute directory holding ``squeue`` and ``scontrol``; ``timeout`` the
    seconds each command may take. An unknown name, or one whose deferred error is set, raises
    :class:`~slurm_gpuarb.errors.ConfigError`.

    Example::

        slurm = select_adapter()
        live = {(j.job_id, j.restart_count) for j in slurm.running_on("n2")}
    """
    entry = _REGISTRY.get(name.strip())
    if entry is None:
        import difflib  # only on this error path

        close = difflib.get_close_matches(name.strip().lower(), list(_REGISTRY), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown Slurm adapter '{name}'{hint} (expected one of: {', '.join(sorted(_REGISTRY))})")
    if entry.error is not None:
        raise ConfigError(entry.error)
    if not bin_dir.startswith("/"):
        raise ConfigError(f"Slurm bin_dir must be an absolute path (hooks and daemons have no PATH), got '{bin_dir}'")
    if not timeout > 0:
        raise ConfigError(f"Slurm command timeout must be positive seconds, got {timeout!r}")
    return entry.factory(bin_dir, timeout)


# --------------------------------------------------------------------------- built-in adapters
# Factories import their module only when chosen.


def _cli_factory(bin_dir: str, timeout: float) -> SlurmAdapter:
    from .cli import CliSlurmAdapter

    return CliSlurmAdapter(bin_dir=bin_dir, timeout=timeout)


def _pyslurm_factory(bin_dir: str, timeout: float) -> SlurmAdapter:
    from .pyslurm import PyslurmAdapter

    return PyslurmAdapter(bin_dir=bin_dir, timeout=timeout)


def _pyslurm_available() -> bool:
    try:
        return importlib.util.find_spec("pyslurm") is not None
    except (ImportError, ValueError):
        return False


register("cli", _cli_factory)
register("pyslurm", _pyslurm_factory, error=None if _pyslurm_available() else PYSLURM_ERROR)
