"""What the hooks share: their few settings, a deadline, Slurm's environment, and the daemon call.

**Measurements** (the test machine: 2 cores, Debian's python3.11 in a venv, bytecode compiled,
``python -I``; medians of 40 round-robin runs, each ratio to the same run's bare interpreter, which
took 16-18 ms; a fake daemon that answers at once): a CPU job's Prolog 27 ms (1.5x: it stops before
reading anything), the TaskProlog 27 ms (1.4x), the Prolog with the daemon 91 ms (5.0x), the Epilog
88 ms (4.8x). What put those two over the 3x budget was ``import slurm_gpuarb.protocol`` (74 ms
alone, 4.6x): the dataclasses of ``model`` and ``protocol`` are built at import. The client now
speaks through :mod:`slurm_gpuarb.wire` (``json`` and ``errors`` only) instead. Measured the same
way (60 round-robin runs of the old and new code, Debian's python3.11 -I, a fake daemon in another
process): the Prolog with the daemon 91-97 → 53-56 ms (5.3-5.5x → 3.1x), the Epilog 90-99 → 50-56 ms
(2.9-3.1x). What is left above the bare interpreter is mostly ``tomllib`` with ``signal`` (22 ms
together: tomllib imports ``typing`` and ``re``), then ``json`` and ``socket`` (4 ms on top of
those); wire, errors and the client add about 1 ms. Hence the settings cache below: with it warm, the
same measurement (40 round-robin runs, Debian's python3.11 -I, bare interpreter 18-19 ms) gives the
Prolog with the daemon 57-59 → 42-45 ms (3.15x → 2.37x); ``-X importtime`` shows tomllib's 20 ms
gone, and ``re`` (8 ms, which ``json`` needs anyway) now comes with ``units``.

**Settings.** A hook needs six settings (socket, state dir, log file, fail mode, deadline, shard
quantum), not the whole site config. Loading the test cluster's gpuarb.toml with ``config.load()``
costs 12 ms more than reading those keys with ``tomllib`` (104 vs 92 ms, with the old client that
imported ``protocol``), and 44 ms more beside a wire-only client (90 vs 46 ms, its prototype: it then
also imports ``model`` and ``dataclasses``, besides ``pathlib``, ``urllib.parse`` and validating the
whole inventory). So
:func:`read_settings` reads just those keys and applies the same ``GPUARB_*`` environment twins and
defaults as :func:`slurm_gpuarb.config.load` (tests/hooks/test_common.py keeps the two in
agreement). The reader checks what keeps root safe (a regular file, not group/world-writable) and
the values it reads; unknown keys are ``config.load``'s job (the daemon and ``gpuarb config show``
run it). It never raises: a broken config gives the defaults and an ``error`` the hook logs, because
a Prolog must not drain a node over a typo.

**Settings cache.** A hook run as root that parsed the config writes the setting keys it found, as
text, to :data:`SETTINGS_CACHE` (a fixed path, never taken from the environment), under a key of the
config's path and ``stat`` (device, inode, size, mtime, ctime, mode, owner); later hooks whose key
matches read that instead of importing ``tomllib``. Only a root-owned regular file, not
group/world-writable and opened without following a link, is believed; anything else, a stale key,
or a file cut short, means the TOML is parsed as before. The cache holds the raw strings, so every
value is still checked, and the environment twins applied, on each run. An earlier cache measured no
gain (47.0 vs 47.3 ms) while ``protocol``'s import dominated; now that the client speaks through
``wire``, tomllib was the largest import left (measurement above).

The grant file is :mod:`.grants`; the exit-code table is :mod:`.exitcodes`.
"""

from __future__ import annotations

import os
import time

from slurm_gpuarb import logsink
from slurm_gpuarb.errors import ConfigError, GpuArbError

# Only for the type checker: importing typing at run time costs a CPU job's Prolog more than it runs.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from types import FrameType
    from typing import Any, Final

DEFAULT_CONFIG_PATH: Final = "/etc/slurm/gpuarb.toml"  # == config.DEFAULT_CONFIG_PATH
DEFAULTS: Final[dict[str, Any]] = {  # == config.Config's defaults (a test keeps them equal)
    "socket_path": "/run/gpuarb/gpuarb.sock",
    "state_dir": "/run/gpuarb",
    "log_file": "/var/log/gpuarb/gpuarb.log",
    "fail_mode": "open",
    "deadline_s": 10,
    "quantum_mib": 512,
}
# Share of the deadline the daemon may take before the in-process fallback gets the rest. A daemon
# under a burst of 50 Prologs queues them behind its ledger lock: give it room, but leave the
# fallback (imports SQLAlchemy, ~0.5 s) enough.
DAEMON_SHARE: Final = 0.4
WATCHDOG_GRACE_S: Final = 1.0
MAX_COMMENT_CHARS: Final = 4096  # a spec fits in far less; ≤ protocol.MAX_COMMENT_CHARS (a test checks)
_TOKEN: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+-")


class SlurmEnvError(GpuArbError):
    """Slurm's environment for a hook lacks a variable the hook needs, or holds a malformed one."""


class DeadlineExceeded(BaseException):
    """The hook's own deadline expired. A BaseException, so that no ``except Exception`` on the way
    (the in-process Handlers turn exceptions into error answers) swallows it."""


# --------------------------------------------------------------------------- settings


class Settings:
    """The hooks' settings (see the module docstring); ``error`` is the config problem, if any."""

    __slots__ = ("config_path", "deadline_s", "error", "fail_mode", "log_file", "quantum_mib", "socket_path",
                 "state_dir")

    def __init__(self) -> None:
        self.config_path: str | None = None
        self.socket_path: str = DEFAULTS["socket_path"]
        self.state_dir: str = DEFAULTS["state_dir"]
        self.log_file: str = DEFAULTS["log_file"]
        self.fail_mode: str = DEFAULTS["fail_mode"]
        self.deadline_s: float = DEFAULTS["deadline_s"]
        self.quantum_mib: int = DEFAULTS["quantum_mib"]
        self.error: str | None = None


_SETTING_KEYS: Final = (  # attribute, table, key, environment twin, kind
    ("socket_path", "daemon", "socket", "GPUARB_SOCKET", "path"),
    ("state_dir", "daemon", "state_dir", "GPUARB_STATE_DIR", "path"),
    ("log_file", "daemon", "log_file", "GPUARB_LOG_FILE", "path"),
    ("fail_mode", "hooks", "fail_mode", "GPUARB_FAIL_MODE", "fail_mode"),
    ("deadline_s", "hooks", "deadline", "GPUARB_HOOK_DEADLINE", "duration"),
    ("quantum_mib", "policy", "quantum", None, "size"),
)


def read_settings(env: Mapping[str, str]) -> Settings:
    """The hook settings: defaults → the config file → ``GPUARB_*`` environment. Never raises."""
    settings = Settings()
    try:
        _read_into(settings, env)
    except ConfigError as e:
        fresh = Settings()
        fresh.config_path, fresh.error = settings.config_path, str(e)
        return fresh
    return settings


def _read_into(s: Settings, env: Mapping[str, str]) -> None:
    path = env.get("GPUARB_CONFIG") or (DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None)
    s.config_path = path
    doc = _read_config(path) if path else {}
    for attr, table, key, var, kind in _SETTING_KEYS:
        section = doc.get(table, {})
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {table}: expected a table")
        if key in section:
            setattr(s, attr, _parse(kind, section[key], f"{path}: {table}.{key}"))
        if var is not None and env.get(var):
            setattr(s, attr, _parse(kind, env[var], f"environment variable {var}"))


def _read_config(path: str) -> dict[str, Any]:
    """The config's tables, from the settings cache when its key matches, else parsed (and cached)."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: is not a regular file")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{path}: is group- or world-writable but steers hooks that run as root; "
                              f"run chmod go-w {path}")
        key = _cache_key(path, st)
        cached = _cache_read(key) if key is not None else None
        if cached is not None:
            return cached
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file") from e
    finally:
        os.close(fd)
    doc = _parse_toml(path, raw)
    if key is not None and os.geteuid() == 0:
        _cache_write(key, doc)
    return doc


def _parse_toml(path: str, raw: bytes) -> dict[str, Any]:
    import tomllib  # 9-18 ms (typing, re, datetime): only when the settings cache misses

    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: is not valid TOML (gpuarb config show names the line)") from e
    if doc.get("version") != 1 or type(doc.get("version")) is not int:
        raise ConfigError(f"{path}: version: this gpuarb reads version 1")
    return doc


# --------------------------------------------------------------------------- the settings cache

# Where the Prolog keeps the six settings it parsed, so that later hooks need no tomllib. A module
# attribute (tests point it elsewhere), never an environment variable: a user must not redirect it.
SETTINGS_CACHE = "/run/gpuarb/hook-settings.cache"
_CACHE_MAGIC: Final = "gpuarb-hook-settings-1"
_CACHE_END: Final = "end"  # a cache cut short (full disk, a crash mid-write) lacks it and is ignored
_CACHE_MAX_BYTES: Final = 65536
_CACHE_BAD_CHARS: Final = ("\t", "\n", "\0")


def _cache_key(path: str, st: os.stat_result) -> str | None:
    """The cache's first line for this config file; None when the path cannot be written on one line."""
    if any(c in path for c in _CACHE_BAD_CHARS):
        return None
    fields = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode, st.st_uid)
    return "\t".join((_CACHE_MAGIC, path, *map(str, fields)))


def _cache_trusted(st: os.stat_result) -> bool:
    """Only a root-owned, regular, not group/world-writable cache may steer hooks that run as root."""
    import stat

    return stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _cache_read(key: str) -> dict[str, Any] | None:
    """The tables the cache holds for ``key``; None (parse the TOML) for anything but an exact, trusted hit."""
    try:
        # O_NONBLOCK: a FIFO planted there must not hang the hook before the regular-file check.
        fd = os.open(SETTINGS_CACHE, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not _cache_trusted(os.fstat(fd)):
            return None
        data = os.read(fd, _CACHE_MAX_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        lines = data.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return None
    # key, the settings, the end marker, and the empty string after the last newline
    if len(data) > _CACHE_MAX_BYTES or len(lines) < 3 or lines[0] != key or lines[-2:] != [_CACHE_END, ""]:
        return None
    known = {f"{table}.{name}": (table, name) for _, table, name, _, _ in _SETTING_KEYS}
    doc: dict[str, Any] = {}
    for line in lines[1:-2]:
        dotted, tab, value = line.partition("\t")
        if not tab or dotted not in known:
            return None
        table, name = known[dotted]
        doc.setdefault(table, {})[name] = value
    return doc


def _cache_lines(doc: Mapping[str, Any]) -> list[str] | None:
    """The cache's setting lines for a parsed config; None when a value could not come back the same."""
    lines = []
    for _, table, name, _, _ in _SETTING_KEYS:
        section = doc.get(table, {})
        if not isinstance(section, dict):
            return None  # _read_into reports it; nothing worth caching
        if name in section:
            value = section[name]
            if not isinstance(value, str) or any(c in value for c in _CACHE_BAD_CHARS):
                return None
            lines.append(f"{table}.{name}\t{value}")
    return lines


def _cache_write(key: str, doc: Mapping[str, Any]) -> None:
    """Replace the cache with ``doc``'s settings under ``key``. Root only; never raises: a hook must not
    fail over its cache."""
    lines = _cache_lines(doc)
    if lines is None:
        return
    data = "\n".join([key, *lines, _CACHE_END, ""]).encode("utf-8")
    if len(data) > _CACHE_MAX_BYTES:
        return
    import contextlib  # here: only a cache miss as root writes

    tmp = f"{SETTINGS_CACHE}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(SETTINGS_CACHE), 0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)  # left by a crashed hook that had our pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask: the TaskProlog reads it as the job's user
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, SETTINGS_CACHE)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _parse(kind: str, value: object, where: str) -> object:
    from slurm_gpuarb.units import UnitError, parse_duration_s, parse_size_mib

    if not isinstance(value, str):
        raise ConfigError(f"{where}: expected a string")
    try:
        if kind == "path":
            if not value.startswith("/"):
                raise ConfigError(f"{where}: expected an absolute path, found {value[:60]!r}")
            return value
        if kind == "fail_mode":
            if value not in ("open", "closed"):
                raise ConfigError(f"{where}: expected open or closed, found {value[:40]!r}")
            return value
        if kind == "duration":
            return parse_duration_s(value)
        return parse_size_mib(value)
    except UnitError as e:
        raise ConfigError(f"{where}: {e}") from e


# --------------------------------------------------------------------------- the deadline


class Deadline:
    """A hook's own deadline: SIGALRM raises :class:`DeadlineExceeded` in the main thread when it expires.

    Socket calls take their timeout from :meth:`remaining`. :meth:`watchdog` adds a hard backstop
    for the in-process fallback, whose database driver can sit in C (SQLite's busy wait) where no
    Python signal handler runs.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.armed = False
        self._timer: Any = None

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def arm(self) -> Deadline:
        import signal  # here, not at the top: it imports enum, which a CPU job's Prolog never needs

        try:
            signal.signal(signal.SIGALRM, self._fire)
        except ValueError:  # not the main thread (a test harness): socket timeouts still bound us
            return self
        signal.setitimer(signal.ITIMER_REAL, max(self.remaining(), 0.001))
        self.armed = True
        return self

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"the hook's deadline of {self.seconds:g}s expired ([hooks] deadline)")

    def watchdog(self, on_expire: Callable[[], int]) -> None:
        """After the deadline plus a grace, call ``on_expire`` from a thread and ``os._exit`` with its code."""
        import threading

        def fire() -> None:
            code = 0
            try:
                code = on_expire()
            finally:
                os._exit(code)

        self._timer = threading.Timer(self.remaining() + WATCHDOG_GRACE_S, fire)
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.armed:
            import signal

            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            self.armed = False


# --------------------------------------------------------------------------- Slurm's environment


class Job:
    """What the Prolog/Epilog environment says about the job (SLURM-LAB.md lists the variables)."""

    __slots__ = ("comment", "exit_code", "gid", "gres", "job_id", "node", "partition", "restart_count", "uid",
                 "user")

    def __init__(self, job_id: str, node: str, restart_count: int = 0, *, uid: int | None = None,
                 gid: int | None = None, user: str | None = None, partition: str | None = None,
                 comment: str | None = None, gres: str | None = None, exit_code: int | None = None) -> None:
        self.job_id, self.node, self.restart_count = job_id, node, restart_count
        self.uid, self.gid, self.user, self.partition = uid, gid, user, partition
        self.comment, self.gres, self.exit_code = comment, gres, exit_code


def check_job_id(value: str | None, var: str = "SLURM_JOB_ID") -> str:
    # Slurm job ids are integers (an array task and a het component have their own): digits only
    # also keeps the grant path inside its directory.
    if not value or not value.isascii() or not value.isdigit() or len(value) > 20:
        raise SlurmEnvError(f"{var} must be a Slurm job id (digits), got {_shown(value)}")
    return value


def check_node(value: str | None, var: str = "SLURMD_NODENAME") -> str:
    if not value or value[0] == "." or not is_token(value):
        raise SlurmEnvError(f"{var} must be a node name of [A-Za-z0-9._:@+-], got {_shown(value)}")
    return value


def is_token(value: str) -> bool:
    """A value the protocol takes as an id or name: 1-128 characters of ``[A-Za-z0-9._:@+-]``."""
    return 0 < len(value) <= 128 and all(c in _TOKEN for c in value)


def _int(env: Mapping[str, str], var: str, default: int | None) -> int | None:
    text = env.get(var, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise SlurmEnvError(f"{var} must be a non-negative integer, got {_shown(text)}")
    return value


def _shown(value: str | None) -> str:
    return "nothing" if not value else repr(value[:40])


def clean_comment(raw: str | None) -> str | None:
    """The comment as it may be sent: undecodable bytes replaced, cut at :data:`MAX_COMMENT_CHARS`."""
    if raw is None:
        return None
    text = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return text[:MAX_COMMENT_CHARS]


def job_from_env(env: Mapping[str, str]) -> Job:
    """The job of a Prolog/Epilog from its environment. Raises :class:`SlurmEnvError`."""
    return Job(
        check_job_id(env.get("SLURM_JOB_ID")),
        check_node(env.get("SLURMD_NODENAME")),
        _int(env, "SLURM_JOB_RESTART_COUNT", 0) or 0,  # absent before the first requeue on some versions
        uid=_lenient_int(env, "SLURM_JOB_UID"),
        gid=_lenient_int(env, "SLURM_JOB_GID"),
        user=env.get("SLURM_JOB_USER") or None,
        partition=env.get("SLURM_JOB_PARTITION") or None,
        comment=clean_comment(env.get("SLURM_JOB_COMMENT")),
        gres=env.get("SLURM_JOB_GPUS") or None,
        exit_code=_lenient_int(env, "SLURM_JOB_EXIT_CODE"),
    )


def _lenient_int(env: Mapping[str, str], var: str) -> int | None:
    # Informational values: a malformed one is dropped (the daemon then says what it misses), so
    # that, say, an odd exit status never keeps an Epilog from releasing.
    try:
        return _int(env, var, None)
    except SlurmEnvError:
        return None


# --------------------------------------------------------------------------- asking the daemon


class LedgerUnavailable(GpuArbError):
    """Neither gpuarbd nor the in-process fallback could answer."""


def in_process(msg: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """The fallback: ``Handlers(load()).handle(msg, Peer(0, 0, pid))`` in this process.

    Heavy (SQLAlchemy, telemetry): only reached when the daemon is down or hung.
    """
    from slurm_gpuarb import protocol
    from slurm_gpuarb.config import load
    from slurm_gpuarb.daemon.handlers import Handlers, Peer

    with Handlers(load(env=env)) as handlers:
        return handlers.handle(protocol.parse_request(msg), Peer(0, 0, os.getpid()))


def ask(settings: Settings, msg: dict[str, Any], deadline: Deadline, env: Mapping[str, str], *, hook: str,
        on_expire: Callable[[], int] | None = None, **log_fields: object) -> dict[str, Any]:
    """gpuarbd's answer to ``msg``; when the daemon is unavailable, the in-process Handlers' answer.

    The daemon gets :data:`DAEMON_SHARE` of the remaining deadline. An error answer raises the
    exception it names (from either path); a fallback that fails on its own raises
    :class:`LedgerUnavailable`. ``on_expire`` arms the fallback's hard watchdog (see :class:`Deadline`).
    """
    from slurm_gpuarb import client

    try:
        return client.call(settings.socket_path, msg, timeout=max(deadline.remaining() * DAEMON_SHARE, 0.05))
    except client.DaemonUnavailable as e:
        logsink.warning(hook, "gpuarbd unavailable; deciding in-process", **log_fields, error=str(e))
    if on_expire is not None:
        deadline.watchdog(on_expire)
    try:
        answer = in_process(msg, env)
    except GpuArbError:
        raise
    except Exception as e:
        raise LedgerUnavailable("the in-process fallback failed too") from e
    if answer.get("ok") is not True:
        from slurm_gpuarb import wire

        wire.decode_response(wire.encode(answer), op=msg.get("op"))  # raises the error it names
    return answer
