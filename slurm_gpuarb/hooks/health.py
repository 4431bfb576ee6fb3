"""Slurm ``HealthCheckProgram`` (slurmd, root, every ``HealthCheckInterval``), and ``gpuarb node resume``.

A process that holds VRAM outside every lease and standing reservation (a *foreign* tenant) takes
memory the ledger thinks is free: jobs granted on that GPU may OOM. One sighting can be a process on
its way out, so the check counts consecutive sightings of the same foreign process (PID, GPU and
name) per node in ``<state_dir>/health/<node>.json``; after :data:`CONFIRM_SIGHTINGS` in a row it
drains the node through the Slurm adapter with a reason naming the PID and MiB::

    gpuarb: foreign pid 4242 holds 10800 MiB on gpu0

and writes a decision row. A process that is gone resets its count. The node is drained once per
episode: :func:`resume_node` (``gpuarb node resume NODE``) resumes it and clears the counts, so a
foreign process that is still there drains it again after as many sightings.

Environment: only ``SLURMD_NODENAME``, no ``PATH`` (the adapter runs Slurm's commands by absolute
path). The foreign processes come from the daemon's ``health`` op (in-process Handlers when the
daemon is down or hung). Exit codes (:mod:`.exitcodes`): a non-zero exit only makes slurmd log
"health_check failed": 1 while a foreign process is confirmed (or on a node fault), else 0; an
outage logs and exits 0, since it cannot judge the node.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Final

from slurm_gpuarb import logsink
from slurm_gpuarb.errors import LedgerError, NodeFault
from slurm_gpuarb.hooks import common, exitcodes

if TYPE_CHECKING:
    from collections.abc import Mapping

    from slurm_gpuarb.slurm import SlurmAdapter

HOOK: Final = "health"
CONFIRM_SIGHTINGS: Final = 3
STATE_VERSION: Final = 1


class Sighting:
    """One foreign process on one GPU, as the daemon's ``health`` answer lists it."""

    __slots__ = ("gpu", "mib", "name", "pid")

    def __init__(self, pid: int, gpu: int, mib: int, name: str = "") -> None:
        self.pid, self.gpu, self.mib, self.name = pid, gpu, mib, name

    @property
    def key(self) -> str:
        return f"{self.pid}@{self.gpu}"

    def reason(self) -> str:
        return f"gpuarb: foreign pid {self.pid} holds {self.mib} MiB on gpu{self.gpu}"


def sightings_from_answer(answer: Mapping[str, Any]) -> list[Sighting]:
    """The ``foreign`` list of a ``health`` answer; malformed entries are skipped."""
    out: list[Sighting] = []
    raw = answer.get("foreign")
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        pid, gpu, mib, name = item.get("pid"), item.get("gpu"), item.get("mib"), item.get("name")
        if type(pid) is int and type(gpu) is int and type(mib) is int:
            out.append(Sighting(pid, gpu, mib, name if isinstance(name, str) else ""))
    return out


# --------------------------------------------------------------------------- the counts


def state_path(state_dir: str, node: str) -> str:
    return f"{state_dir}/health/{common.check_node(node, 'node')}.json"


def load_state(state_dir: str, node: str) -> dict[str, Any]:
    """The node's counts: ``{"version", "seen": {KEY: {pid, gpu, mib, name, count}}, "drained": [KEY…]}``.
    A missing or unreadable file is a fresh start."""
    try:
        with open(state_path(state_dir, node), encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        state = None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or \
            not isinstance(state.get("seen"), dict) or not isinstance(state.get("drained"), list):
        return {"version": STATE_VERSION, "seen": {}, "drained": []}
    return state


def save_state(state_dir: str, node: str, state: Mapping[str, Any]) -> None:
    """Replace the node's counts atomically."""
    path = state_path(state_dir, node)
    folder = path.rpartition("/")[0]
    os.makedirs(folder, mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, sort_keys=True)
    os.replace(tmp, path)


def update(state: Mapping[str, Any], sightings: list[Sighting]) -> dict[str, Any]:
    """The counts after one check: a process seen again counts one more, a new one starts at 1, a
    process not seen now is forgotten (so are its drain marks). Pure."""
    old = state.get("seen", {})
    seen: dict[str, dict[str, Any]] = {}
    for s in sightings:
        prev = old.get(s.key)
        same = isinstance(prev, dict) and prev.get("name") == s.name and type(prev.get("count")) is int
        count = prev["count"] + 1 if same and prev is not None else 1
        seen[s.key] = {"pid": s.pid, "gpu": s.gpu, "mib": s.mib, "name": s.name, "count": count}
    drained = [k for k in state.get("drained", []) if isinstance(k, str) and k in seen]
    return {"version": STATE_VERSION, "seen": seen, "drained": drained}


def confirmed(state: Mapping[str, Any]) -> list[Sighting]:
    """The processes seen at least :data:`CONFIRM_SIGHTINGS` times in a row, largest first."""
    out = [Sighting(v["pid"], v["gpu"], v["mib"], v["name"]) for v in state["seen"].values()
           if v["count"] >= CONFIRM_SIGHTINGS]
    return sorted(out, key=lambda s: (-s.mib, s.pid))


# --------------------------------------------------------------------------- the hook


def main(env: Mapping[str, str] | None = None, *, adapter: SlurmAdapter | None = None) -> int:
    """Run one health check of ``SLURMD_NODENAME``; returns the exit code. ``adapter`` drains (default:
    :func:`slurm_gpuarb.slurm.select_adapter`, made only when a drain is due)."""
    environ = os.environ if env is None else env
    settings = common.read_settings(environ)
    logsink.configure(log_file=settings.log_file)
    if settings.error:
        logsink.error(HOOK, "config unreadable; using defaults", error=settings.error)
    try:
        node = common.check_node(environ.get("SLURMD_NODENAME"))
    except common.SlurmEnvError as e:
        logsink.error(HOOK, "cannot identify the node", error=str(e))
        return exitcodes.exit_code(HOOK, exitcodes.BAD_ENV)
    deadline = common.Deadline(settings.deadline_s).arm()
    try:
        answer = common.ask(settings, {"v": 1, "op": "health", "node": node}, deadline, environ, hook=HOOK,
                            on_expire=lambda: exitcodes.exit_code(HOOK, exitcodes.DEADLINE), node=node)
    except (Exception, common.DeadlineExceeded) as e:
        deadline.disarm()
        if isinstance(e, NodeFault):
            logsink.error(HOOK, "node fault", node=node, error=str(e))
            return exitcodes.exit_code(HOOK, exitcodes.NODE_FAULT)
        logsink.warning(HOOK, "no answer; cannot judge the node", node=node, error=str(e) or type(e).__name__)
        return exitcodes.exit_code(HOOK, exitcodes.UNLEASED)
    finally:
        deadline.disarm()  # a drain below runs under the adapter's own timeout
    try:
        return check(node, sightings_from_answer(answer), settings.state_dir, environ, adapter=adapter)
    except Exception as e:  # a bug must not stop the next check from running
        import traceback

        logsink.error(HOOK, "internal error", node=node, trace="".join(traceback.format_exception(e)))
        return exitcodes.exit_code(HOOK, exitcodes.INTERNAL)


def check(node: str, sightings: list[Sighting], state_dir: str, env: Mapping[str, str], *,
          adapter: SlurmAdapter | None = None) -> int:
    """Count ``sightings``, drain ``node`` for each newly confirmed one; returns the exit code."""
    state = update(load_state(state_dir, node), sightings)
    for s in sightings:
        logsink.warning(HOOK, "foreign process", node=node, pid=s.pid, gpu=s.gpu, mib=s.mib,
                    name=s.name or None, seen=state["seen"][s.key]["count"])
    found = confirmed(state)
    for s in found:
        if s.key in state["drained"]:
            continue
        try:
            if adapter is None:
                from slurm_gpuarb.slurm import select_adapter

                adapter = select_adapter()
            adapter.drain(node, s.reason())
        except Exception as e:  # SlurmError, or a broken adapter: either way, try again next check
            logsink.error(HOOK, "could not drain the node; will retry", node=node, error=str(e) or type(e).__name__)
            continue
        state["drained"].append(s.key)
        logsink.warning(HOOK, "node drained", node=node, pid=s.pid, gpu=s.gpu, mib=s.mib,
                    reason=s.reason())
        _record(env, action="drain", outcome="drained", node=node, reason=s.reason(),
                inputs={"pid": s.pid, "gpu": s.gpu, "mib": s.mib, "name": s.name, "sightings": CONFIRM_SIGHTINGS})
    try:
        save_state(state_dir, node, state)
    except OSError as e:
        logsink.error(HOOK, "could not save the sighting counts", node=node, error=str(e))
    return exitcodes.exit_code(HOOK, exitcodes.FOREIGN if found else exitcodes.GRANTED)


def resume_node(node: str, *, adapter: SlurmAdapter, env: Mapping[str, str] | None = None) -> None:
    """``gpuarb node resume NODE``: resume a node the health check drained, clear its counts, and write a
    decision row. Raises :class:`~slurm_gpuarb.slurm.SlurmError` when Slurm refuses, and
    :class:`~slurm_gpuarb.errors.LedgerError` when the node was resumed but the row could not be written."""
    environ = os.environ if env is None else env
    common.check_node(node, "node")
    settings = common.read_settings(environ)
    adapter.resume(node)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(state_path(settings.state_dir, node))
    logsink.log(HOOK, "node resumed", node=node, uid=os.getuid())
    if not _record(environ, action="resume", outcome="resumed", node=node,
                   reason="resumed by gpuarb node resume; foreign-process counts cleared", inputs={"uid": os.getuid()},
                   plane="cli"):
        raise LedgerError(f"node {node} was resumed, but its decision row could not be written; check that "
                          "[ledger] url in gpuarb.toml is reachable (the log has the error)")


def _record(env: Mapping[str, str], *, action: str, outcome: str, node: str, reason: str,
            inputs: dict[str, Any], plane: str = HOOK) -> bool:
    """A decision row, best effort (the ledger is only opened on this rare path)."""
    try:
        from slurm_gpuarb.config import load
        from slurm_gpuarb.ledger import Ledger

        cfg = load(env=env)
        password = None if cfg.pg_password_file is None else str(cfg.pg_password_file)
        with Ledger.open(cfg.ledger_url, password_file=password) as ledger:
            ledger.record(plane=plane, action=action, outcome=outcome, node=node, reason=reason, inputs=inputs,
                          now=time.time())
    except Exception as e:
        logsink.error(HOOK, "could not write the decision row", node=node, action=action,
                    error=str(e) or type(e).__name__)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
