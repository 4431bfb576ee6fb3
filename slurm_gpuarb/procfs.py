"""Who a process is, from ``/proc``: shared by the telemetry backends and the capacity model.

A process may exit between NVML listing it and us reading it, and a PID from another PID
namespace (a container) is not in this ``/proc`` at all: every reader answers ``None`` for what
it cannot read, never an exception.
"""

from __future__ import annotations

import os
import pwd
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=256)
def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def identity(pid: int, proc_root: str | os.PathLike[str] = "/proc") -> tuple[str | None, int | None, str | None]:
    """``(comm, uid, user)`` of a live process. ``comm`` is the kernel's process name (at most 15
    characters: what a reservation's ``process=`` matcher compares against); ``uid`` is the *real*
    uid from ``status`` (who started it, not a setuid identity)."""
    base = Path(proc_root) / str(pid)
    try:
        comm: str | None = (base / "comm").read_text(encoding="utf-8", errors="replace").rstrip("\n")
    except OSError:
        comm = None
    uid: int | None = None
    try:
        for line in (base / "status").read_text(errors="replace").splitlines():
            if line.startswith("Uid:"):
                fields = line.split()
                if len(fields) > 1 and fields[1].isdigit():
                    uid = int(fields[1])
                break
    except OSError:
        pass
    return comm, uid, (user_name(uid) if uid is not None else None)


def cgroup(pid: int, proc_root: str | os.PathLike[str] = "/proc") -> str | None:
    """The text of ``/proc/PID/cgroup``, or None."""
    try:
        return (Path(proc_root) / str(pid) / "cgroup").read_text(errors="replace")
    except OSError:
        return None
