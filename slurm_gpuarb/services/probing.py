"""Probing inference services: one :class:`ServiceStatus` per service, concurrently, in bounded time."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ..config import Config
from ..config_services import reservation_service
from ..model import Reservation, ServiceConfig
from .backends import DEFAULT_THRESHOLDS, DOWN, PROBES, Thresholds, merge
from .fetch import Client, ProbeFailure, clip

MAX_WORKERS: Final = 16
_SLACK_S: Final = 1.0  # beyond the probes' own deadlines, for a server that trickles its headers


@dataclass(frozen=True)
class ServiceStatus:
    """What a probe found about one service at ``checked_at`` (``time.time()``).

    ``state`` is ``up`` (answers, healthy, not overloaded), ``degraded`` (serves, but worse: an
    Ollama model partly on the CPU, a TF Serving model not AVAILABLE, a vLLM without its declared
    model), ``busy`` (overloaded: vLLM's queue or KV cache over :class:`Thresholds`, or HTTP 429) or
    ``down`` (no usable answer). ``reason`` says why in one line. ``models`` are the names it serves:
    those the backend reports, then those the config declares (for a down service, the declared
    ones); ``missing`` are declared models it says it cannot serve now. Fields a backend does not
    report stay ``None``: only Ollama reports VRAM, only vLLM its queue and KV cache.
    """

    name: str
    kind: str
    url: str
    state: str
    reason: str
    models: tuple[str, ...] = ()
    observed_vram_mib: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    reservation: str | None = None
    checked_at: float = 0.0
    version: str | None = None
    missing: tuple[str, ...] = ()

    @property
    def usable(self) -> bool:
        """Whether a request may be sent here now (``up`` or ``degraded``)."""
        return self.state in ("up", "degraded")


def probe(svc: ServiceConfig, *, timeout: float | None = None, thresholds: Thresholds = DEFAULT_THRESHOLDS,
          clock: Callable[[], float] = time.time) -> ServiceStatus:
    """Ask one service's own API how it is. Never raises for anything the backend answers or fails to
    answer (refused, timeout, 5xx, garbage, wrong shapes): those are a ``down`` status with a reason.

    ``timeout`` (seconds) replaces the probe's own ``timeout_s`` as the budget of the whole probe.
    """
    p = svc.probe
    client = Client(p.url, p.timeout_s if timeout is None else timeout)

    def status(state: str, reason: str, **found: Any) -> ServiceStatus:
        return ServiceStatus(svc.name, p.kind, p.url, state, reason, reservation=svc.reservation,
                             checked_at=clock(), **found)

    run = PROBES.get(p.kind)
    if run is None:
        return status(DOWN, f"unknown probe kind {p.kind!r} (expected one of {', '.join(PROBES)})",
                      models=merge((), svc.models))
    try:
        f = run(client, svc, thresholds)
    except ProbeFailure as e:
        return status(e.state, str(e), models=merge((), svc.models))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        # Untrusted input reached a parser in a way its checks did not foresee: still a status line.
        return status(DOWN, f"could not read the answer ({type(e).__name__}: {clip(str(e), 60)})",
                      models=merge((), svc.models))
    return status(f.state, f.reason, models=f.models, observed_vram_mib=f.observed_vram_mib, waiting=f.waiting,
                  kv_cache_usage=f.kv_cache_usage, version=f.version, missing=f.missing)


def probe_services(services: Sequence[ServiceConfig], *, timeout: float | None = None,
                   thresholds: Thresholds = DEFAULT_THRESHOLDS, max_workers: int = MAX_WORKERS,
                   clock: Callable[[], float] = time.time) -> list[ServiceStatus]:
    """Probe every service concurrently (at most ``max_workers`` at once); results in input order.

    The whole call is bounded: the rounds of probes times the longest probe budget, plus a second.
    A probe still running then (a server trickling its headers byte by byte) is reported ``down``
    and left to finish on its daemon thread.
    """
    n = len(services)
    if n == 0:
        return []
    results: list[ServiceStatus | None] = [None] * n
    lock = threading.Lock()
    pending = list(range(n - 1, -1, -1))
    finished = threading.Event()
    left = [n]

    def work() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i = pending.pop()
            try:
                result = probe(services[i], timeout=timeout, thresholds=thresholds, clock=clock)
            except Exception as e:  # a bug, not the backend: still one line, the others still reported
                result = _down(services[i], f"the probe failed unexpectedly ({type(e).__name__}: {clip(str(e))}); "
                                            "please report this", clock)
            with lock:
                results[i] = result
                left[0] -= 1
                if left[0] == 0:
                    finished.set()

    workers = max(1, min(n, max_workers))
    for _ in range(workers):
        threading.Thread(target=work, name="gpuarb-probe", daemon=True).start()
    longest = max(s.probe.timeout_s if timeout is None else timeout for s in services)
    budget = math.ceil(n / workers) * longest + _SLACK_S
    finished.wait(budget)
    with lock:
        return [r if r is not None else _down(services[i], f"the probe did not finish within {budget:g}s", clock)
                for i, r in enumerate(results)]


def probe_all(cfg: Config, *, timeout: float | None = None, thresholds: Thresholds = DEFAULT_THRESHOLDS,
              max_workers: int = MAX_WORKERS) -> list[ServiceStatus]:
    """Probe every service of the config (probed reservations, then ``[[services]]``), concurrently."""
    return probe_services(cfg.services, timeout=timeout, thresholds=thresholds, max_workers=max_workers)


def _down(svc: ServiceConfig, reason: str, clock: Callable[[], float]) -> ServiceStatus:
    return ServiceStatus(svc.name, svc.probe.kind, svc.probe.url, DOWN, reason, merge((), svc.models),
                         reservation=svc.reservation, checked_at=clock())


def service_for(cfg: Config, name: str) -> ServiceConfig | None:
    """The service called ``name`` (a probed reservation's name, or a ``[[services]]`` entry)."""
    return next((s for s in cfg.services if s.name == name), None)


def probe_reservation(res: Reservation, *, timeout: float | None = None) -> ServiceStatus | None:
    """Probe a reservation's service; ``None`` when it has no probe. This is the controller's default
    ``probe_fn`` (``Callable[[Reservation], ServiceStatus | None]``)."""
    svc = reservation_service(res)
    return None if svc is None else probe(svc, timeout=timeout)


def reservation_size_mib(res: Reservation, status: ServiceStatus | None) -> int:
    """What a reservation holds: max(declared ``size``, the VRAM its service reports using).

    Ollama unloads idle models (then reports 0) and loads bigger ones on demand: the declared size is
    the floor, an observation above it wins. ``status`` must be this reservation's (or ``None``).
    """
    if status is not None and status.reservation not in (None, res.name):
        raise ValueError(f"status of {status.name!r} is for reservation {status.reservation!r}, not {res.name!r}")
    return res.held_mib(status.observed_vram_mib if status is not None else None)


def status_to_json(status: ServiceStatus, reservation: Reservation | None = None) -> dict[str, Any]:
    """The stable JSON form: every key always present, ``null`` where unknown.

    With the service's ``reservation``: its ``gpu``, ``node``, ``declared_mib`` and ``reserved_mib``
    (= :func:`reservation_size_mib`); without one, those are ``null``.
    """
    res = reservation if reservation is not None and reservation.name == status.reservation else None
    return {
        "name": status.name, "kind": status.kind, "url": status.url, "state": status.state,
        "reason": status.reason, "models": list(status.models), "missing": list(status.missing),
        "observed_vram_mib": status.observed_vram_mib, "waiting": status.waiting,
        "kv_cache_usage": status.kv_cache_usage, "version": status.version,
        "reservation": status.reservation, "gpu": res.gpu if res else None, "node": res.node if res else None,
        "declared_mib": res.size_mib if res else None,
        "reserved_mib": reservation_size_mib(res, status) if res else None,
        "checked_at": status.checked_at,
    }
