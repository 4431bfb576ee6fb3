"""What each inference server's own API says about it, read into :class:`Findings`.

The response shapes, and where they are documented (the test fixtures copy these examples):

- **vLLM** (OpenAI-compatible server, ``vllm serve``): ``GET /health`` answers 200 with an empty body
  while the engine lives and 503 once it died (``vllm/entrypoints/openai/api_server.py``). ``GET
  /metrics`` is Prometheus text (https://docs.vllm.ai/en/stable/usage/metrics/): the gauges
  ``vllm:num_requests_waiting`` and ``vllm:kv_cache_usage_perc`` (V1 engine; before it
  ``vllm:gpu_cache_usage_perc``), "1 means 100 percent", labelled ``model_name=`` (and ``engine=``
  with several engines). ``GET /v1/models`` is OpenAI's list, ``{"object": "list", "data": [{"id":
  NAME, "object": "model", "owned_by": "vllm", "root": …, "max_model_len": …}]}``.
- **Ollama** (https://docs.ollama.com/api-reference/get-version, …/api/ps): ``GET /api/version`` →
  ``{"version": "0.12.6"}``; ``GET /api/ps`` → ``{"models": [{"name", "model", "size", "digest",
  "details", "expires_at", "size_vram", "context_length"}]}``, sizes in bytes. ``size`` is the whole
  model, ``size_vram`` the part in GPU memory: less means the rest runs on the CPU (``ollama ps``
  shows "48%/52% CPU/GPU"). An empty list means nothing is loaded: Ollama unloads idle models after
  ``keep_alive`` (5 minutes by default).
- **TF Serving** REST API, model status (https://www.tensorflow.org/tfx/serving/api_rest#model_status_api):
  ``GET /v1/models/NAME`` → ``{"model_version_status": [{"version": "1", "state": "AVAILABLE",
  "status": {"error_code": "OK", "error_message": ""}}]}``; states UNKNOWN, START, LOADING,
  AVAILABLE, UNLOADING, END. An unknown model is HTTP 404 with ``{"error": …}``.

Each ``probe_*`` raises :class:`~.fetch.ProbeFailure` when the service is *down* (no answer, an
error status, garbage, the wrong shape on the endpoint that says whether it lives) and otherwise
returns what it found; answers that only add detail (vLLM's metrics and model list) are noted in
the reason when they fail.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from ..model import ServiceConfig
from ..units import human_size
from .fetch import MAX_METRICS_BYTES, Client, ProbeFailure, clip, expect_ok, json_body, shape_error

UP: Final = "up"
DEGRADED: Final = "degraded"  # answers and serves, but worse: a model partly on the CPU, a model missing
BUSY: Final = "busy"  # answers, but overloaded: send requests elsewhere for now
DOWN: Final = "down"  # no usable answer: unreachable, timeout, 5xx, garbage, wrong shape
STATES: Final = (UP, DEGRADED, BUSY, DOWN)
WHAT: Final = {"vllm": "a vLLM server", "ollama": "an Ollama server", "tfserving": "a TF Serving REST port"}
_MIB: Final = 1 << 20


@dataclass(frozen=True)
class Thresholds:
    """When a vLLM server counts as *busy* (both are parameters of ``probe``; the defaults are these).

    vLLM batches continuously: a request waits only when the running batch cannot take it (KV cache
    full, or ``--max-num-seqs`` reached). A few waiting during a burst drain within a decode step or
    two, so ``max_waiting`` allows a handful; more means each new request waits for others to
    finish. At ``max_kv_cache_usage`` the engine is about to preempt running requests to make room
    (it recomputes them later), which costs every request latency.
    """

    max_waiting: int = 8
    max_kv_cache_usage: float = 0.95


DEFAULT_THRESHOLDS: Final = Thresholds()


@dataclass(frozen=True)
class Findings:
    """What one probe found; :func:`~.probe.probe` adds the service's identity and the time."""

    state: str
    reason: str
    models: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()  # declared models the backend says it cannot serve now
    observed_vram_mib: int | None = None
    waiting: int | None = None
    kv_cache_usage: float | None = None
    version: str | None = None


def same_model(asked: str, served: str) -> bool:
    """Ollama's ``llama3`` is ``llama3:latest``; otherwise names must be equal."""
    if asked == served:
        return True
    return (":" not in asked and served == f"{asked}:latest") or (":" not in served and asked == f"{served}:latest")


def merge(reported: Iterable[str], declared: Iterable[str]) -> tuple[str, ...]:
    """Reported names first, then declared ones not already there (by :func:`same_model`)."""
    out: list[str] = []
    for name in (*reported, *declared):
        if not any(same_model(name, seen) for seen in out):
            out.append(name)
    return tuple(out)


def _name(value: str) -> str:
    return clip(value, 200)


# --------------------------------------------------------------------------- vLLM

_SAMPLE_RE: Final = re.compile(r"(vllm:[A-Za-z0-9_:]+)(?:\{(.*)\})?[ \t]+(\S+)")
_LABEL_RE: Final = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class VllmMetrics:
    waiting: int | None
    kv_cache_usage: float | None
    models: tuple[str, ...]
    notes: tuple[str, ...]


def parse_vllm_metrics(text: str) -> VllmMetrics:
    """The gauges a router needs from vLLM's Prometheus text; lines it does not know are skipped."""
    waiting: list[float] = []
    kv_new: list[float] = []
    kv_old: list[float] = []
    models: list[str] = []
    notes: list[str] = []
    seen = False
    for line in text.splitlines():
        m = _SAMPLE_RE.match(line)
        if m is None:
            continue
        seen = True
        name, labels, raw = m.groups()
        for key, value in _LABEL_RE.findall(labels or ""):
            if key == "model_name" and value not in models:
                models.append(_name(value))
        target = {"vllm:num_requests_waiting": waiting, "vllm:kv_cache_usage_perc": kv_new,
                  "vllm:gpu_cache_usage_perc": kv_old}.get(name)
        if target is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            notes.append(f"{name} is {clip(raw, 20)!r}, not a number")
            continue
        if not math.isfinite(value) or value < 0 or (target is not waiting and value > 1):
            notes.append(f"{name} is {value:g}, which is implausible")
            continue
        target.append(value)
    if not seen:
        notes.append("GET /metrics has no vllm: metrics")
    kv = kv_new or kv_old
    # Several engines (data parallel) each report their own gauges: the queue is their sum, and the
    # fullest KV cache decides whether one more request fits.
    return VllmMetrics(int(sum(waiting)) if waiting else None, max(kv) if kv else None, tuple(models), tuple(notes))


def _vllm_models(body: Any) -> tuple[str, ...]:
    what = WHAT["vllm"]
    if not isinstance(body, dict):
        raise shape_error("/v1/models", "the answer", 'an object with "data"', body, what)
    data = body.get("data")
    if not isinstance(data, list):
        raise shape_error("/v1/models", "data", "a list", data, what)
    out = []
    for i, item in enumerate(data):
        ident = item.get("id") if isinstance(item, dict) else item
        if not isinstance(ident, str):
            raise shape_error("/v1/models", f"data[{i}].id", "a string", ident, what)
        out.append(_name(ident))
    return tuple(out)


def probe_vllm(client: Client, svc: ServiceConfig, th: Thresholds) -> Findings:
    expect_ok(client.get("/health"), WHAT["vllm"])
    notes: list[str] = []
    metrics = VllmMetrics(None, None, (), ())
    try:
        answer = client.get("/metrics", MAX_METRICS_BYTES)
        expect_ok(answer, WHAT["vllm"])
        metrics = parse_vllm_metrics(answer.body.decode("utf-8", "replace"))
        notes += metrics.notes
    except ProbeFailure as e:
        notes.append(f"load unknown: {e}")
    served: tuple[str, ...] | None = None
    try:
        served = _vllm_models(json_body(client.get("/v1/models"), WHAT["vllm"]))
    except ProbeFailure as e:
        notes.append(f"models unknown: {e}")
    reported = served if served is not None else metrics.models
    want = svc.probe.model
    missing = (want,) if want and served is not None and not any(same_model(want, s) for s in served) else ()
    load = []
    if metrics.waiting is not None:
        load.append(f"{metrics.waiting} waiting")
    if metrics.kv_cache_usage is not None:
        load.append(f"KV cache {metrics.kv_cache_usage:.0%} full")
    busy = []
    if metrics.waiting is not None and metrics.waiting > th.max_waiting:
        busy.append(f"{metrics.waiting} requests waiting (busy above {th.max_waiting})")
    if metrics.kv_cache_usage is not None and metrics.kv_cache_usage >= th.max_kv_cache_usage:
        busy.append(f"KV cache {metrics.kv_cache_usage:.0%} full (busy from {th.max_kv_cache_usage:.0%})")
    if busy:
        state, head = BUSY, "overloaded: " + ", ".join(busy)
    elif missing:
        state, head = DEGRADED, f"healthy, but does not serve {want!r} (serves: {', '.join(served or ()) or 'none'})"
    else:
        state, head = UP, "healthy" + (f" ({', '.join(load)})" if load else "")
    declared = [m for m in svc.models if m not in missing]
    return Findings(state, "; ".join([head, *notes]), merge(reported, declared), missing,
                    waiting=metrics.waiting, kv_cache_usage=metrics.kv_cache_usage)


# --------------------------------------------------------------------------- Ollama


def _byte_count(entry: dict[str, Any], key: str, where: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise shape_error("/api/ps", f"{where}.{key}", "a byte count", value, WHAT["ollama"])
    return value


def probe_ollama(client: Client, svc: ServiceConfig, th: Thresholds) -> Findings:
    what = WHAT["ollama"]
    version = json_body(client.get("/api/version"), what)
    if not isinstance(version, dict) or not isinstance(version.get("version"), str):
        raise shape_error("/api/version", "the answer", 'an object with a "version" string', version, what)
    ps = json_body(client.get("/api/ps"), what)
    if not isinstance(ps, dict) or "models" not in ps:
        raise shape_error("/api/ps", "the answer", 'an object with "models"', ps, what)
    entries = ps["models"] if ps["models"] is not None else []  # Go marshals an empty nil slice as null
    if not isinstance(entries, list):
        raise shape_error("/api/ps", "models", "a list", entries, what)
    loaded: list[tuple[str, int, int]] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise shape_error("/api/ps", f"models[{i}]", "an object", entry, what)
        name = entry.get("name", entry.get("model"))
        if not isinstance(name, str):
            raise shape_error("/api/ps", f"models[{i}].name", "a string", name, what)
        loaded.append((_name(name), _byte_count(entry, "size", f"models[{i}]"),
                       _byte_count(entry, "size_vram", f"models[{i}]")))
    ver = clip(version["version"], 40)
    vram_bytes = sum(v for _, _, v in loaded)
    observed = -(-vram_bytes // _MIB)
    names = [n for n, _, _ in loaded]
    if not loaded:
        return Findings(UP, "idle: no model loaded (Ollama unloads idle models; the next request loads one)",
                        merge((), svc.models), observed_vram_mib=0, version=ver)
    partial = [(n, size, v) for n, size, v in loaded if v < size]
    count = f"{len(loaded)} model{'s' if len(loaded) != 1 else ''} loaded, {human_size(observed)} in VRAM"
    if partial:
        parts = [f"{n} is {v * 100 // size}% in VRAM, the rest on the CPU" for n, size, v in partial]
        return Findings(DEGRADED, "; ".join(parts) + f" (slow replies); {count}", merge(names, svc.models),
                        observed_vram_mib=observed, version=ver)
    return Findings(UP, count, merge(names, svc.models), observed_vram_mib=observed, version=ver)


# --------------------------------------------------------------------------- TF Serving


def _tf_states(body: Any, path: str) -> tuple[list[str], list[str]]:
    """(version states, error messages) of one model-status answer."""
    what = WHAT["tfserving"]
    if not isinstance(body, dict):
        raise shape_error(path, "the answer", 'an object with "model_version_status"', body, what)
    versions = body.get("model_version_status")
    if not isinstance(versions, list):
        raise shape_error(path, "model_version_status", "a list", versions, what)
    states, errors = [], []
    for i, v in enumerate(versions):
        state = v.get("state") if isinstance(v, dict) else v
        if not isinstance(state, str):
            raise shape_error(path, f"model_version_status[{i}].state", "a string", state, what)
        states.append(clip(state, 20))
        status = v.get("status") if isinstance(v, dict) else None
        message = status.get("error_message") if isinstance(status, dict) else None
        if isinstance(message, str) and message:
            errors.append(clip(message, 60))
    return states, errors


def _tf_error(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        doc = None
    message = doc.get("error") if isinstance(doc, dict) else None
    return clip(message, 60) if isinstance(message, str) else "not found"


def probe_tfserving(client: Client, svc: ServiceConfig, th: Thresholds) -> Findings:
    names: list[str] = list(dict.fromkeys(n for n in (svc.probe.model, *svc.models) if n))
    if not names:
        raise ProbeFailure('no model to ask about: a tfserving service needs models = ["NAME"] (or probe model)')
    available: list[str] = []
    problems: list[str] = []
    for name in names:
        path = f"/v1/models/{quote(name, safe='')}"
        answer = client.get(path)
        if answer.status == 404:
            problems.append(f"{name}: {_tf_error(answer.body)} (HTTP 404)")
            continue
        states, errors = _tf_states(json_body(answer, WHAT["tfserving"]), path)
        if "AVAILABLE" in states:
            available.append(name)
        else:
            problems.append(f"{name}: {'/'.join(states) or 'no version'}" + (f" ({errors[0]})" if errors else ""))
    missing = tuple(n for n in names if n not in available)
    if not available:
        return Findings(DOWN, "answers, but no model is AVAILABLE: " + "; ".join(problems), (), missing)
    head = f"{len(available)} of {len(names)} models AVAILABLE ({', '.join(available)})"
    if missing:
        return Findings(DEGRADED, f"{head}; " + "; ".join(problems), tuple(available), missing)
    return Findings(UP, head, tuple(available))


PROBES: Final = {"vllm": probe_vllm, "ollama": probe_ollama, "tfserving": probe_tfserving}
