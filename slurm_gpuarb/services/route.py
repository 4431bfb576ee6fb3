"""Load-shed advice: which backend should take a request for a model, or 503 with Retry-After.

The rules, in order:

1. Candidates are the services that serve the model (:func:`~.backends.same_model`: Ollama's
   ``llama3`` is ``llama3:latest``), by the names the backends report and those the config
   declares. A vLLM and an Ollama that declare one common name stand in for each other.
2. Only ``up`` and ``degraded`` candidates may take a request; ``busy`` and ``down`` ones are skipped.
   ``degraded`` (an Ollama model partly on the CPU, a TF Serving with a model not loaded) still
   serves, only worse, so it is used when nothing ``up`` serves the model, never before.
3. Among equals, vLLM before Ollama before TF Serving: vLLM batches continuously, so one more request
   joins the running batch at little cost; Ollama runs ``OLLAMA_NUM_PARALLEL`` requests per model at
   once and queues the rest; TF Serving is a general model server, the least likely to be tuned for
   LLM traffic. Then the shorter queue, the emptier KV cache, and the name, so the answer is stable.
4. When candidates exist but none is usable: HTTP 503 with ``Retry-After`` — 5 s when one is only
   busy (a vLLM queue drains in seconds), 30 s when all are down (a restart takes longer, and the
   controller's grace period is minutes).
5. A model no service serves: 404, naming the models that are known. If a service is down and
   declared no models, it might serve the model: 503 instead, because the answer may change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from .backends import DEGRADED, DOWN, UP, merge, same_model
from .fetch import clip
from .probing import ServiceStatus

KIND_ORDER: Final = ("vllm", "ollama", "tfserving")
RETRY_AFTER_BUSY_S: Final = 5
RETRY_AFTER_DOWN_S: Final = 30
OK: Final = 200
NOT_FOUND: Final = 404
UNAVAILABLE: Final = 503


@dataclass(frozen=True)
class RouteAdvice:
    """Where to send a request for ``model``: ``backend``/``url`` with ``http_status`` 200, or none
    with 503 (retry after ``retry_after_s``) or 404 (no service serves that model). ``fallbacks`` are
    the other usable backends, best first, for a client that wants a second choice."""

    model: str
    backend: str | None
    url: str | None
    http_status: int
    retry_after_s: int | None
    reason: str
    kind: str | None = None
    fallbacks: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.http_status == OK


def _serves(status: ServiceStatus, model: str) -> bool:
    return any(same_model(model, m) for m in status.models)


def _lacks(status: ServiceStatus, model: str) -> bool:
    return any(same_model(model, m) for m in status.missing)


def route(model: str, statuses: Sequence[ServiceStatus], *, prefer: Sequence[str] = KIND_ORDER,
          retry_after_busy_s: int = RETRY_AFTER_BUSY_S, retry_after_down_s: int = RETRY_AFTER_DOWN_S) -> RouteAdvice:
    """Pick the backend that should take a request for ``model`` (see the module's rules)."""
    candidates = [s for s in statuses if _serves(s, model) or _lacks(s, model)]
    if not candidates:
        return _unknown(model, statuses, retry_after_down_s)

    def rank(s: ServiceStatus) -> tuple[int, int, int, float, str]:
        kind = prefer.index(s.kind) if s.kind in prefer else len(prefer)
        return (0 if s.state == UP else 1, kind, s.waiting or 0, s.kv_cache_usage or 0.0, s.name)

    usable = sorted((s for s in candidates if s.usable and _serves(s, model)), key=rank)
    skipped = [s for s in candidates if s not in usable]
    if usable:
        best = usable[0]
        reason = f"{best.name} ({best.kind}) is {best.state} and serves {model}"
        if best.state == DEGRADED:
            reason += f", but {clip(best.reason, 100)}"
        if skipped:
            reason += "; skipped " + ", ".join(_why(s, model) for s in skipped)
        return RouteAdvice(model, best.name, best.url, OK, None, reason, best.kind, tuple(s.name for s in usable[1:]))
    busy = any(s.state == "busy" and _serves(s, model) for s in candidates)
    retry = retry_after_busy_s if busy else retry_after_down_s
    reason = f"no backend for {model} can take a request now: " + ", ".join(_why(s, model) for s in candidates)
    return RouteAdvice(model, None, None, UNAVAILABLE, retry, reason)


def _why(s: ServiceStatus, model: str) -> str:
    if _lacks(s, model) and not _serves(s, model):
        return f"{s.name} cannot serve it now ({clip(s.reason, 80)})"
    return f"{s.name} {s.state} ({clip(s.reason, 80)})"


def _unknown(model: str, statuses: Sequence[ServiceStatus], retry_after_down_s: int) -> RouteAdvice:
    if not statuses:
        return RouteAdvice(model, None, None, NOT_FOUND, None, "no services are declared; add [[services]] or a "
                           "probe to a [[reservations]] entry in the config")
    opaque = [s.name for s in statuses if s.state == DOWN and not s.models]
    if opaque:
        return RouteAdvice(model, None, None, UNAVAILABLE, retry_after_down_s,
                           f"no reachable backend serves {model}, and {', '.join(opaque)} "
                           f"{'is' if len(opaque) == 1 else 'are'} down with no declared models, so "
                           f"{'it' if len(opaque) == 1 else 'one of them'} might")
    known = merge((m for s in statuses for m in (*s.models, *s.missing)), ())
    listed = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
    return RouteAdvice(model, None, None, NOT_FOUND, None,
                       f"no service serves model {model!r} (known models: {listed or 'none'})")


def advice_to_json(advice: RouteAdvice) -> dict[str, Any]:
    """The stable JSON form: every key always present, ``null`` where there is no value."""
    return {"model": advice.model, "backend": advice.backend, "kind": advice.kind, "url": advice.url,
            "http_status": advice.http_status, "retry_after_s": advice.retry_after_s, "reason": advice.reason,
            "fallbacks": list(advice.fallbacks)}
