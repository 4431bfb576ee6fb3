"""Slurm ``PrologSlurmctld`` and ``EpilogSlurmctld`` (slurmctld, root, on the controller, once per job).

The controller-side record of a job's start and end: one ``key=value`` log line with the job id,
run, nodes, partition, user and the comment (escaped: it is the user's text). The environment here
has no GPU variables (SLURM-LAB.md), so nothing is decided.

Why a log line and not a ledger decision row: the lease protocol has no op that only records (the
node's Prolog writes the job's decision rows through ``job_start``), adding one is out of this hook's
remit, and a PrologSlurmctld runs inside slurmctld's job launch path, where importing the ledger
(SQLAlchemy, ~0.5 s per job) would cost every job. ``gpuarb explain`` reads the node-side rows; this
line ties them to the controller's view (``grep 'job=12 ' gpuarb.log``).

Run as ``python -I -m slurm_gpuarb.hooks.prolog_slurmctld`` for the Prolog and with the argument
``epilog`` for the Epilog. Exit code (:mod:`.exitcodes`): always 0, since a non-zero PrologSlurmctld
requeues (or cancels) the job and nothing here is a node fault.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from slurm_gpuarb import logsink
from slurm_gpuarb.hooks import common, exitcodes

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

MAX_LOGGED_COMMENT = 256


def main(env: Mapping[str, str] | None = None, argv: Sequence[str] | None = None) -> int:
    """Log the controller-side record of a job's start (``argv`` empty) or end (``argv == ["epilog"]``)."""
    environ = os.environ if env is None else env
    args = sys.argv[1:] if argv is None else list(argv)
    ending = bool(args) and args[0] == "epilog"
    hook = "epilog_slurmctld" if ending else "prolog_slurmctld"
    try:
        settings = common.read_settings(environ)
        logsink.configure(log_file=settings.log_file)
        if settings.error:
            logsink.error(hook, "config unreadable; using defaults", error=settings.error)
        comment = common.clean_comment(environ.get("SLURM_JOB_COMMENT"))
        fields: dict[str, object] = {
            "job": environ.get("SLURM_JOB_ID") or "?",
            "restart": environ.get("SLURM_JOB_RESTART_COUNT") or "0",
            "nodes": environ.get("SLURM_JOB_NODELIST") or None,
            "partition": environ.get("SLURM_JOB_PARTITION") or None,
            "user": environ.get("SLURM_JOB_USER") or None,
            "uid": environ.get("SLURM_JOB_UID") or None,
            "account": environ.get("SLURM_JOB_ACCOUNT") or None,
            "comment": None if comment is None else comment[:MAX_LOGGED_COMMENT],
        }
        if ending:
            fields["exit_code"] = environ.get("SLURM_JOB_EXIT_CODE") or None
            fields["derived_ec"] = environ.get("SLURM_JOB_DERIVED_EC") or None
        logsink.log(hook, "job ended" if ending else "job starting", **fields)
    except Exception:  # a record is not worth a requeue
        return exitcodes.exit_code(hook, exitcodes.INTERNAL)
    return exitcodes.exit_code(hook, exitcodes.GRANTED)


if __name__ == "__main__":
    sys.exit(main())
