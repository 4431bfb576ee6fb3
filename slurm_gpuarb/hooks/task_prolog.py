"""Slurm ``TaskProlog`` (slurmstepd, as the job's user, before every task of every step).

Reads the grant file the Prolog wrote, and nothing else (never the daemon: ``srun -n64`` runs this
64 times), and speaks the TaskProlog's stdout protocol (slurm.conf(5), TaskProlog):

* ``export NAME=VALUE`` sets a variable in the task; the value is everything to the end of the line,
  so no quotes, and a value holding a newline is never printed (it could inject a second line);
* ``print TEXT`` writes TEXT to the task's standard output.

Outcomes: a grant prints its exports (``CUDA_VISIBLE_DEVICES``, ``GPUARB_VRAM_MB``,
``GPUARB_LEASE_ID``, engine knobs); a refusal prints ``print gpuarb: job refused: REASON`` and exits
1, which fails the job before its script runs while the node stays up; an ``unleased`` grant, a
missing grant (the Prolog did not run, or timed out) or an unreadable one prints a warning and lets
the job run (exit 0; an unreadable grant fails the job under ``fail_mode = "closed"``). A shard job's
``SLURM_SHARDS_ON_NODE`` (the Prolog cannot see it in Slurm 22.05) times the quantum is checked
against the grant; a mismatch prints a warning. A job with neither ``SLURM_JOB_GPUS`` nor
``SLURM_SHARDS_ON_NODE`` exits 0 at once.

The environment here is the job's, so the user controls it: that can only change what this user's
own task sees, never the grant file (root's) or another job.
"""

from __future__ import annotations

import os
import sys

from slurm_gpuarb import logsink
from slurm_gpuarb.errors import GpuArbError
from slurm_gpuarb.hooks import common, exitcodes, grants

TYPE_CHECKING = False  # only for the type checker: typing is not needed at run time
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import TextIO

HOOK = "task_prolog"


def main(env: Mapping[str, str] | None = None, out: TextIO | None = None) -> int:
    """Print the task's ``export``/``print`` lines for the job ``env`` describes; returns the exit code."""
    environ = os.environ if env is None else env
    lines: list[str] = []
    try:
        code = _run(environ, lines)
    except Exception as e:  # a bug here must not fail every job: warn, and let the task run unleased
        lines = [f"print gpuarb: warning: the TaskProlog failed ({type(e).__name__}); running without a lease"]
        code = exitcodes.exit_code(HOOK, exitcodes.INTERNAL)
    if lines:
        stream = sys.stdout if out is None else out
        stream.write("".join(line + "\n" for line in lines))
        stream.flush()
    return code


def _run(env: Mapping[str, str], lines: list[str]) -> int:
    shards = env.get("SLURM_SHARDS_ON_NODE", "").strip()
    if not env.get("SLURM_JOB_GPUS", "").strip() and not shards:
        return exitcodes.exit_code(HOOK, exitcodes.NOTHING)
    settings = common.read_settings(env)
    try:
        job_id = common.check_job_id(env.get("SLURM_JOB_ID"))
        node = common.check_node(env.get("SLURMD_NODENAME"))
        grant = grants.read_grant(settings.state_dir, node, job_id)
    except GpuArbError as e:
        if settings.fail_mode == "closed":
            return _refuse(lines, f"no usable grant ({e}) and fail_mode is closed", settings, env)
        _print(lines, f"gpuarb: warning: no usable grant ({e}); running without a lease")
        return exitcodes.exit_code(HOOK, exitcodes.UNLEASED)
    if grant is None:
        _print(lines, f"gpuarb: warning: no grant for job {job_id} on {node} (did the Prolog run?); "
                      "running without a lease")
        return exitcodes.exit_code(HOOK, exitcodes.UNLEASED)
    restart = env.get("SLURM_RESTART_COUNT", "").strip()
    if restart and restart != str(grant.restart_count):
        _print(lines, f"gpuarb: warning: the grant is for run {grant.restart_count} of job {job_id}, this is run "
                      f"{restart[:12]}; running without a lease")
        return exitcodes.exit_code(HOOK, exitcodes.UNLEASED)
    if grant.status == grants.REFUSED:
        return _refuse(lines, grant.reason or "no reason recorded", settings, env)
    if grant.status == grants.UNLEASED:
        _print(lines, f"gpuarb: warning: {grant.reason or 'unleased'}")
    for name, value in grant.exports.items():
        if grants.is_env_name(name) and grants.is_line_safe(value):
            lines.append(f"export {name}={value}")
        else:
            _print(lines, f"gpuarb: warning: not exporting {name[:40]}: its value spans lines")
    if shards:
        _check_shards(lines, shards, grant)
    return exitcodes.exit_code(HOOK, exitcodes.GRANTED if grant.status == grants.GRANTED else exitcodes.UNLEASED)


def _check_shards(lines: list[str], shards: str, grant: grants.Grant) -> None:
    if grant.vram_mib is None or grant.quantum_mib is None:
        return
    try:
        count = int(shards)
    except ValueError:
        _print(lines, f"gpuarb: warning: SLURM_SHARDS_ON_NODE={shards[:20]} is not a number")
        return
    if count * grant.quantum_mib != grant.vram_mib:
        _print(lines, f"gpuarb: warning: Slurm gave this job {count} shards ({count * grant.quantum_mib}MiB at "
                      f"{grant.quantum_mib}MiB each) but its lease {grant.lease_id or '-'} holds {grant.vram_mib}MiB")


def _refuse(lines: list[str], reason: str, settings: common.Settings, env: Mapping[str, str]) -> int:
    _print(lines, f"gpuarb: job refused: {reason}")
    # Only here does the TaskProlog log (syslog; the root-owned file is usually not writable by the user).
    logsink.configure(log_file=settings.log_file)
    logsink.log_at("notice", HOOK, "job refused", job=env.get("SLURM_JOB_ID"), node=env.get("SLURMD_NODENAME"),
                reason=reason)
    return exitcodes.exit_code(HOOK, exitcodes.TASK_REFUSED)


def _print(lines: list[str], text: str) -> None:
    lines.append("print " + " ".join(text.split()))  # one line, whatever the reason held


if __name__ == "__main__":
    sys.exit(main())
