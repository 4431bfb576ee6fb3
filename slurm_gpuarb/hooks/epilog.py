"""Slurm ``Epilog`` (slurmd, root, once per job and node): release this run's lease, idempotently.

Sends ``job_end`` keyed by (job id, restart count, node) to gpuarbd (the in-process Handlers when it
is down or hung), so a late Epilog of a requeued job's first run releases nothing of the second run,
and an Epilog that runs twice releases once. Then removes the grant file, but only when it belongs
to this run (its restart count): the next run's Prolog may already have written its own.

Exit codes (:mod:`.exitcodes`): a non-zero Epilog drains the node, so only a node fault exits
non-zero. A daemon/ledger outage, or this hook's own deadline, logs and exits 0: the daemon's
reconcile expires leases of jobs that no longer run. A CPU job (no ``SLURM_JOB_GPUS``) exits 0 at once.
"""

from __future__ import annotations

import os
import sys

from slurm_gpuarb import logsink
from slurm_gpuarb.errors import GpuArbError, NodeFault
from slurm_gpuarb.hooks import common, exitcodes, grants

# Only for the type checker (typing costs a CPU job's hook more than the hook runs).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

HOOK = "epilog"


def main(env: Mapping[str, str] | None = None) -> int:
    """Run the Epilog for the job ``env`` describes (default ``os.environ``); returns the exit code."""
    environ = os.environ if env is None else env
    if not environ.get("SLURM_JOB_GPUS", "").strip():
        return exitcodes.exit_code(HOOK, exitcodes.NOTHING)
    settings = common.read_settings(environ)
    logsink.configure(log_file=settings.log_file)
    if settings.error:
        logsink.error(HOOK, "config unreadable; using defaults", error=settings.error)
    try:
        job = common.job_from_env(environ)
    except common.SlurmEnvError as e:
        logsink.error(HOOK, "cannot identify the job", error=str(e))
        return exitcodes.exit_code(HOOK, exitcodes.BAD_ENV)
    deadline = common.Deadline(settings.deadline_s).arm()
    try:
        outcome = _release(job, settings, deadline, environ)
    except common.DeadlineExceeded:  # fired in the instant between a failure and its disarm
        outcome = exitcodes.DEADLINE
    finally:
        deadline.disarm()
    try:
        removed = grants.remove_grant(settings.state_dir, job.node, job.job_id, job.restart_count)
    except (OSError, GpuArbError) as e:
        logsink.warning(HOOK, "could not remove the grant file", job=job.job_id, error=str(e))
    else:
        if removed:
            logsink.log_at("debug", HOOK, "grant file removed", job=job.job_id, restart=job.restart_count)
    if os.path.isdir(f"{settings.state_dir}/mps"):  # a share=mps job ran here: only then import mps
        from slurm_gpuarb import mps

        for gpu in mps.release(settings.state_dir, job.job_id):
            logsink.log(HOOK, "MPS server stopped: its last job ended", job=job.job_id, gpu=gpu)
    return exitcodes.exit_code(HOOK, outcome)


def _release(job: common.Job, settings: common.Settings, deadline: common.Deadline, env: Mapping[str, str]) -> str:
    fields: dict[str, object] = {"job": job.job_id, "node": job.node, "restart": job.restart_count}
    try:
        answer = common.ask(settings, job_end_message(job), deadline, env, hook=HOOK, **fields,
                            on_expire=lambda: exitcodes.exit_code(HOOK, exitcodes.DEADLINE))
    except (Exception, common.DeadlineExceeded) as e:
        deadline.disarm()  # logging the failure must not be cut short
        if isinstance(e, NodeFault):
            logsink.error(HOOK, "node fault; failing so that Slurm drains this node", **fields, error=str(e))
            return exitcodes.NODE_FAULT
        if isinstance(e, GpuArbError | common.DeadlineExceeded):
            logsink.warning(HOOK, "release not recorded; the reconcile will expire the lease", **fields,
                            error=str(e))
            return exitcodes.DEADLINE if isinstance(e, common.DeadlineExceeded) else exitcodes.UNLEASED
        import traceback  # a bug here must not drain the node

        logsink.error(HOOK, "internal error", **fields, trace="".join(traceback.format_exception(e)))
        return exitcodes.INTERNAL
    deadline.disarm()
    released = answer.get("released")
    ids = [r for r in released if isinstance(r, str)] if isinstance(released, list) else []
    logsink.log(HOOK, "released" if ids else "nothing to release", **fields, leases=",".join(ids) or None,
                exit_code=job.exit_code)
    return exitcodes.GRANTED if ids else exitcodes.NOTHING


def job_end_message(job: common.Job) -> dict[str, Any]:
    """The ``job_end`` request for ``job`` (protocol contract 2)."""
    msg: dict[str, Any] = {"v": 1, "op": "job_end", "job_id": job.job_id, "restart_count": job.restart_count,
                           "node": job.node}
    if job.exit_code is not None:
        msg["exit_code"] = job.exit_code
    return msg


if __name__ == "__main__":
    sys.exit(main())
