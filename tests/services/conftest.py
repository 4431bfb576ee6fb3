"""Loopback stand-ins for vLLM, Ollama and TF Serving, answering their documented shapes, and the ways
real servers fail: slow answers, 500s, garbage, wrong shapes, huge bodies, closed ports, non-HTTP.

Every server listens on 127.0.0.1, port 0 (an ephemeral port), serves from a thread, and is shut
down by the fixture, even when the test fails; a handler told to be slow waits on the server's stop
event, so shutting down never waits for it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from slurm_gpuarb.model import Probe, ServiceConfig

GIB = 1 << 30
TIMEOUT = 0.2  # each probe's deadline in these tests; a slow handler waits SLOW_S, well past it
SLOW_S = 2.0

# --------------------------------------------------------------------------- documented answers

# vLLM /metrics, Prometheus text as https://docs.vllm.ai/en/stable/usage/metrics/ shows it (V1 engine:
# kv_cache_usage_perc, and an engine label), trimmed to a few families.
VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} {waiting}
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} {kv}
# HELP vllm:iteration_tokens_total Histogram of number of tokens per engine_step.
# TYPE vllm:iteration_tokens_total histogram
vllm:iteration_tokens_total_bucket{le="1.0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 3.0
vllm:iteration_tokens_total_sum{model_name="meta-llama/Llama-3.1-8B-Instruct"} 0.0
# HELP python_gc_objects_collected_total Objects collected during gc
python_gc_objects_collected_total{generation="0"} 12345.0
"""

# vLLM before the V1 engine (docs.vllm.ai/en/v0.5.0/serving/metrics.html): gpu_cache_usage_perc.
VLLM_METRICS_V0 = """\
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="mistral-7b"} 1.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="mistral-7b"} 0.5
"""

# vLLM GET /v1/models: OpenAI's model list, with vLLM's own extra fields.
VLLM_MODELS = {"object": "list", "data": [
    {"id": "meta-llama/Llama-3.1-8B-Instruct", "object": "model", "created": 1718000000, "owned_by": "vllm",
     "root": "meta-llama/Llama-3.1-8B-Instruct", "parent": None, "max_model_len": 8192, "permission": []}]}

# Ollama GET /api/version and /api/ps (https://docs.ollama.com/api-reference/get-version, /api/ps).
OLLAMA_VERSION = {"version": "0.12.6"}


def ollama_model(name: str, size: int, size_vram: int) -> dict[str, Any]:
    return {"name": name, "model": name, "size": size,
            "digest": "a2af6cc3eb7fa8be8504abaf9b04e88f17a119ec3f04a3addf55f92841195f5a",
            "details": {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                        "parameter_size": "8.0B", "quantization_level": "Q4_K_M"},
            "expires_at": "2025-10-17T16:47:07.93355-07:00", "size_vram": size_vram, "context_length": 4096}


# TF Serving GET /v1/models/NAME (https://www.tensorflow.org/tfx/serving/api_rest#model_status_api).
def tf_status(*states: str) -> dict[str, Any]:
    return {"model_version_status": [
        {"version": str(i + 1), "state": s, "status": {"error_code": "OK", "error_message": ""}}
        for i, s in enumerate(states)]}


TF_NOT_FOUND = {"error": "Servable not found for request: Latest(ranker)"}

# --------------------------------------------------------------------------- the server


@dataclass
class Reply:
    """One canned answer. ``body``: bytes as they are, a str encoded, anything else as JSON."""

    status: int = 200
    body: Any = b""
    content_type: str = "application/json"
    delay_s: float = 0.0
    send_length: bool = True
    headers: tuple[tuple[str, str], ...] = ()

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


class FakeBackend:
    """``routes`` maps a path to its :class:`Reply`; other paths answer 404 as TF Serving and vLLM do."""

    def __init__(self, routes: dict[str, Reply]) -> None:
        self.routes = routes
        self.stop = threading.Event()
        self.hits: list[str] = []
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                backend.hits.append(self.path)
                reply = backend.routes.get(self.path, Reply(404, {"error": "not found"}))
                if reply.delay_s:
                    backend.stop.wait(reply.delay_s)
                body = reply.payload()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    if reply.send_length:
                        self.send_header("Content-Length", str(len(body)))
                    for key, value in reply.headers:
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:  # the probe gave up and closed: expected for the slow and huge ones
                    pass

            def log_message(self, format: str, *args: Any) -> None:  # quiet: the test output is ours
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def backend() -> Iterator[Callable[[dict[str, Reply]], FakeBackend]]:
    """Start fake backends: ``backend({"/health": Reply()})`` → a running server; all stopped after the test."""
    started: list[FakeBackend] = []

    def start(routes: dict[str, Reply]) -> FakeBackend:
        fake = FakeBackend(routes)
        started.append(fake)
        fake.thread.start()
        return fake

    try:
        yield start
    finally:
        for fake in started:
            fake.close()


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then closed): connecting is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def not_http() -> Iterator[str]:
    """A TCP server that answers every connection with a line that is not HTTP, then closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        srv.close()


def service(kind: str, url: str, *, name: str | None = None, model: str | None = None,
            models: tuple[str, ...] = (), reservation: str | None = None, timeout: float = TIMEOUT) -> ServiceConfig:
    return ServiceConfig(name or kind, Probe(kind, url, model, timeout), models, reservation)


def vllm_routes(waiting: float = 2.0, kv: float = 0.41) -> dict[str, Reply]:
    return {"/health": Reply(200, b""),
            "/metrics": Reply(200, VLLM_METRICS.replace("{waiting}", f"{waiting}").replace("{kv}", f"{kv}"),
                              "text/plain; version=0.0.4"),
            "/v1/models": Reply(200, VLLM_MODELS)}


def ollama_routes(*models: dict[str, Any]) -> dict[str, Reply]:
    return {"/api/version": Reply(200, OLLAMA_VERSION), "/api/ps": Reply(200, {"models": list(models)})}
