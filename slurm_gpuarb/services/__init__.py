"""Inference services outside Slurm: probe them over their own HTTP APIs, size their reservations,
and advise where a request for a model should go.

- :func:`probe` asks one service (vLLM, Ollama, TF Serving: :mod:`.backends` documents each API
  and where its shapes come from) and returns a :class:`ServiceStatus`; it never raises for
  anything a backend answers or fails to answer. :func:`probe_all` probes a config's services
  concurrently in bounded time.
- :func:`reservation_size_mib` sizes a standing reservation as max(declared, observed): Ollama
  unloads idle models and loads bigger ones on demand.
- :func:`route` names the backend that should take a request, or answers 503 with Retry-After
  (:mod:`.route` lists the rules).

States: ``up``, ``degraded`` (serves, but worse), ``busy`` (overloaded: send elsewhere for now),
``down``. Standard library only: the controller agent runs this in its loop.
"""

from __future__ import annotations

from .backends import BUSY, DEFAULT_THRESHOLDS, DEGRADED, DOWN, STATES, UP, Thresholds, same_model
from .probing import (
    ServiceStatus,
    probe,
    probe_all,
    probe_reservation,
    probe_services,
    reservation_size_mib,
    service_for,
    status_to_json,
)
from .route import RETRY_AFTER_BUSY_S, RETRY_AFTER_DOWN_S, RouteAdvice, advice_to_json, route

__all__ = [
    "BUSY",
    "DEFAULT_THRESHOLDS",
    "DEGRADED",
    "DOWN",
    "RETRY_AFTER_BUSY_S",
    "RETRY_AFTER_DOWN_S",
    "STATES",
    "UP",
    "RouteAdvice",
    "ServiceStatus",
    "Thresholds",
    "advice_to_json",
    "probe",
    "probe_all",
    "probe_reservation",
    "probe_services",
    "reservation_size_mib",
    "route",
    "same_model",
    "service_for",
    "status_to_json",
]
