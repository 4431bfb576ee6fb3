"""Outcome → exit code, for every hook, in one table.

What a non-zero exit does depends on the Slurm context (measured on Slurm 22.05, SLURM-LAB.md):

==================  ===========================================  ======================
hook                non-zero exit                                 so we exit non-zero …
==================  ===========================================  ======================
Prolog              node DRAINED "Prolog error", job requeued     only on a node fault
                    and held
Epilog              node DRAINED "Epilog error"                   only on a node fault
TaskProlog          job FAILED before its script runs             to enforce a refusal
PrologSlurmctld     batch job requeued (or cancelled)             only on a node fault
EpilogSlurmctld     logged                                        only on a node fault
HealthCheckProgram  logged ("health_check failed")                when a foreign VRAM
                                                                  holder was confirmed
==================  ===========================================  ======================

A **node fault** is a :class:`~slurm_gpuarb.errors.NodeFault` raised by the daemon or the in-process
arbiter (they decide what the node's own breakage is, e.g. the GPU Slurm gave this job does not exist
in telemetry at all), or a grant file the Prolog cannot write (the node's state directory is broken, so
no job could get its grant). Draining then is the point.

Never a node fault, never non-zero in the Prolog/Epilog: a user's bad lease spec, a run-time refusal
(the memory is not there), a daemon or ledger outage, a hook hitting its own deadline, a bug in the
hook. A refusal reaches the job through the grant file and the TaskProlog, which fails the job with
a printed reason and leaves the node up. With ``fail_mode = "closed"`` an outage is turned into such
a refusal (the job fails, the node stays up); with the default ``"open"`` the job runs unleased and
the log says why.

Stdlib only, no imports: the TaskProlog reads this table too.
"""

from __future__ import annotations

# Only for the type checker: importing typing at run time costs a CPU job's Prolog more than it runs.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

OK: Final = 0
FAILED: Final = 1

# Outcomes (strings, not an enum: importing enum costs the TaskProlog more than the table is worth).
GRANTED: Final = "granted"  # a lease recorded, or a release done
NOTHING: Final = "nothing"  # nothing to do (CPU job, no grant to release)
REFUSED: Final = "refused"  # a run-time refusal or a bad spec: the grant file carries the reason
UNLEASED: Final = "unleased"  # daemon and fallback unavailable, fail_mode open: the job runs unleased
CLOSED: Final = "closed"  # daemon and fallback unavailable, fail_mode closed: written as a refusal
DEADLINE: Final = "deadline"  # the hook's own deadline expired: handled like an outage
BAD_ENV: Final = "bad-env"  # Slurm's environment lacks what the hook needs (logged)
INTERNAL: Final = "internal"  # a bug in the hook (logged with its traceback)
NODE_FAULT: Final = "node-fault"
TASK_REFUSED: Final = "task-refused"  # the TaskProlog found a refusal: the job must fail
FOREIGN: Final = "foreign"  # the health check confirmed a foreign VRAM holder (and drained)

OUTCOMES: Final = (GRANTED, NOTHING, REFUSED, UNLEASED, CLOSED, DEADLINE, BAD_ENV, INTERNAL, NODE_FAULT,
                   TASK_REFUSED, FOREIGN)
HOOKS: Final = ("prolog", "epilog", "task_prolog", "prolog_slurmctld", "epilog_slurmctld", "health")

# (hook, outcome) → exit code. Anything not listed exits OK: the safe default for a Prolog/Epilog.
TABLE: Final[dict[tuple[str, str], int]] = {
    ("prolog", NODE_FAULT): FAILED,
    ("epilog", NODE_FAULT): FAILED,
    ("prolog_slurmctld", NODE_FAULT): FAILED,
    ("epilog_slurmctld", NODE_FAULT): FAILED,
    ("task_prolog", TASK_REFUSED): FAILED,
    ("health", FOREIGN): FAILED,
    ("health", NODE_FAULT): FAILED,
}


def exit_code(hook: str, outcome: str) -> int:
    """The exit code of ``hook`` (one of :data:`HOOKS`) for ``outcome`` (one of :data:`OUTCOMES`)."""
    if hook not in HOOKS:
        raise ValueError(f"unknown hook {hook!r}; expected one of {', '.join(HOOKS)}")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {', '.join(OUTCOMES)}")
    return TABLE.get((hook, outcome), OK)
