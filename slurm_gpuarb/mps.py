"""MPS control daemons for ``share=mps`` leases: one per GPU, run as the job's user, started by the Prolog.

Slurm's ``gres/mps`` counts MPS shares but does not start the MPS control daemon; without one a
``share=mps`` job runs time-sliced. So the Prolog (root) starts ``nvidia-cuda-mps-control -d``
for a ``share=mps`` lease on one GPU when none runs for that GPU, *as the job's user*, with::

    CUDA_MPS_PIPE_DIRECTORY = <state_dir>/mps/gpu<N>/pipe   (the user's, 0700)
    CUDA_MPS_LOG_DIRECTORY  = <state_dir>/mps/gpu<N>/log    (the user's, 0700)
    CUDA_VISIBLE_DEVICES    = <the GPU's UUID>

and exports ``CUDA_MPS_PIPE_DIRECTORY`` and that ``CUDA_VISIBLE_DEVICES`` to the job: an MPS
server remaps the device indices it was started with, and NVIDIA recommends UUIDs on both sides
(MPS docs, "Appendix: Environment Variables", CUDA_VISIBLE_DEVICES).

**One user's MPS server per GPU at a time.** A control daemon started by a user can only spawn
servers for that user, and MPS serves one user's clients at a time (nvidia-cuda-mps-control(1)).
When another user's daemon runs on the GPU for jobs that still run, the new job's lease is
*refused* with the reason (the TaskProlog fails the job; the node stays up); when that user's
jobs have all ended, their daemon is stopped (``quit``, as them) and this user's is started. A
job counts as running while its grant file exists (the Epilog removes it). :func:`release` drops
a job's claim and stops a daemon whose last job that was (for the Epilog).

``<state_dir>/mps/gpu<N>/`` is root's: ``owner`` (uid, gid, GPU UUID of the daemon), ``jobs/<id>``
(one file per job using it), a ``lock`` serialising concurrent Prologs on the GPU. The pipe and
log directories are the user's, so nothing there is trusted: the pid file is read without
following links and its process must be the user's own ``nvidia-cuda-mps-control``.

The binary is looked up in :data:`SEARCH_DIRS`, never on the job's ``PATH`` (the Prolog has
none), and must not be writable by anyone but root. On a machine without it (fake GPUs, no
driver) :func:`find_control` answers ``None`` and the caller logs that ``share=mps`` runs
time-sliced. Stdlib only (``subprocess`` only once a daemon must start or stop): only
``share=mps`` jobs pay for this module at all.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # only for the type checker: the Prolog must not pay for typing
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from typing import Final

__all__ = ["BUSY", "CONTROL", "FAILED", "RUNNING", "SEARCH_DIRS", "STARTED", "UNAVAILABLE", "Outcome", "ensure",
           "find_control", "gpu_dir", "release", "server_pid", "stop"]

CONTROL: Final = "nvidia-cuda-mps-control"
# Where driver packages install it (Debian/Ubuntu/RHEL: /usr/bin; NVIDIA's container toolkit and some
# HPC images: /usr/local/nvidia/bin). A module attribute so tests can point it at a fake.
SEARCH_DIRS: tuple[str, ...] = ("/usr/bin", "/usr/local/bin", "/usr/local/nvidia/bin", "/usr/sbin")
SAFE_PATH: Final = "/usr/sbin:/usr/bin:/sbin:/bin"
PID_FILE: Final = "nvidia-cuda-mps-control.pid"  # written by the daemon into its pipe directory
START_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.01

# Outcomes of ensure()
STARTED: Final = "started"  # this call started the user's control daemon
RUNNING: Final = "running"  # the user's daemon already ran for this GPU
UNAVAILABLE: Final = "unavailable"  # no binary, no GPU UUID, no way to become the user: time-sliced
BUSY: Final = "busy"  # another user's daemon serves running jobs on this GPU: refuse the lease
FAILED: Final = "failed"  # the daemon did not come up: time-sliced


class Outcome:
    """What :func:`ensure` did: ``state`` (one of the constants above), the pipe/log directories when a
    daemon runs for the job, and a reason a person can act on otherwise."""

    __slots__ = ("log_dir", "pid", "pipe_dir", "reason", "state")

    def __init__(self, state: str, reason: str = "", *, pipe_dir: str | None = None, log_dir: str | None = None,
                 pid: int | None = None) -> None:
        self.state, self.reason, self.pipe_dir, self.log_dir, self.pid = state, reason, pipe_dir, log_dir, pid

    @property
    def serving(self) -> bool:
        return self.state in (STARTED, RUNNING)

    def __repr__(self) -> str:
        return f"Outcome({self.state!r}, {self.reason!r}, pipe_dir={self.pipe_dir!r}, pid={self.pid!r})"


def find_control(dirs: Sequence[str] | None = None) -> str | None:
    """The absolute path of ``nvidia-cuda-mps-control`` in ``dirs`` (default :data:`SEARCH_DIRS`), or ``None``.

    Only a regular, executable file that is root's (or this process's owner's) and not writable by
    group or others counts: root runs it for other users."""
    import stat

    for d in SEARCH_DIRS if dirs is None else dirs:
        path = f"{d}/{CONTROL}"
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (stat.S_ISREG(st.st_mode) and st.st_mode & 0o111 and st.st_uid in (0, os.geteuid())
                and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return path
    return None


def gpu_dir(state_dir: str, gpu: int) -> str:
    return f"{state_dir}/mps/gpu{int(gpu)}"


# --------------------------------------------------------------------------- what runs


def _read_small(path: str, limit: int = 256) -> str | None:
    """A small regular file's text, not following a link (O_NONBLOCK: a planted FIFO must not hang us)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit).decode("ascii", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _is_control(pid: int, uid: int) -> bool:
    """Whether ``pid`` is ``uid``'s own ``nvidia-cuda-mps-control`` (any argv word naming it: a script
    run through its interpreter shows the script's path second)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read(4096).split(b"\0")
    except OSError:
        return False
    return any(a.rsplit(b"/", 1)[-1] == CONTROL.encode() for a in argv[:2])


def _owner(base: str) -> tuple[int, int, str] | None:
    text = _read_small(f"{base}/owner")
    parts = (text or "").split()
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return None
    return int(parts[0]), int(parts[1]), parts[2]


def server_pid(state_dir: str, gpu: int) -> int | None:
    """The pid of the control daemon running for ``gpu`` (its recorded owner's), or ``None``."""
    return _server_pid(gpu_dir(state_dir, gpu))


def _server_pid(base: str) -> int | None:
    owner = _owner(base)
    text = _read_small(f"{base}/pipe/{PID_FILE}", 32)
    if owner is None or text is None or not text.strip().isdigit():
        return None
    pid = int(text.strip())
    return pid if pid > 1 and _is_control(pid, owner[0]) else None


def _jobs(base: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(f"{base}/jobs") if n.isdigit())
    except OSError:
        return []


# --------------------------------------------------------------------------- starting and stopping


class _Lock:
    """``flock`` on the GPU's lock file, polled until ``deadline`` (a hung holder must not hang a Prolog)."""

    def __init__(self, base: str, deadline: float) -> None:
        self.path, self.deadline, self.fd = f"{base}/lock", deadline, -1

    def __enter__(self) -> _Lock:
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() >= self.deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"{self.path} is held by another Prolog") from None
                time.sleep(_POLL_S)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing releases the lock


def _as_user(uid: int, gid: int | None) -> tuple[int | None, int | None, list[int] | None] | None:
    """subprocess's ``user``, ``group`` and ``extra_groups`` that run a command as ``uid`` (all ``None``:
    this process is that user); ``None`` when this process cannot become it."""
    if os.geteuid() == uid:
        return None, None, None
    if os.geteuid() != 0:
        return None
    return uid, gid if gid is not None else uid, []


def _control(binary: str, base: str, uid: int, gid: int | None, args: Sequence[str], *, stdin: str | None,
             device: str | None, timeout: float) -> tuple[int, str]:
    """Run the control binary as the user for the GPU at ``base``; ``(exit status, stderr tail)``."""
    import subprocess
    import tempfile

    who = _as_user(uid, gid)
    if who is None:
        return -1, f"this process (uid {os.geteuid()}) cannot run a command as uid {uid}"
    env = {"PATH": SAFE_PATH, "HOME": "/", "LANG": "C", "CUDA_MPS_PIPE_DIRECTORY": f"{base}/pipe",
           "CUDA_MPS_LOG_DIRECTORY": f"{base}/log"}
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    # stderr to an anonymous file in root's directory, never a pipe: ``-d`` forks a daemon that could
    # keep a pipe open (and so hang us) for its whole life.
    with tempfile.TemporaryFile(dir=base) as err:
        try:
            p = subprocess.run([binary, *args], env=env, cwd="/", input=None if stdin is None else stdin.encode(),
                               stdin=subprocess.DEVNULL if stdin is None else None, stdout=subprocess.DEVNULL,
                               stderr=err, timeout=max(timeout, 0.05), start_new_session=True, check=False,
                               user=who[0], group=who[1], extra_groups=who[2])
        except subprocess.TimeoutExpired:
            return -1, f"{binary} did not return within {timeout:.1f}s"
        except OSError as e:
            return -1, f"could not run {binary}: {e.strerror or e}"
        err.seek(0)
        tail = " ".join(err.read(2000).decode("utf-8", "replace").split())[-300:]
    return p.returncode, tail


def _fresh_dir(path: str, uid: int, gid: int | None) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)  # fd-based on Linux: a planted symlink is removed, not followed
    os.mkdir(path, 0o700)
    if os.geteuid() == 0:
        os.chown(path, uid, gid if gid is not None else uid)


def _write_owner(base: str, uid: int, gid: int | None, device: str) -> None:
    tmp = f"{base}/.owner.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{uid} {gid if gid is not None else uid} {device}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, f"{base}/owner")


def _claim(base: str, job_id: str, node: str) -> None:
    os.makedirs(f"{base}/jobs", 0o755, exist_ok=True)
    fd = os.open(f"{base}/jobs/{job_id}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{node}\n".encode())
    finally:
        os.close(fd)


def _unclaim_all(base: str) -> None:
    for j in _jobs(base):
        try:  # noqa: SIM105 - no contextlib on the Prolog's path
            os.unlink(f"{base}/jobs/{j}")
        except OSError:
            pass


def _stop_locked(binary: str, base: str, deadline: float) -> str | None:
    """Stop the daemon recorded at ``base`` (``quit`` as its owner, then SIGTERM); ``None`` when none is
    left, else why it could not be stopped."""
    owner = _owner(base)
    pid_text = _read_small(f"{base}/pipe/{PID_FILE}", 32)
    if owner is None or pid_text is None or not pid_text.strip().isdigit():
        return None
    uid, gid, _ = owner
    pid = int(pid_text.strip())
    if pid <= 1 or not _is_control(pid, uid):
        return None
    code, _ = _control(binary, base, uid, gid, [], stdin="quit\n", device=None,
                       timeout=max(deadline - time.monotonic(), 0.1))
    if code == 0 and _gone(pid, uid, deadline):
        return None
    import signal

    try:
        os.kill(pid, signal.SIGTERM)  # the owner's own control daemon (checked just above)
    except ProcessLookupError:
        return None
    if _gone(pid, uid, time.monotonic() + 1.0):
        return None
    return f"uid {uid}'s MPS control daemon (pid {pid}) did not stop"


def _gone(pid: int, uid: int, deadline: float) -> bool:
    while _is_control(pid, uid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def ensure(state_dir: str, gpu: int, device: str, *, uid: int, gid: int | None, job_id: str, node: str,
           binary: str | None, is_live: Callable[[str], bool], timeout: float = START_TIMEOUT_S) -> Outcome:
    """Make sure ``uid``'s MPS control daemon runs for NVML GPU ``gpu`` (UUID ``device``) and record
    ``job_id`` as using it. Never raises for what the machine does (a missing binary, a daemon that
    does not start, a held lock): the :class:`Outcome` says. ``is_live(job_id)``: whether a job that
    claimed the GPU earlier still runs."""
    if binary is None:
        return Outcome(UNAVAILABLE, f"no {CONTROL} in {', '.join(SEARCH_DIRS)}")
    if not device:
        return Outcome(UNAVAILABLE, f"GPU {gpu}'s UUID is unknown")
    if not (job_id.isascii() and job_id.isdigit()):  # it names a file under root's directory
        return Outcome(FAILED, f"job id {job_id[:40]!r} is not a Slurm job id")
    if _as_user(uid, gid) is None:
        return Outcome(UNAVAILABLE, f"this process (uid {os.geteuid()}) cannot start a daemon as uid {uid}")
    deadline = time.monotonic() + timeout
    base = gpu_dir(state_dir, gpu)
    try:
        os.makedirs(base, 0o755, exist_ok=True)
        with _Lock(base, deadline):
            return _ensure_locked(binary, base, gpu, device, uid, gid, job_id, node, is_live, deadline)
    except (OSError, TimeoutError) as e:
        return Outcome(FAILED, f"{base}: {e}")


def _ensure_locked(binary: str, base: str, gpu: int, device: str, uid: int, gid: int | None, job_id: str,
                   node: str, is_live: Callable[[str], bool], deadline: float) -> Outcome:
    pipe, logs = f"{base}/pipe", f"{base}/log"
    owner = _owner(base)
    pid = _server_pid(base)
    if pid is not None and owner is not None:
        if owner[0] == uid and owner[2] == device:
            _claim(base, job_id, node)
            return Outcome(RUNNING, pipe_dir=pipe, log_dir=logs, pid=pid)
        if owner[0] != uid:
            live = [j for j in _jobs(base) if is_live(j)]
            if live:
                return Outcome(BUSY, f"GPU {gpu} runs the MPS server of uid {owner[0]} for job(s) "
                                     f"{', '.join(live[:5])}; MPS serves one user per GPU: resubmit without "
                                     "share=mps, or when those jobs have ended")
        why = _stop_locked(binary, base, deadline)
        if why is not None:
            return Outcome(FAILED, why)
    _unclaim_all(base)
    _fresh_dir(pipe, uid, gid)
    _fresh_dir(logs, uid, gid)
    _write_owner(base, uid, gid, device)
    code, err = _control(binary, base, uid, gid, ["-d"], stdin=None, device=device,
                         timeout=deadline - time.monotonic())
    if code != 0:
        return Outcome(FAILED, f"{CONTROL} -d exited {code}" + (f": {err}" if err else ""))
    while True:  # -d returns once it has forked; the daemon writes its pid file a moment later
        pid = _server_pid(base)
        if pid is not None:
            _claim(base, job_id, node)
            return Outcome(STARTED, pipe_dir=pipe, log_dir=logs, pid=pid)
        if time.monotonic() >= deadline:
            return Outcome(FAILED, f"{CONTROL} -d wrote no live pid file in {pipe}")
        time.sleep(_POLL_S)


def stop(state_dir: str, gpu: int, *, binary: str | None = None, timeout: float = START_TIMEOUT_S) -> bool:
    """Stop the control daemon of ``gpu`` and forget its jobs. Whether none runs afterwards. Never raises."""
    return _locked(state_dir, gpu, None, binary, timeout)


def release(state_dir: str, job_id: str, *, binary: str | None = None, timeout: float = START_TIMEOUT_S) -> list[int]:
    """Drop ``job_id``'s claim on every GPU and stop each daemon whose last job it was (the Epilog's part).
    Returns the GPUs whose daemon was stopped. Never raises."""
    try:
        names = os.listdir(f"{state_dir}/mps")
    except OSError:
        return []
    gpus = sorted(int(n[3:]) for n in names if n.startswith("gpu") and n[3:].isdigit())
    claimed = [g for g in gpus if os.path.exists(f"{gpu_dir(state_dir, g)}/jobs/{job_id}")]
    return [g for g in claimed if _locked(state_dir, g, job_id, binary, timeout)]


def _locked(state_dir: str, gpu: int, job_id: str | None, binary: str | None, timeout: float) -> bool:
    """Under the GPU's lock: drop ``job_id``'s claim (if given); when no claim is left, stop the daemon.
    Whether a daemon was stopped (``job_id`` given) or none runs afterwards (``job_id`` None)."""
    base = gpu_dir(state_dir, gpu)
    if not os.path.isdir(base):
        return job_id is None
    deadline = time.monotonic() + timeout
    try:
        with _Lock(base, deadline):
            if job_id is not None:
                try:
                    os.unlink(f"{base}/jobs/{job_id}")
                except FileNotFoundError:
                    return False
                if _jobs(base):
                    return False  # another job still uses the daemon
            running = _server_pid(base) is not None
            binary = binary or find_control()
            if not running or binary is None:
                return job_id is None and not running
            why = _stop_locked(binary, base, deadline)
            if why is None:
                _unclaim_all(base)
            return why is None
    except (OSError, TimeoutError):
        return False
