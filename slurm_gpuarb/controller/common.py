"""What the controller's steps share: its settings, a job's lease spec and class, the decision rows.

Every step of a tick works from one ``squeue --json`` listing (:class:`~slurm_gpuarb.slurm.base.JobInfo`
records) and writes each action it takes as a ledger decision row in the ``agent`` plane, so
``gpuarb explain JOB`` tells the story. :class:`Context` carries what they all need.

Settings are ``cfg.controller`` (:class:`~slurm_gpuarb.model.ControllerConfig`, the ``[controller]``
table): the tick's interval, whether to shrink, and how holder jobs are submitted.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final, Protocol

from .. import spec as specmod
from ..errors import LeaseSpecError
from ..logsink import log
from ..model import ControllerConfig, LeaseSpec, Reservation

if TYPE_CHECKING:
    from ..config import Config
    from ..ledger import Ledger
    from ..lua import SubmitTables
    from ..slurm.base import JobInfo, SlurmAdapter

__all__ = [
    "LOG_AS",
    "PLANE",
    "Context",
    "JobLease",
    "ProbeFn",
    "ProbeStatus",
    "job_class",
    "job_lease",
    "settings_of",
]

PLANE: Final = "agent"  # the decision rows' plane (DecisionRecord.plane)
LOG_AS: Final = "gpuarbd-controller"
_MARKER_BOUNDARY: Final = specmod.MARKER_BOUNDARY


def settings_of(cfg: Config, *, interval_s: float | None = None) -> ControllerConfig:
    """``cfg.controller`` (the ``[controller]`` table; its defaults when the config has none), with
    ``interval_s`` replacing the interval when given (``gpuarbd --interval``)."""
    settings: ControllerConfig = getattr(cfg, "controller", None) or ControllerConfig()
    return settings if interval_s is None else replace(settings, interval_s=float(interval_s))


class ProbeStatus(Protocol):
    """What the controller reads of a probe's answer (``slurm_gpuarb.services.ServiceStatus`` has it)."""

    @property
    def state(self) -> str:
        """``up`` | ``degraded`` | ``busy`` | ``down``."""

    @property
    def reason(self) -> str:
        """Why, in a few words (``HTTP 500``, ``llama3:8b loaded, 10.8GiB on the GPU``)."""

    @property
    def observed_vram_mib(self) -> int | None:
        """GPU memory the service was seen holding, if it says."""


#: asks whether a reservation's service is up; ``None``: it could not be probed (no probe configured)
ProbeFn = Callable[[Reservation], "ProbeStatus | None"]


# --------------------------------------------------------------------------- a job's lease


@dataclass(frozen=True)
class JobLease:
    """The lease spec in a job's comment: the spec, the text before its marker, whether it is canonical."""

    spec: LeaseSpec
    prefix: str
    canonical: bool  # the gpuarb/1: form job_submit writes (its GRES was mapped from the spec)


_MARKER_RE: Final = re.compile(specmod.MARKER_RE.pattern, re.ASCII)


def job_lease(job: JobInfo) -> JobLease | None:
    """The lease spec of ``job``'s comment; ``None`` when it has none or it does not parse (job_submit
    refused such specs; whatever is there now is not the controller's to act on)."""
    comment = job.comment
    if not comment or "gpuarb" not in comment:
        return None
    try:
        lease = specmod.parse(comment)
    except LeaseSpecError:
        return None
    if lease is None:
        return None
    for m in _MARKER_RE.finditer(comment):
        if m.start() == 0 or comment[m.start() - 1] in _MARKER_BOUNDARY:
            return JobLease(lease, comment[: m.start()], m.group(1) is not None)
    return None  # parse() found a marker, so this is not reached


def job_class(cfg: Config, job: JobInfo, lease: JobLease | None = None) -> str | None:
    """The priority class of a Slurm job: its spec's ``prio=``, else the class whose QoS is the job's
    QoS, else the default class. ``None`` when the spec names a class the config does not have."""
    lease = lease if lease is not None else job_lease(job)
    classes = cfg.policy.classes
    if lease is not None and lease.spec.prio is not None:
        return lease.spec.prio if lease.spec.prio in classes else None
    if job.qos:
        for name, c in classes.items():
            if (c.qos or name) == job.qos:
                return name
    return cfg.policy.default_class


# --------------------------------------------------------------------------- the shared context


class Context:
    """What every step needs: config, settings, ledger, Slurm, the clock, and the submit tables.

    ``uid`` is the user the agent submits holder jobs as (its own), so a user's job that merely
    carries a holder's name is never taken for one.
    """

    def __init__(self, cfg: Config, settings: ControllerConfig, ledger: Ledger, slurm: SlurmAdapter, *,
                 clock: Callable[[], float] = time.time, uid: int | None = None, log_as: str = LOG_AS) -> None:
        self.cfg = cfg
        self.settings = settings
        self.ledger = ledger
        self.slurm = slurm
        self.clock = clock
        self.uid = os.getuid() if uid is None else uid
        self.log_as = log_as
        self._tables: SubmitTables | None = None

    def tables(self) -> SubmitTables:
        """job_submit's view of the inventory (how a lease maps to GRES per partition), computed once.
        Raises :class:`~slurm_gpuarb.errors.RenderError` when the inventory cannot be mapped."""
        if self._tables is None:
            from ..lua import submit_tables  # jinja2 comes with it: only the controller pays, once

            self._tables = submit_tables(self.cfg)
        return self._tables

    def record(self, action: str, outcome: str, reason: str, *, node: str | None = None, job_id: str | None = None,
               restart_count: int = 0, prio: str | None = None, requested_mib: int | None = None,
               granted_mib: int | None = None, inputs: Mapping[str, Any] | None = None,
               now: float | None = None) -> int:
        """One decision row in the ``agent`` plane, and the same story in the log; returns the row's id."""
        row = self.ledger.record(plane=PLANE, action=action, outcome=outcome, node=node, reason=reason, job_id=job_id,
                                 restart_count=restart_count, prio=prio, requested_mib=requested_mib,
                                 granted_mib=granted_mib, inputs=inputs, now=self.clock() if now is None else now)
        log(self.log_as, action, outcome=outcome, job=job_id, node=node, reason=reason, decision=row)
        return row
