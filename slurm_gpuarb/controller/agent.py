"""The controller agent's loop: ``gpuarbd --role controller`` on the slurmctld host (as root or SlurmUser).

Every ``interval_s`` seconds (``[controller] interval``, or ``gpuarbd --interval``) one *tick*:

1. list every job once (``squeue --json`` through the Slurm adapter); if Slurm cannot be asked, the
   tick is logged and skipped (nothing is decided on a guess) and the next one tries again;
2. **shrink** pending jobs past their ``wait=`` to ``min=`` (:mod:`.shrink`);
3. **holders**: keep, cancel or resubmit the holder jobs of ``mode = "holder"`` reservations
   (:mod:`.holders`);
4. **reconcile**: record preempted runs' leases as revoked, expire orphaned leases cluster-wide
   (:mod:`.reconcile`).

A step that fails is logged and the others still run. Every action is a decision row in the
``agent`` plane. The agent serves no socket: it only acts on Slurm and the ledger, and nothing
asks it anything (the hooks talk to the node daemon). SIGTERM or SIGINT ends it after the step in
progress; its PID is in ``<state_dir>/gpuarbd-controller.pid`` (beside a node daemon's on the same
host). Probes are called only through ``probe_fn``, by default
:func:`slurm_gpuarb.services.probe_reservation` on the reservation.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Final

from ..errors import GpuArbError
from ..logsink import log
from ..model import ControllerConfig, Reservation
from .common import LOG_AS, Context, ProbeFn, ProbeStatus, settings_of
from .holders import Holders
from .reconcile import Reconciler
from .shrink import Shrinker

if TYPE_CHECKING:
    from ..config import Config
    from ..ledger import Ledger
    from ..slurm.base import SlurmAdapter

__all__ = ["PID_FILE", "Controller", "Tick", "default_probe"]

PID_FILE: Final = "gpuarbd-controller.pid"


@dataclass
class Tick:
    """What one tick did: when, how many jobs Slurm listed (None: Slurm could not be asked), the actions
    taken (``shrink job 42``, ``hold ollama job 57`` …) and the steps that failed (``holders: …``)."""

    at: float
    jobs: int | None = None
    actions: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def default_probe(cfg: Config) -> ProbeFn:
    """``probe_fn`` over :func:`slurm_gpuarb.services.probe_reservation` (the reservation's own ``probe``;
    ``None`` for a reservation without one). ``cfg`` is for a future choice of probe settings."""

    def probe(res: Reservation) -> ProbeStatus | None:
        from ..services import probe_reservation  # the HTTP clients: only the controller's loop needs them

        return probe_reservation(res)

    return probe


class Controller:
    """The agent: :meth:`tick` once (tests), :meth:`run` until stopped, or :meth:`serve` as ``gpuarbd`` does.

    ``ledger`` and ``slurm`` default to the config's ledger and the ``cli`` adapter, opened by
    :meth:`start`; ``clock`` (Unix seconds) and ``probe_fn`` are injectable so a test needs neither
    sleeps nor HTTP. ``settings`` replaces what :func:`~.common.settings_of` reads from ``cfg``
    (``interval_s`` then only overrides the interval of the config's settings).
    """

    def __init__(self, cfg: Config, *, ledger: Ledger | None = None, slurm: SlurmAdapter | None = None,
                 probe_fn: ProbeFn | None = None, clock: Callable[[], float] = time.time,
                 interval_s: float | None = None, settings: ControllerConfig | None = None, uid: int | None = None,
                 log_as: str = LOG_AS) -> None:
        self.cfg = cfg
        self.settings = settings if settings is not None else settings_of(cfg, interval_s=interval_s)
        self._ledger, self._slurm = ledger, slurm
        self._owns_ledger = ledger is None
        self.clock = clock
        self.probe_fn = probe_fn if probe_fn is not None else default_probe(cfg)
        self.uid, self.log_as = uid, log_as
        self.pid_file = Path(cfg.state_dir) / PID_FILE
        self.stop_requested = threading.Event()
        self._steps: tuple[Shrinker, Holders, Reconciler] | None = None
        self.ticks = 0

    # ------------------------------------------------------------------ one tick

    def start(self) -> None:
        """Open the ledger and the Slurm adapter (raises GpuArbError when the ledger cannot be used)."""
        if self._steps is not None:
            return
        if self._ledger is None:
            from ..ledger import Ledger

            pw = self.cfg.pg_password_file
            self._ledger = Ledger.open(self.cfg.ledger_url, create=True, password_file=None if pw is None else str(pw))
        if self._slurm is None:
            from ..slurm import select_adapter

            self._slurm = select_adapter("cli")
        ctx = Context(self.cfg, self.settings, self._ledger, self._slurm, clock=self.clock, uid=self.uid,
                      log_as=self.log_as)
        self._steps = (Shrinker(ctx), Holders(ctx, self.probe_fn), Reconciler(ctx))

    def tick(self) -> Tick:
        """List Slurm's jobs once, then shrink, holders, reconcile. Never raises for a failing step."""
        self.start()
        assert self._steps is not None and self._slurm is not None
        shrinker, holders, reconciler = self._steps
        listed_at = self.clock()
        out = Tick(at=listed_at)
        self.ticks += 1
        try:
            jobs = self._slurm.jobs()
        except Exception as e:  # slurmctld down or slow: decide nothing on a guess, try next tick
            out.errors.append(f"slurm: {_text(e)}")
            log(self.log_as, "tick skipped: Slurm could not be asked", level="warning", error=_text(e))
            return out
        out.jobs = len(jobs)
        now = self.clock()
        steps: tuple[tuple[str, Callable[[], list[str]]], ...] = (
            ("shrink", lambda: shrinker.step(jobs, now)),
            ("holders", lambda: holders.step(jobs, now)),
            ("reconcile", lambda: reconciler.step(jobs, now, listed_at)),
        )
        for name, step in steps:
            try:
                out.actions += step()
            except Exception as e:  # one step's failure (a ledger hiccup, Slurm refusing) must not stop the rest
                out.errors.append(f"{name}: {_text(e)}")
                log(self.log_as, f"{name} step failed", level="warning", error=_text(e))
        return out

    # ------------------------------------------------------------------ the loop

    def run(self, stop: threading.Event | None = None) -> None:
        """Tick every ``interval_s`` until ``stop`` (default :attr:`stop_requested`) is set."""
        stop = stop if stop is not None else self.stop_requested
        while not stop.is_set():
            started = time.monotonic()
            self.tick()
            stop.wait(max(0.0, self.settings.interval_s - (time.monotonic() - started)))

    def serve(self, on_ready: Callable[[], object] | None = None) -> None:
        """:meth:`start`, write the PID file, call ``on_ready``, :meth:`run` until SIGTERM/SIGINT (main thread
        only), then clean up. Raises GpuArbError when it cannot start."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop_requested.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            self._write_pid_file()
            log(self.log_as, "running", pid=os.getpid(), interval=self.settings.interval_s,
                holders=",".join(r.name for r in self.cfg.reservations if r.mode == "holder") or None,
                shrink=self.settings.shrink)
            if on_ready is not None:
                on_ready()
            self.run()
        finally:
            self.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        log(self.log_as, "stopped", pid=os.getpid(), ticks=self.ticks)

    def close(self) -> None:
        """Remove the PID file and close the ledger this agent opened. Idempotent."""
        try:
            if self.pid_file.read_text(encoding="ascii").strip() == str(os.getpid()):
                self.pid_file.unlink()
        except (OSError, ValueError):
            pass
        if self._owns_ledger and self._ledger is not None:
            self._ledger.close()
            self._ledger = None
            self._steps = None

    def _write_pid_file(self) -> None:
        try:
            self.pid_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            tmp = self.pid_file.with_name(f".{PID_FILE}.{os.getpid()}")
            tmp.write_text(f"{os.getpid()}\n", encoding="ascii")
            os.replace(tmp, self.pid_file)
        except OSError as e:
            from ..errors import ConfigError

            raise ConfigError(f"cannot write {self.pid_file}: check [daemon] state_dir") from e


def _text(e: BaseException) -> str:
    return str(e) if isinstance(e, GpuArbError) else f"{type(e).__name__}: {e}"
