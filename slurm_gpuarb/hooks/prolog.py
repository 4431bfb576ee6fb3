"""Slurm ``Prolog`` (slurmd, root, once per job and node): verify and record the job's lease.

Sends ``job_start`` to gpuarbd (the in-process Handlers when it is down or hung) and writes the
answer to the grant file the TaskProlog reads: the exports of a grant, or the reason of a refusal.
Environment (SLURM-LAB.md): ``SLURM_JOB_ID``, ``SLURMD_NODENAME``, ``SLURM_JOB_GPUS``,
``SLURM_JOB_COMMENT``, ``SLURM_JOB_UID``, ``SLURM_JOB_USER``, ``SLURM_JOB_PARTITION``,
``SLURM_JOB_RESTART_COUNT`` (absent means 0); no ``PATH`` and no ``SLURM_SHARDS_ON_NODE``.

Exit codes (:mod:`.exitcodes`): 0, except on a node fault (which drains the node, on purpose). A
refusal, a bad spec, a daemon/ledger outage or this hook's own deadline never drain: the grant file
says ``refused`` (the TaskProlog fails the job with the reason) or ``unleased`` (the job runs; with
``fail_mode = "closed"`` an outage is written as a refusal instead). A CPU job (no
``SLURM_JOB_GPUS``) exits 0 at once without reading anything.

The comment is user-controlled: it is sent to the daemon as a JSON string (cut to
:data:`~.common.MAX_COMMENT_CHARS`), never to a shell, and logged only as an escaped field.

**share=mps.** A grant marked ``GPUARB_SHARE=mps`` on one GPU (``GPUARB_MPS_DEVICE``: its UUID) gets
an MPS control daemon for that GPU, started as the job's user when none runs
(:func:`slurm_gpuarb.mps.ensure`); the job then also gets ``CUDA_MPS_PIPE_DIRECTORY`` and the GPU's
UUID as ``CUDA_VISIBLE_DEVICES``. Without the binary (a machine without the NVIDIA driver, fake GPUs)
the Prolog logs "no MPS control binary; share=mps runs time-sliced", drops
``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (nothing would enforce it) and keeps the thread cap. Another
user's daemon serving running jobs on that GPU turns the grant into a refusal with the reason
(one user's MPS server per GPU); anything else that goes wrong there is logged and the job runs
time-sliced. None of this ever makes the Prolog exit non-zero.
"""

from __future__ import annotations

import os
import sys

from slurm_gpuarb import logsink
from slurm_gpuarb.errors import CapacityError, GpuArbError, LeaseSpecError, NodeFault, NotFoundError
from slurm_gpuarb.hooks import common, exitcodes, grants

# Only for the type checker (typing costs a CPU job's hook more than the hook runs).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

HOOK = "prolog"


def main(env: Mapping[str, str] | None = None) -> int:
    """Run the Prolog for the job ``env`` describes (default ``os.environ``); returns the exit code."""
    environ = os.environ if env is None else env
    if not environ.get("SLURM_JOB_GPUS", "").strip():
        return exitcodes.exit_code(HOOK, exitcodes.NOTHING)  # a CPU job: no lease, nothing to record
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
        return _run(job, settings, deadline, environ)
    except common.DeadlineExceeded:  # fired in the instant between a failure and its disarm: still no drain
        return exitcodes.exit_code(HOOK, exitcodes.DEADLINE)
    finally:
        deadline.disarm()


def _run(job: common.Job, settings: common.Settings, deadline: common.Deadline, env: Mapping[str, str]) -> int:
    fields: dict[str, object] = {"job": job.job_id, "node": job.node, "restart": job.restart_count}
    try:
        answer = common.ask(settings, job_start_message(job), deadline, env, hook=HOOK, **fields,
                            on_expire=lambda: _outage(settings, job, fields, exitcodes.DEADLINE,
                                                      "the hook's deadline expired"))
        grant = grant_from_answer(answer, job, settings.quantum_mib)
    except (Exception, common.DeadlineExceeded) as e:
        deadline.disarm()  # what follows (a grant file, a log line) must not be cut short
        return _failed(e, job, settings, fields)
    deadline.disarm()
    if grant.status == grants.GRANTED and grant.exports.get("GPUARB_SHARE") == "mps":
        grant = _mps(grant, answer, job, settings, deadline, fields)
    if not _write(settings, grant, job, fields):
        return exitcodes.exit_code(HOOK, exitcodes.NODE_FAULT)
    if grant.status == grants.REFUSED:
        logsink.log_at("notice", HOOK, "job refused", **fields, reason=grant.reason)
        return exitcodes.exit_code(HOOK, exitcodes.REFUSED)
    if grant.status == grants.UNLEASED:
        logsink.log(HOOK, "job runs unleased", **fields, reason=grant.reason)
        return exitcodes.exit_code(HOOK, exitcodes.UNLEASED)
    logsink.log(HOOK, f"granted {grant.vram_mib}MiB", **fields, lease=grant.lease_id, gpus=job.gres)
    return exitcodes.exit_code(HOOK, exitcodes.GRANTED)


def _failed(e: BaseException, job: common.Job, settings: common.Settings, fields: dict[str, object]) -> int:
    """What a failed ``job_start`` becomes: a node fault, a refusal, or an outage (by ``fail_mode``)."""
    if isinstance(e, common.DeadlineExceeded):
        return _outage(settings, job, fields, exitcodes.DEADLINE, str(e))
    if isinstance(e, NodeFault):
        logsink.error(HOOK, "node fault; failing so that Slurm drains this node", **fields, error=str(e))
        _write(settings, grants.Grant(grants.REFUSED, job.job_id, job.node, job.restart_count,
                                      reason=f"node fault: {e}"), job, fields)
        return exitcodes.exit_code(HOOK, exitcodes.NODE_FAULT)
    if isinstance(e, LeaseSpecError | CapacityError | NotFoundError):  # the user's spec, not the node
        logsink.log_at("notice", HOOK, "job refused", **fields, reason=str(e))
        grant = grants.Grant(grants.REFUSED, job.job_id, job.node, job.restart_count, reason=str(e))
        ok = _write(settings, grant, job, fields)
        return exitcodes.exit_code(HOOK, exitcodes.REFUSED if ok else exitcodes.NODE_FAULT)
    if isinstance(e, GpuArbError):
        return _outage(settings, job, fields, exitcodes.UNLEASED, str(e))
    # A bug here must not drain the node: log it whole, then treat it as an outage.
    import traceback

    logsink.error(HOOK, "internal error", **fields, trace="".join(traceback.format_exception(e)))
    return _outage(settings, job, fields, exitcodes.INTERNAL, f"internal error: {type(e).__name__}")


def _outage(settings: common.Settings, job: common.Job, fields: dict[str, object], outcome: str, error: str) -> int:
    """The daemon and the fallback gave no answer: the job runs unleased, or (fail_mode closed) is refused."""
    closed = settings.fail_mode == "closed"
    reason = f"ledger unavailable ({error})"
    grant = grants.Grant(grants.REFUSED if closed else grants.UNLEASED, job.job_id, job.node, job.restart_count,
                         reason=(f"gpuarb could not record a lease and fail_mode is closed: {reason}" if closed
                                 else f"unleased: {reason}"))
    logsink.warning(HOOK, "job refused (fail_mode closed)" if closed else "job runs unleased", **fields,
                    outcome=outcome, error=error)
    if not _write(settings, grant, job, fields):
        return exitcodes.exit_code(HOOK, exitcodes.NODE_FAULT)
    return exitcodes.exit_code(HOOK, exitcodes.CLOSED if closed else exitcodes.UNLEASED)


PINNED_LIMIT = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"


def _mps(grant: grants.Grant, answer: Mapping[str, Any], job: common.Job, settings: common.Settings,
         deadline: common.Deadline, fields: dict[str, object]) -> grants.Grant:
    """A ``share=mps`` grant with its MPS daemon started (or why not); a refusal when another user's
    daemon serves the GPU. Never raises (see the module docstring)."""
    exports = grant.exports
    device = exports.pop("GPUARB_MPS_DEVICE", None)
    try:
        gpus = answer["grant"].get("gpus") or []
        if device is None or len(gpus) != 1 or type(gpus[0]) is not int:
            exports.pop(PINNED_LIMIT, None)
            logsink.log(HOOK, f"share=mps on {len(gpus)} GPU(s) without one GPU's UUID runs time-sliced: one MPS "
                        "server serves one GPU here", **fields)
            return grant
        from slurm_gpuarb import mps

        binary = mps.find_control()
        if binary is None:
            exports.pop(PINNED_LIMIT, None)
            logsink.log(HOOK, "no MPS control binary; share=mps runs time-sliced", **fields, gpu=gpus[0])
            return grant
        if job.uid is None:
            exports.pop(PINNED_LIMIT, None)
            logsink.warning(HOOK, "no SLURM_JOB_UID to run an MPS server as; share=mps runs time-sliced", **fields)
            return grant
        state_dir = settings.state_dir

        def is_live(job_id: str) -> bool:
            return os.path.exists(grants.grant_path(state_dir, job.node, job_id))

        timeout = min(mps.START_TIMEOUT_S, max(deadline.remaining(), 1.0))
        outcome = mps.ensure(state_dir, gpus[0], device, uid=job.uid, gid=_job_gid(job), job_id=job.job_id,
                             node=job.node, binary=binary, is_live=is_live, timeout=timeout)
    except Exception as e:  # a bug here must not fail the job or drain the node: run time-sliced
        import traceback

        exports.pop(PINNED_LIMIT, None)
        logsink.error(HOOK, "MPS start failed; share=mps runs time-sliced", **fields,
                      trace="".join(traceback.format_exception(e)))
        return grant
    if outcome.serving:
        assert outcome.pipe_dir is not None
        exports["CUDA_MPS_PIPE_DIRECTORY"] = outcome.pipe_dir
        exports["CUDA_VISIBLE_DEVICES"] = device  # the server was started on the UUID: the client must match
        logsink.log(HOOK, f"MPS server {outcome.state}", **fields, gpu=gpus[0], pid=outcome.pid)
        return grant
    if outcome.state == mps.BUSY:  # _run logs the refusal
        return grants.Grant(grants.REFUSED, job.job_id, job.node, job.restart_count,
                            reason=f"gpuarb: share=mps: {outcome.reason}")
    exports.pop(PINNED_LIMIT, None)
    logsink.warning(HOOK, "no MPS server; share=mps runs time-sliced", **fields, gpu=gpus[0], reason=outcome.reason)
    return grant


def job_start_message(job: common.Job) -> dict[str, Any]:
    """The ``job_start`` request for ``job`` (protocol contract 2). Absent values are left out, and so
    are a user or partition name the protocol would refuse (they only label the lease)."""
    msg: dict[str, Any] = {"v": 1, "op": "job_start", "job_id": job.job_id, "restart_count": job.restart_count,
                           "node": job.node, "comment": job.comment or None, "gres": job.gres, "uid": job.uid,
                           "user": job.user, "partition": job.partition}
    for label in ("user", "partition"):
        if msg[label] is not None and not common.is_token(msg[label]):
            msg[label] = None
    return {k: v for k, v in msg.items() if v is not None}


def grant_from_answer(answer: Mapping[str, Any], job: common.Job, quantum_mib: int) -> grants.Grant:
    """The grant file's content from a ``job_start`` answer. Exports whose name or value could break
    the TaskProlog's ``export K=V`` lines are dropped (and logged); a malformed answer is a
    :class:`~slurm_gpuarb.errors.ProtocolError`."""
    from slurm_gpuarb.errors import ProtocolError

    raw = answer.get("grant")
    if not isinstance(raw, dict):
        raise ProtocolError("a job_start answer needs a 'grant' object")
    refused = raw.get("refused")
    if refused is not None:
        if not isinstance(refused, str):
            raise ProtocolError("grant.refused must be a string or null")
        return grants.Grant(grants.REFUSED, job.job_id, job.node, job.restart_count, reason=refused)
    exports: dict[str, str] = {}
    raw_exports = raw.get("exports") or {}
    if not isinstance(raw_exports, dict):
        raise ProtocolError("grant.exports must be an object")
    for name, value in raw_exports.items():
        text = value if isinstance(value, str) else str(value) if type(value) is int else None
        if text is None or not grants.is_env_name(name) or not grants.is_line_safe(text):
            logsink.warning(HOOK, "dropped an export that cannot be a K=V line", job=job.job_id, name=name)
            continue
        exports[name] = text
    lease_id, vram, quantum = raw.get("lease_id"), raw.get("vram_mib"), raw.get("quantum_mib", quantum_mib)
    if lease_id is not None and (not isinstance(lease_id, str) or not grants.is_line_safe(lease_id)):
        raise ProtocolError("grant.lease_id must be a one-line string or null")
    for name, number in (("vram_mib", vram), ("quantum_mib", quantum)):
        if number is not None and (not isinstance(number, int) or isinstance(number, bool)):
            raise ProtocolError(f"grant.{name} must be an integer or null")
    status = grants.GRANTED if lease_id else grants.UNLEASED
    reason = next((r for r in (raw.get("reason"), answer.get("reason")) if isinstance(r, str) and r), None)
    return grants.Grant(status, job.job_id, job.node, job.restart_count, lease_id=lease_id, vram_mib=vram,
                        quantum_mib=quantum, reason=reason, exports=exports)


def _write(settings: common.Settings, grant: grants.Grant, job: common.Job, fields: dict[str, object]) -> bool:
    try:
        grants.write_grant(settings.state_dir, grant, gid=_job_gid(job))
    except grants.GrantError as e:
        # No grant file, no job on this node gets its grant: the node's state dir is broken.
        logsink.error(HOOK, "node fault: cannot write the grant file", **fields, error=str(e))
        return False
    return True


def _job_gid(job: common.Job) -> int | None:
    if job.gid is not None:
        return job.gid
    if job.uid is None:
        return None
    import pwd

    try:
        return pwd.getpwuid(job.uid).pw_gid
    except KeyError:
        return None


if __name__ == "__main__":
    sys.exit(main())
