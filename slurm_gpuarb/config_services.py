"""The config's tables about tenants outside Slurm: ``[[reservations]]``, ``[[services]]``, ``[controller]``.

Split from :mod:`.config` (which calls these from ``load()`` and documents every key): standing
reservations, the inference services that ``gpuarb services`` probes and ``gpuarb route`` sends to,
and the controller agent that runs the reservations' holder jobs. The same strictness applies:
unknown keys are refused with a did-you-mean, and every error names the file, the key path, what was
expected, what was found and the fix.

Like :mod:`.config`, this module is on the hooks' path (the in-process fallback loads the config),
so it imports only the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final
from urllib.parse import urlsplit

from .config import (
    COMM_MAX_CHARS,
    MAX_GPU_INDEX,
    NAME_RE,
    NodeConfig,
    PartitionConfig,
    _parse_duration,
    _parse_node,
    _parse_path,
    _Table,
)
from .errors import ConfigError
from .model import ClassPolicy, ControllerConfig, Matcher, Probe, Reservation, ServiceConfig

__all__ = ["PROBE_KINDS", "parse_controller", "parse_probe_url", "parse_reservations", "parse_services",
           "parse_timeout", "reservation_service"]

RESERVATION_MODES: Final = ("static", "holder")
PROBE_KINDS: Final = ("vllm", "ollama", "tfserving")
MIN_TIMEOUT_S: Final = 0.05
MAX_TIMEOUT_S: Final = 60.0
DEFAULT_TIMEOUT_S: Final = 2.0

_RESERVATION_KEYS: Final = ("name", "size", "gpu", "node", "mode", "match", "probe", "grace")
_MATCH_KEYS: Final = ("process", "user", "pidfile")
_PROBE_KEYS: Final = ("kind", "url", "model", "timeout")
_SERVICE_KEYS: Final = ("name", "kind", "url", "models", "timeout")
_CONTROLLER_KEYS: Final = ("interval", "holder_partition", "holder_class", "shrink", "holder_time_limit")

# Model names as the backends spell them: Ollama "llama3:8b" or "hf.co/org/repo:Q4_K_M", vLLM's
# served name "meta-llama/Llama-3.1-8B-Instruct", TF Serving's "half_plus_two".
MODEL_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}", re.ASCII)
_MS_RE: Final = re.compile(r"([0-9]{1,6})ms", re.ASCII)
# sbatch(1) --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; UNLIMITED/INFINITE for none.
_SLURM_TIME_RE: Final = re.compile(
    r"UNLIMITED|INFINITE|[0-9]{1,7}(?::[0-9]{2}){0,2}|[0-9]{1,4}-[0-9]{1,2}(?::[0-9]{2}){0,2}", re.ASCII)
_KIND_ALIASES: Final = {"tf": "tfserving", "tf-serving": "tfserving", "tf_serving": "tfserving",
                        "tensorflow": "tfserving", "tensorflow-serving": "tfserving"}


# --------------------------------------------------------------------------- values


def parse_timeout(text: str, where: str) -> float:
    """``"2s"``, ``"500ms"`` → seconds, between 50 ms and 60 s (a probe runs inside the controller's loop)."""
    m = _MS_RE.fullmatch(text)
    seconds = int(m.group(1)) / 1000 if m is not None else float(_parse_duration(text, where))
    if not MIN_TIMEOUT_S <= seconds <= MAX_TIMEOUT_S:
        raise ConfigError(f"{where}: expected a timeout from 50ms to 60s, found {text[:40]!r}")
    return seconds


def parse_probe_url(text: str, where: str) -> str:
    """``http://HOST:PORT`` (or https), normalised without a trailing slash. No path: each backend kind
    knows its own endpoints. No credentials: the config file is world-readable."""
    expected = "expected http://HOST:PORT, e.g. http://127.0.0.1:11434"
    if "@" in text:  # before anything echoes the text: it may carry a password
        raise ConfigError(f"{where}: the probe URL carries credentials (user@), but the config file is "
                          "world-readable; remove them (probes use no authentication)")
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a port out of range or not a number
    except ValueError as e:
        raise ConfigError(f"{where}: {expected}; found {text[:60]!r}") from e
    if parts.scheme not in ("http", "https") or not parts.hostname or port == 0:
        raise ConfigError(f"{where}: {expected}; found {text[:60]!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{where}: expected http://HOST:PORT with no path, found {text[:60]!r} (gpuarb adds "
                          "each backend's endpoints itself: /health, /api/ps, /v1/models/NAME, …)")
    return f"{parts.scheme}://{parts.netloc}"


def _kind(t: _Table, key: str) -> str:
    kind = t.need(key, str, "one of " + ", ".join(PROBE_KINDS))
    if kind in PROBE_KINDS:
        return kind
    import difflib  # only on the error path

    close = _KIND_ALIASES.get(kind.lower()) or next(iter(difflib.get_close_matches(kind, PROBE_KINDS, n=1)), None)
    hint = f"; did you mean '{close}'?" if close else ""
    raise t.error(key, f"expected one of {', '.join(PROBE_KINDS)}, found {kind[:40]!r}{hint}")


def _model(t: _Table, key: str, value: str) -> str:
    if MODEL_RE.fullmatch(value) is None:
        raise t.error(key, f"{value[:40]!r} is not a model name such as llama3:8b or meta-llama/Llama-3.1-8B "
                           f"(expected {MODEL_RE.pattern})")
    return value


def _timeout(t: _Table) -> float:
    text = t.get("timeout", str, 'a timeout string such as "2s" or "500ms"')
    return DEFAULT_TIMEOUT_S if text is None else parse_timeout(text, t.where("timeout"))


def _probe(t: _Table) -> Probe | None:
    """A reservation's ``probe = { kind, url, model, timeout }``, or ``None`` when it has none."""
    if "probe" not in t.data:
        return None
    p = t.table("probe", _PROBE_KEYS)
    kind = _kind(p, "kind")
    url = parse_probe_url(p.need("url", str, 'a URL such as "http://127.0.0.1:11434"'), p.where("url"))
    model = p.get("model", str, "a model name")
    if model is not None:
        _model(p, "model", model)
    elif kind == "tfserving":
        raise p.error("model", 'missing; a tfserving probe asks GET /v1/models/NAME: add model = "NAME"')
    return Probe(kind, url, model, _timeout(p))


# --------------------------------------------------------------------------- [[reservations]]


def parse_reservations(top: _Table, nodes: Sequence[NodeConfig]) -> tuple[Reservation, ...]:
    """``[[reservations]]``: standing VRAM for tenants outside the lease protocol, with their probes."""
    out: list[Reservation] = []
    for t in top.tables("reservations", _RESERVATION_KEYS):
        name = t.name("name", NAME_RE, "a reservation name")
        if any(r.name == name for r in out):
            raise t.error("name", f"reservation {name!r} is declared twice")
        size = t.size("size")
        if size is None:
            raise t.error("size", 'missing; add size = "12GiB" (what the tenant needs at most)')
        gpu = t.integer("gpu", 0, MAX_GPU_INDEX) or 0
        node = t.get("node", str, "a node name")
        if node is not None:
            _parse_node(node, t.where("node"))
        if nodes:
            holders = [n for n in nodes if node in (None, n.name)]
            if node is not None and not holders:
                raise t.error("node", f"node {node!r} is not declared; add a [[nodes]] entry or fix the name")
            if not any(g.index == gpu for n in holders for g in n.gpus):
                owner = "no declared node has" if node is None else f"node {node!r} has no"
                raise t.error("gpu", f"{owner} GPU with index {gpu}")
        matcher = _matcher(t)
        mode = t.choice("mode", RESERVATION_MODES, "static")
        probe = _probe(t)
        if mode == "holder" and probe is None:
            raise t.error("probe", "missing; a holder reservation needs a probe (the controller cancels its holder "
                                   "job while the service is down): add probe = { kind = \"ollama\", "
                                   "url = \"http://127.0.0.1:11434\" }")
        grace = t.duration("grace")
        if grace is not None and mode != "holder":
            raise t.error("grace", 'only a holder reservation has a grace period (this one is static); remove grace '
                                   'or set mode = "holder"')
        out.append(Reservation(name, size, gpu, node, matcher, mode, probe,
                               float(grace) if grace is not None else Reservation.grace_s))
    return tuple(out)


def _matcher(t: _Table) -> Matcher:
    m = t.table("match", _MATCH_KEYS)
    matcher = Matcher(m.get("process", str, "a process name"), m.get("user", str, "a user name"),
                      m.get("pidfile", str, "an absolute path"))
    if matcher == Matcher():
        raise t.error("match", 'missing; add match = { process = "ollama" } (or user, pidfile)')
    if matcher.process is not None and not 0 < len(matcher.process) <= COMM_MAX_CHARS:
        raise m.error("process", f"expected 1 to {COMM_MAX_CHARS} characters: the kernel truncates "
                                 "process names (/proc/PID/comm) to 15")
    if matcher.pidfile is not None:
        _parse_path(matcher.pidfile, m.where("pidfile"))
    return matcher


# --------------------------------------------------------------------------- [[services]]


def reservation_service(res: Reservation) -> ServiceConfig | None:
    """The service a probed reservation is (its name, its probe, the probe's model), else ``None``."""
    if res.probe is None:
        return None
    return ServiceConfig(res.name, res.probe, (res.probe.model,) if res.probe.model else (), reservation=res.name)


def parse_services(top: _Table, reservations: Sequence[Reservation]) -> tuple[ServiceConfig, ...]:
    """Every probed reservation as a service (first, in file order), then ``[[services]]``."""
    out = [svc for svc in map(reservation_service, reservations) if svc is not None]
    for t in top.tables("services", _SERVICE_KEYS):
        name = t.name("name", NAME_RE, "a service name")
        if any(r.name == name for r in reservations):
            raise t.error("name", f"{name!r} is a reservation's name too; give that reservation a probe instead "
                                  "(probe = { kind = …, url = … }) or rename this service")
        if any(s.name == name for s in out):
            raise t.error("name", f"service {name!r} is declared twice")
        kind = _kind(t, "kind")
        url = parse_probe_url(t.need("url", str, 'a URL such as "http://127.0.0.1:8000"'), t.where("url"))
        models = t.strings("models", "model name") or []
        for i, model in enumerate(models):
            _model(t, f"models[{i}]", model)
            if model in models[:i]:
                raise t.error(f"models[{i}]", f"model {model!r} is listed twice")
        if kind == "tfserving" and not models:
            raise t.error("models", 'missing; a tfserving service is asked GET /v1/models/NAME for each of its '
                                    'models: add models = ["NAME"]')
        probe = Probe(kind, url, models[0] if kind == "tfserving" else None, _timeout(t))
        out.append(ServiceConfig(name, probe, tuple(models)))
    return tuple(out)


# --------------------------------------------------------------------------- [controller]


def parse_controller(top: _Table, classes: Mapping[str, ClassPolicy], partitions: Sequence[PartitionConfig],
                     reservations: Sequence[Reservation]) -> ControllerConfig:
    """``[controller]``: the controller agent's loop and its holder jobs."""
    t = top.table("controller", _CONTROLLER_KEYS)
    interval = t.duration("interval")
    holder_class = t.get("holder_class", str, "a class name")
    if holder_class is not None:
        if holder_class not in classes:
            raise t.error("holder_class", f"{holder_class[:40]!r} is not a declared class "
                                          f"(declared: {', '.join(classes)})")
        if classes[holder_class].preemptible:
            raise t.error("holder_class", f"class {holder_class!r} is preemptible, so Slurm could requeue the holder "
                                          "job and hand the service's memory to another job; name a class with "
                                          "preemptible = false")
    elif any(r.mode == "holder" for r in reservations) and all(c.preemptible for c in classes.values()):
        raise t.error("holder_class", "missing; holder reservations need a non-preemptible class for their holder "
                                      "jobs and every declared class is preemptible: declare one (e.g. "
                                      "[classes.llm] priority = 1000) or set holder_class")
    partition = t.get("holder_partition", str, "a partition name")
    if partition is not None:
        if NAME_RE.fullmatch(partition) is None:
            raise t.error("holder_partition", f"{partition[:40]!r} is not a partition name "
                                              f"(expected {NAME_RE.pattern})")
        declared = {p.name: p for p in partitions}
        if partitions and partition not in declared:
            raise t.error("holder_partition", f"partition {partition!r} is not declared (declared: "
                                              f"{', '.join(declared)}); add a [[partitions]] entry or fix the name")
        if holder_class is not None and partition in declared and holder_class not in declared[partition].classes:
            raise t.error("holder_partition", f"partition {partition!r} does not admit class {holder_class!r}; "
                                              "add it to the partition's classes or pick another partition")
    limit = t.get("holder_time_limit", str, 'a Slurm time limit such as "UNLIMITED" or "7-00:00:00"')
    if limit is not None and _SLURM_TIME_RE.fullmatch(limit) is None:
        raise t.error("holder_time_limit", f"{limit[:40]!r} is not a Slurm time limit (expected UNLIMITED, "
                                           "minutes, HH:MM:SS or D-HH:MM:SS as sbatch --time takes)")
    shrink = t.get("shrink", bool, "true or false")
    return ControllerConfig(interval_s=float(interval) if interval is not None else ControllerConfig.interval_s,
                            holder_partition=partition, holder_class=holder_class,
                            shrink=ControllerConfig.shrink if shrink is None else shrink,
                            holder_time_limit=limit or ControllerConfig.holder_time_limit)
