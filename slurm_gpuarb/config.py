"""Site configuration: one strict, versioned TOML file, ``/etc/slurm/gpuarb.toml`` by default.

Resolution order, later wins: embedded defaults → the file → ``GPUARB_*`` environment → explicit
overrides (command-line flags). ``load()`` returns one frozen :class:`Config`; every mistake is a
:class:`~slurm_gpuarb.errors.ConfigError` naming the file (or variable, or option), the key path
(``classes.batch.preemptable``), what was expected and what was found. Unknown keys are errors, with
a did-you-mean. ``templates/examples/README.md`` is the admin-facing version of this reference.
``[[reservations]]``, ``[[services]]`` and ``[controller]`` are read by :mod:`.config_services`.

File reference (``*`` = required)::

    version = 1                    * the format version; this gpuarb reads version 1
    [host]     node                this machine's node name (default $SLURMD_NODENAME, else short hostname)
    [ledger]   url                 sqlite:////ABS/PATH (default sqlite:////var/lib/gpuarb/ledger.db)
                                   or postgresql+psycopg://USER@HOST/DB — never with a password in it
               password_file       absolute path of a 0600 file holding the PostgreSQL password
    [telemetry] backend            auto | nvml | smi | fake:PRESET (default auto)
               fake_state          directory of the fake backend's overlay files (default: none;
                                   $GPUARB_FAKE_STATE) — hooks get no environment, so test clusters set it here
    [daemon]   socket              gpuarbd's Unix socket (default /run/gpuarb/gpuarb.sock)
               state_dir           grant files for the TaskProlog, markers (default /run/gpuarb)
               log_file            hook/daemon log when /dev/log is absent (default /var/log/gpuarb/gpuarb.log)
               gres_map_dir        `gpuarb render`'s gres-map/ (GRES index → GPU / MIG UUID per node; default
                                   /etc/slurm/gpuarb/gres-map; a node without a file there maps by the inventory)
    [hooks]    fail_mode           open | closed: a ledger/daemon outage lets jobs run, or fails them (default open)
               deadline            a hook's own deadline, below PrologEpilogTimeout (default "10s")
    [policy]   margin              safety margin per GPU, "0MiB" allowed (default "1GiB")
               quantum             VRAM of one Slurm shard, at least 64MiB (default "512MiB")
               default_class       the class of a spec without prio= (default "batch")
               default_ttl, max_ttl   durations ("2h", "1d"); default_ttl ≤ max_ttl
    [classes.NAME]                 NAME as in prio=NAME: [a-z][a-z0-9_-]{0,31}. A [classes] table in the
                                   file replaces the embedded llm/batch pair as a whole.
               priority          * integer 0..4294967295 (Slurm QoS priority is 32-bit); higher wins
               preemptible         bool (default false): may be requeued/cancelled for a higher class
               may_degrade         bool (default false): may be granted less than asked, down to min=
               qos                 Slurm QoS (default NAME)
               mps_thread_percent  1..100: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for share=mps leases
    [[reservations]]               standing VRAM for tenants outside the lease protocol
               name              * unique; size * ("12GiB"); gpu (NVML index, default 0)
               node                one node (default: every node with that GPU index)
               mode                static (subtracted from rendered shards) | holder (held by a holder job)
               match             * inline table, at least one of process (comm, ≤15 chars), user, pidfile
               probe               inline table: kind * (vllm | ollama | tfserving), url * (http://HOST:PORT),
                                   model (required for tfserving), timeout ("2s", "500ms"; default 2s);
                                   required for mode = "holder"; makes the reservation a service too
               grace               holder only: how long the service may be down before its holder job
                                   is cancelled (default "5m")
    [[services]]                   inference backends without a reservation, for gpuarb services / route
               name *, kind *, url *, models (names it serves; required for tfserving), timeout
    [controller]                   the controller agent (gpuarbd --role controller)
               interval            its loop ("15s"); shrink (bool, default true): shrink waiting min= jobs
               holder_class        class of holder jobs (default: the highest non-preemptible class)
               holder_partition    partition of holder jobs (default: one holding the node that admits it)
               holder_time_limit   sbatch --time of holder jobs (default UNLIMITED)
    [[nodes]]                      the inventory; the renderer's input
               name              * a node name or a Slurm hostlist ("dgx[01-16]")
               telemetry           per-node backend (several fake slurmd on one test host)
               gpus              * array of inline tables, each with index (or count = N for the next N
                                   indices), sku *, mode (whole | shard | mig | mps), minor (/dev/nvidiaN;
                                   not with count), mig (layout when mode = "mig": ["7x1g.10gb"])
    [[partitions]]
               name *, nodes * (names or hostlists), mode (whole | shard | mig | mps, default whole),
               classes (default: every class), default (bool, at most one partition)

A GPU's mode is its own ``mode``, else the non-``whole`` mode of the partitions holding its node
(they must agree), else ``whole``. Every node of a partition needs a GPU its mode can use (a
``whole`` partition can use shard and mps GPUs, which Slurm still hands out whole).

Environment twins (an empty value counts as unset): GPUARB_CONFIG (the file), GPUARB_NODE,
GPUARB_LEDGER, GPUARB_LEDGER_PASSWORD_FILE, GPUARB_TELEMETRY, GPUARB_SOCKET, GPUARB_STATE_DIR,
GPUARB_LOG_FILE, GPUARB_GRES_MAP_DIR, GPUARB_FAIL_MODE, GPUARB_HOOK_DEADLINE. ``overrides`` takes the
:class:`Config` field names of the same settings (``ledger_url``, ``telemetry``, ``hook_deadline_s``, …); a ``None``
value means "not given". A telemetry backend from the environment or an override applies to every
node, beating the file's per-node ``telemetry``.

The file holds no secret, so root-owned 0644 is fine (the TaskProlog runs as the job's user and
reads it); it must not be group- or world-writable, because it steers hooks that run as root.
This module is on the hooks' hot path: it imports only the standard library.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from .errors import ConfigError
from .model import ClassPolicy, ControllerConfig, Policy, Reservation, ServiceConfig
from .units import UnitError, parse_duration_s, parse_size_mib

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "Config",
    "GpuConfig",
    "NodeConfig",
    "PartitionConfig",
    "expand_hostlist",
    "load",
    "node_config",
    "reservations_for",
    "telemetry_for",
]

T = TypeVar("T")

DEFAULT_CONFIG_PATH = "/etc/slurm/gpuarb.toml"
CONFIG_VERSION: Final = 1
DEFAULT_LEDGER_URL: Final = "sqlite:////var/lib/gpuarb/ledger.db"
GPU_MODES: Final = ("whole", "shard", "mig", "mps")
FAIL_MODES: Final = ("open", "closed")
TELEMETRY_BACKENDS: Final = ("auto", "nvml", "smi")
MIN_QUANTUM_MIB: Final = 64
MAX_PRIORITY: Final = 2**32 - 1
MAX_GPU_INDEX: Final = 255
MAX_HOSTLIST: Final = 65536
COMM_MAX_CHARS: Final = 15  # /proc/PID/comm keeps 15 characters (TASK_COMM_LEN 16, proc(5))

# The same grammar as the spec's prio= (spec.NAME_RE; a test keeps them equal).
CLASS_NAME_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)
NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)  # nodes, partitions, reservations
TOKEN_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)  # SKUs, presets, QoS (Slurm lowercases)
MIG_LAYOUT_RE: Final = re.compile(r"(?:([1-9][0-9]?)x)?([1-8]g\.[0-9]{1,3}gb(?:\+[a-z]{1,8})?)", re.ASCII)
_ZERO_SIZE_RE: Final = re.compile(r"0{1,9}(?:\.0{1,3})?([A-Za-z]{2,3})", re.ASCII)
_BRACKET_RE: Final = re.compile(r"\[([^\[\]]*)\]")
_RANGE_RE: Final = re.compile(r"([0-9]{1,6})(?:-([0-9]{1,6}))?", re.ASCII)

_TOP_KEYS: Final = ("version", "host", "ledger", "telemetry", "daemon", "hooks", "policy", "classes",
                    "reservations", "services", "controller", "nodes", "partitions")
_POLICY_KEYS: Final = ("margin", "quantum", "default_class", "default_ttl", "max_ttl")
_CLASS_KEYS: Final = ("priority", "preemptible", "may_degrade", "qos", "mps_thread_percent")
_NODE_KEYS: Final = ("name", "telemetry", "gpus")
_GPU_KEYS: Final = ("index", "count", "sku", "mode", "minor", "mig")
_PARTITION_KEYS: Final = ("name", "nodes", "mode", "classes", "default")


# --------------------------------------------------------------------------- the resolved config


@dataclass(frozen=True)
class GpuConfig:
    """One GPU of the inventory. ``index`` is the NVML index, ``minor`` the ``/dev/nvidiaN`` number
    when it differs; ``mig`` is the MIG layout (one profile per instance) when ``mode == "mig"``."""

    index: int
    sku: str
    mode: str = "whole"
    minor: int | None = None
    mig: tuple[str, ...] = ()


@dataclass(frozen=True)
class NodeConfig:
    """One node of the inventory; ``telemetry`` overrides the global backend for this node."""

    name: str
    telemetry: str | None
    gpus: tuple[GpuConfig, ...]


@dataclass(frozen=True)
class PartitionConfig:
    """A Slurm partition: which nodes, which GPU mode its jobs get, which classes may use it."""

    name: str
    nodes: tuple[str, ...]
    mode: str
    classes: tuple[str, ...]
    default: bool = False


@dataclass(frozen=True)
class Config:
    """Everything a plane needs to know about the site, resolved and validated.

    ``sources`` says where each run-plane setting came from (``default``, ``file``, an environment
    variable's name, or ``option``), for ``gpuarb config show``.
    """

    version: int
    path: Path | None
    node: str
    ledger_url: str
    pg_password_file: Path | None
    telemetry: str
    policy: Policy
    reservations: tuple[Reservation, ...] = ()
    services: tuple[ServiceConfig, ...] = ()  # probed reservations first, then [[services]]
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    nodes: tuple[NodeConfig, ...] = ()
    partitions: tuple[PartitionConfig, ...] = ()
    socket_path: Path = Path("/run/gpuarb/gpuarb.sock")
    log_file: Path = Path("/var/log/gpuarb/gpuarb.log")
    gres_map_dir: Path = Path("/etc/slurm/gpuarb/gres-map")
    fail_mode: str = "open"
    hook_deadline_s: int = 10
    state_dir: Path = Path("/run/gpuarb")
    fake_state: Path | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)


def default_classes() -> dict[str, ClassPolicy]:
    """The embedded pair: latency-sensitive LLM serving outranks preemptible, shrinkable batch."""
    return {
        "llm": ClassPolicy("llm", 1000, preemptible=False, may_degrade=False, qos="llm"),
        "batch": ClassPolicy("batch", 10, preemptible=True, may_degrade=True, mps_thread_percent=30, qos="batch"),
    }


def node_config(cfg: Config, name: str) -> NodeConfig | None:
    """The inventory entry of node ``name``, or ``None`` when the file declares no such node."""
    for node in cfg.nodes:
        if node.name == name:
            return node
    return None


def reservations_for(cfg: Config, node: str) -> list[Reservation]:
    """The standing reservations that apply on ``node``: its own, and the node-less ones whose GPU
    index the node has (all node-less ones when the node is not in the inventory)."""
    inv = node_config(cfg, node)
    indices = None if inv is None else {g.index for g in inv.gpus}
    return [r for r in cfg.reservations
            if r.node == node or (r.node is None and (indices is None or r.gpu in indices))]


def telemetry_for(cfg: Config, node: str) -> str:
    """The telemetry backend for ``node``: its own ``telemetry`` from the file, else the global one."""
    inv = node_config(cfg, node)
    return inv.telemetry if inv is not None and inv.telemetry is not None else cfg.telemetry


# --------------------------------------------------------------------------- reading TOML strictly


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{type(value).__name__.replace('int', 'integer')} {value}"
    if isinstance(value, str):
        return f"string {value[:40]!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__  # TOML dates and times


def _unknown(where: str, key: str, expected: Sequence[str]) -> ConfigError:
    import difflib  # only on the error path: hooks load the config on every job

    close = difflib.get_close_matches(key, expected, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown key{hint} (expected one of: {', '.join(expected)})")


class _Table:
    """One TOML table being read, with its file and key path; unknown keys are refused up front."""

    def __init__(self, file: str, path: str, data: Mapping[str, Any], keys: Sequence[str]) -> None:
        self.file, self.path, self.data = file, path, data
        for key in data:
            if key not in keys:
                raise _unknown(self.where(key), key, keys)

    def where(self, key: str | None = None) -> str:
        return f"{self.file}: {self.path if key is None else self.sub(key)}"

    def error(self, key: str | None, problem: str) -> ConfigError:
        return ConfigError(f"{self.where(key)}: {problem}")

    def get(self, key: str, kind: type[T], what: str) -> T | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
            return value
        raise self.error(key, f"expected {what}, found {_describe(value)}")

    def need(self, key: str, kind: type[T], what: str) -> T:
        value = self.get(key, kind, what)
        if value is None:
            raise self.error(key, f"missing; add it ({what})")
        return value

    def integer(self, key: str, lo: int, hi: int) -> int | None:
        value = self.get(key, int, "an integer")
        if value is not None and not lo <= value <= hi:
            raise self.error(key, f"expected an integer from {lo} to {hi}, found {value}")
        return value

    def size(self, key: str, *, allow_zero: bool = False) -> int | None:
        text = self.get(key, str, 'a size string such as "12GiB"')
        return None if text is None else _parse_size(text, self.where(key), allow_zero)

    def duration(self, key: str) -> int | None:
        text = self.get(key, str, 'a duration string such as "2h"')
        return None if text is None else _parse_duration(text, self.where(key))

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def table(self, key: str, keys: Sequence[str]) -> _Table:
        return _Table(self.file, self.sub(key), self.get(key, dict, f"a table ([{self.sub(key)}])") or {}, keys)

    def tables(self, key: str, keys: Sequence[str]) -> list[_Table]:
        items = self.get(key, list, f"an array of tables ([[{self.sub(key)}]])") or []
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise ConfigError(f"{self.file}: {self.sub(key)}[{i}]: expected a table, found {_describe(item)}")
            out.append(_Table(self.file, f"{self.sub(key)}[{i}]", item, keys))
        return out

    def strings(self, key: str, item: str) -> list[str] | None:
        items = self.get(key, list, f"an array of strings ({item}s)")
        if items is None:
            return None
        for i, value in enumerate(items):
            if not isinstance(value, str):
                raise self.error(f"{key}[{i}]", f"expected a string ({item}), found {_describe(value)}")
        return items

    def name(self, key: str, regex: re.Pattern[str], what: str) -> str:
        value = self.need(key, str, what)
        if regex.fullmatch(value) is None:
            raise self.error(key, f"{value[:40]!r} is not {what} (expected {regex.pattern})")
        return value

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.get(key, str, "a string")
        if value is None:
            return default
        if value not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}, found {value[:40]!r}")
        return value


def _parse_size(text: str, where: str, allow_zero: bool = False) -> int:
    zero = _ZERO_SIZE_RE.fullmatch(text) if allow_zero else None
    try:
        if zero is not None:
            parse_size_mib(f"1{zero.group(1)}")  # still refuse an unknown unit
            return 0
        return parse_size_mib(text)
    except UnitError as e:
        raise ConfigError(f"{where}: expected a size such as \"12GiB\"") from e


def _parse_duration(text: str, where: str) -> int:
    try:
        return parse_duration_s(text)
    except UnitError as e:
        raise ConfigError(f"{where}: expected a duration such as \"10s\", \"2h\" or \"1h30m\"") from e


class _HostlistError(ValueError):
    pass


def expand_hostlist(text: str) -> list[str]:
    """``"dgx[01-03,07]"`` → dgx01 dgx02 dgx03 dgx07, as Slurm reads it (the low bound's width pads).
    Several bracket groups expand as a product; a plain name is itself. Raises ValueError."""
    m = _BRACKET_RE.search(text)
    if m is None:
        if "[" in text or "]" in text:
            raise _HostlistError(f"{text[:40]!r} has an unbalanced bracket")
        return [text]
    head, tails = text[: m.start()], expand_hostlist(text[m.end():])
    if "[" in head or "]" in head:
        raise _HostlistError(f"{text[:40]!r} has an unbalanced bracket")
    out: list[str] = []
    for part in m.group(1).split(","):
        r = _RANGE_RE.fullmatch(part)
        if r is None:
            raise _HostlistError(f"{part[:20]!r} in {text[:40]!r} is not a number or a range such as 01-16")
        lo, hi = int(r.group(1)), int(r.group(2) or r.group(1))
        if hi < lo or len(out) + (hi - lo + 1) * len(tails) > MAX_HOSTLIST:
            raise _HostlistError(f"{part!r} in {text[:40]!r} is reversed or names too many nodes")
        width = len(r.group(1))
        out.extend(f"{head}{n:0{width}d}{tail}" for n in range(lo, hi + 1) for tail in tails)
    return out


def _parse_node(text: str, where: str) -> str:
    if NAME_RE.fullmatch(text) is None:
        raise ConfigError(f"{where}: {text[:40]!r} is not a node name (expected {NAME_RE.pattern})")
    return text


def _parse_url(text: str, where: str) -> str:
    # Never echo the URL: it may carry the very password we refuse.
    scheme, sep, rest = text.partition("://")
    dialect = scheme.split("+", 1)[0].lower()
    if not sep or dialect not in ("sqlite", "postgresql"):
        hint = " (the SQLAlchemy name is postgresql, not postgres)" if dialect == "postgres" else ""
        raise ConfigError(f"{where}: expected a ledger URL such as {DEFAULT_LEDGER_URL} or "
                          f"postgresql+psycopg://gpuarb@dbhost/gpuarb{hint}")
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ConfigError(f"{where}: the ledger URL cannot be parsed") from e
    if parts.password is not None or "password=" in parts.query.lower():
        raise ConfigError(f"{where}: the ledger URL carries a password; remove it and put the password in a 0600 "
                          "file named by [ledger] password_file (or GPUARB_LEDGER_PASSWORD_FILE)")
    if dialect == "sqlite" and rest and not rest.startswith("/:memory:") and not rest.startswith("//"):
        raise ConfigError(f"{where}: a SQLite ledger needs an absolute path, sqlite:////var/lib/gpuarb/ledger.db "
                          "(four slashes): a relative one depends on the directory a hook runs in")
    return text


def _parse_path(text: str, where: str) -> Path:
    if not text.startswith("/"):
        raise ConfigError(f"{where}: expected an absolute path, found {text[:60]!r} (hooks run from any directory)")
    return Path(text)


def _parse_telemetry(text: str, where: str) -> str:
    if text in TELEMETRY_BACKENDS or (text.startswith("fake:") and TOKEN_RE.fullmatch(text[5:])):
        return text
    raise ConfigError(f"{where}: expected auto, nvml, smi or fake:PRESET (e.g. fake:rtx3090ti-24g), "
                      f"found {text[:40]!r}")


def _parse_fail_mode(text: str, where: str) -> str:
    if text not in FAIL_MODES:
        raise ConfigError(f"{where}: expected open or closed, found {text[:40]!r}")
    return text


@dataclass(frozen=True)
class _Setting:
    field: str  # Config field and override key
    table: str
    key: str
    env: str
    parse: Callable[[str, str], object]
    what: str


_SETTINGS: Final = (
    _Setting("node", "host", "node", "GPUARB_NODE", _parse_node, "a node name"),
    _Setting("ledger_url", "ledger", "url", "GPUARB_LEDGER", _parse_url, "a ledger URL string"),
    _Setting("pg_password_file", "ledger", "password_file", "GPUARB_LEDGER_PASSWORD_FILE", _parse_path,
             "an absolute path"),
    _Setting("telemetry", "telemetry", "backend", "GPUARB_TELEMETRY", _parse_telemetry, '"auto" or a backend name'),
    _Setting("fake_state", "telemetry", "fake_state", "GPUARB_FAKE_STATE", _parse_path, "an absolute path"),
    _Setting("socket_path", "daemon", "socket", "GPUARB_SOCKET", _parse_path, "an absolute path"),
    _Setting("state_dir", "daemon", "state_dir", "GPUARB_STATE_DIR", _parse_path, "an absolute path"),
    _Setting("log_file", "daemon", "log_file", "GPUARB_LOG_FILE", _parse_path, "an absolute path"),
    _Setting("gres_map_dir", "daemon", "gres_map_dir", "GPUARB_GRES_MAP_DIR", _parse_path, "an absolute path"),
    _Setting("fail_mode", "hooks", "fail_mode", "GPUARB_FAIL_MODE", _parse_fail_mode, '"open" or "closed"'),
    _Setting("hook_deadline_s", "hooks", "deadline", "GPUARB_HOOK_DEADLINE", _parse_duration,
             'a duration string such as "10s"'),
)
OVERRIDE_KEYS: Final = tuple(s.field for s in _SETTINGS)
_TABLE_KEYS: Final = {t: tuple(s.key for s in _SETTINGS if s.table == t) for t in dict.fromkeys(
    s.table for s in _SETTINGS)}


def _override_text(name: str, value: object) -> str:
    if isinstance(value, Path):
        return str(value)
    if name == "hook_deadline_s" and isinstance(value, int) and not isinstance(value, bool):
        return f"{value}s"
    if not isinstance(value, str):
        raise ConfigError(f"option {name}: expected a string, found {_describe(value)}")
    return value


def _settings(tables: Mapping[str, _Table], env: Mapping[str, str], overrides: Mapping[str, object]
              ) -> tuple[dict[str, Any], dict[str, str]]:
    for name in overrides:
        if name not in OVERRIDE_KEYS:
            raise _unknown(f"option {name}", name, OVERRIDE_KEYS)
    values: dict[str, Any] = {
        "node": env.get("SLURMD_NODENAME") or os.uname().nodename.split(".", 1)[0],
        "ledger_url": DEFAULT_LEDGER_URL, "pg_password_file": None, "telemetry": "auto",
        "socket_path": Config.socket_path, "state_dir": Config.state_dir, "log_file": Config.log_file,
        "fail_mode": Config.fail_mode, "hook_deadline_s": Config.hook_deadline_s, "fake_state": None,
    }
    sources = dict.fromkeys(values, "default")
    for s in _SETTINGS:
        tbl = tables[s.table]
        text = tbl.get(s.key, str, s.what)
        if text is not None:
            values[s.field], sources[s.field] = s.parse(text, tbl.where(s.key)), "file"
        if env.get(s.env):
            values[s.field], sources[s.field] = s.parse(env[s.env], f"environment variable {s.env}"), s.env
        if overrides.get(s.field) is not None:
            values[s.field] = s.parse(_override_text(s.field, overrides[s.field]), f"option {s.field}")
            sources[s.field] = "option"
    return values, sources


# --------------------------------------------------------------------------- policy and inventory


def _policy(top: _Table) -> Policy:
    pol = top.table("policy", _POLICY_KEYS)
    classes = default_classes()
    if "classes" in top.data:
        table = top.get("classes", dict, "a table of [classes.NAME] tables") or {}
        if not table:
            raise top.error("classes", "declare at least one class, e.g. [classes.batch] with priority = 10")
        classes = {name: _class(top, name) for name in table}
    margin = pol.size("margin", allow_zero=True)
    quantum = pol.size("quantum")
    if quantum is not None and quantum < MIN_QUANTUM_MIB:
        raise pol.error("quantum", f"expected at least {MIN_QUANTUM_MIB}MiB (a shard per few MiB floods gres.conf)")
    default_class = pol.get("default_class", str, "a class name") or "batch"
    if default_class not in classes:
        raise pol.error("default_class", f"{default_class[:40]!r} is not a declared class "
                                         f"(declared: {', '.join(classes)}); add [classes.{default_class[:32]}]")
    default_ttl, max_ttl = pol.duration("default_ttl"), pol.duration("max_ttl")
    if default_ttl is not None and max_ttl is not None and default_ttl > max_ttl:
        raise pol.error("default_ttl", "is longer than policy.max_ttl; shorten it or raise max_ttl")
    return Policy(classes=classes, margin_mib=1024 if margin is None else margin,
                  quantum_mib=quantum or 512, default_class=default_class,
                  max_ttl_s=max_ttl, default_ttl_s=default_ttl)


def _class(top: _Table, name: str) -> ClassPolicy:
    if CLASS_NAME_RE.fullmatch(name) is None:
        raise top.error(f"classes.{name[:40]}",
                        f"is not a class name usable as prio= (expected {CLASS_NAME_RE.pattern})")
    body = top.data["classes"][name]
    if not isinstance(body, dict):
        raise top.error(f"classes.{name}", f"expected a table ([classes.{name}]), found {_describe(body)}")
    t = _Table(top.file, f"classes.{name}", body, _CLASS_KEYS)
    priority = t.integer("priority", 0, MAX_PRIORITY)
    if priority is None:
        raise t.error("priority", "missing; add priority = <integer> (higher wins, e.g. 1000 for llm, 10 for batch)")
    qos = t.get("qos", str, "a Slurm QoS name") or name
    if TOKEN_RE.fullmatch(qos) is None:
        raise t.error("qos", f"{qos[:40]!r} is not a QoS name (expected {TOKEN_RE.pattern}; Slurm lowercases them)")
    return ClassPolicy(name, priority, preemptible=bool(t.get("preemptible", bool, "true or false")),
                       may_degrade=bool(t.get("may_degrade", bool, "true or false")),
                       mps_thread_percent=t.integer("mps_thread_percent", 1, 100), qos=qos)


def _config_path(path: str | Path | None, env: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if env.get("GPUARB_CONFIG"):
        return Path(env["GPUARB_CONFIG"])
    default = Path(DEFAULT_CONFIG_PATH)
    return default if default.exists() else None


def _read(path: Path) -> dict[str, Any]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file (see templates/examples/ for a start)") from e
    try:
        st = os.fstat(fd)  # the file we read, not whatever the path names a moment later
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: is not a regular file")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(f"{path}: is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}) but steers "
                              f"hooks that run as root; run chmod go-w {path}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file") from e
    finally:
        os.close(fd)
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: is not UTF-8 text") from e
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise ConfigError(f"{path}: is not valid TOML") from e


def load(path: str | Path | None = None, *, env: Mapping[str, str] | None = None,
         overrides: Mapping[str, object] | None = None) -> Config:
    """Read, validate and resolve the configuration (defaults → file → ``GPUARB_*`` → ``overrides``).

    ``path=None`` means ``$GPUARB_CONFIG``, else :data:`DEFAULT_CONFIG_PATH` when it exists, else
    the embedded defaults alone. A named file that does not exist is an error. ``env`` defaults to
    ``os.environ``. Raises only :class:`ConfigError`.
    """
    environ = os.environ if env is None else env
    file = _config_path(path, environ)
    doc = _read(file) if file is not None else {}
    if file is not None:
        if "version" not in doc:
            raise ConfigError(f"{file}: version: missing; add `version = {CONFIG_VERSION}` as the first line")
        version = doc["version"]
        if type(version) is not int or version != CONFIG_VERSION:
            raise ConfigError(f"{file}: version: this gpuarb reads version {CONFIG_VERSION}, found "
                              f"{_describe(version)}; rewrite the file for version {CONFIG_VERSION} or upgrade gpuarb")
    top = _Table(str(file) if file is not None else "<defaults>", "", doc, _TOP_KEYS)
    values, sources = _settings({name: top.table(name, keys) for name, keys in _TABLE_KEYS.items()},
                                environ, overrides or {})
    policy = _policy(top)
    from .config_inventory import parse_inventory  # imported here: it builds on this module's helpers

    nodes, partitions = parse_inventory(top, tuple(policy.classes))
    if sources["telemetry"] not in ("default", "file"):
        # A backend chosen at run time applies everywhere, as its place in the resolution order says.
        nodes = tuple(replace(n, telemetry=None) for n in nodes)
    from . import config_services as cs  # imported here: it builds on this module's helpers

    reservations = cs.parse_reservations(top, nodes)
    return Config(version=CONFIG_VERSION, path=file, policy=policy, reservations=reservations,
                  services=cs.parse_services(top, reservations),
                  controller=cs.parse_controller(top, policy.classes, partitions, reservations),
                  nodes=nodes, partitions=partitions, sources=sources, **values)
