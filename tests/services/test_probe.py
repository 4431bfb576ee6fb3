"""Every way a backend can fail is a ``down`` (or ``busy``) status with one clear line, never an exception;
probing many is concurrent and bounded; reservations are sized max(declared, observed)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slurm_gpuarb.config import load
from slurm_gpuarb.model import Matcher, Probe, Reservation, ServiceConfig
from slurm_gpuarb.services import (
    ServiceStatus,
    backends,
    probe,
    probe_reservation,
    probe_services,
    reservation_size_mib,
    service_for,
    status_to_json,
)
from slurm_gpuarb.services import probing as probe_mod

from .conftest import SLOW_S, TIMEOUT, FakeBackend, Reply, ollama_model, ollama_routes, service, vllm_routes

Start = Callable[[dict[str, Reply]], FakeBackend]
KINDS = ("vllm", "ollama", "tfserving")
FIRST = {"vllm": "/health", "ollama": "/api/version", "tfserving": "/v1/models/m"}  # the endpoint asked first
JSON_KEYS = {"name", "kind", "url", "state", "reason", "models", "missing", "observed_vram_mib", "waiting",
             "kv_cache_usage", "version", "reservation", "gpu", "node", "declared_mib", "reserved_mib", "checked_at"}


def svc(kind: str, url: str) -> ServiceConfig:
    return service(kind, url, models=("m",))


# --------------------------------------------------------------------------- failure modes, every kind


@pytest.mark.parametrize("kind", KINDS)
def test_connection_refused(kind: str, closed_port: int) -> None:
    s = probe(svc(kind, f"http://127.0.0.1:{closed_port}"))
    assert s.state == "down" and s.reason == f"connection refused (nothing listens on 127.0.0.1:{closed_port})"
    assert s.models == ("m",) and s.checked_at > 0


@pytest.mark.parametrize("kind", KINDS)
def test_no_answer_in_time(kind: str, backend: Start) -> None:
    fake = backend({FIRST[kind]: Reply(200, b"{}", delay_s=SLOW_S)})
    s = probe(svc(kind, fake.url))
    assert s.state == "down" and s.reason == f"GET {FIRST[kind]}: no answer within {TIMEOUT:g}s"


@pytest.mark.parametrize("kind", KINDS)
def test_server_error(kind: str, backend: Start) -> None:
    s = probe(svc(kind, backend({FIRST[kind]: Reply(500, "Internal Server Error", "text/plain")}).url))
    assert s.state == "down" and s.reason == f"GET {FIRST[kind]} answered HTTP 500 ('Internal Server Error')"


@pytest.mark.parametrize("kind", ["ollama", "tfserving"])  # vLLM's /health has an empty body: JSON is not asked
@pytest.mark.parametrize("body", [b"<html><body>Bad Gateway</body></html>", b'{"models": [', b"\xff\xfe\x00garbage",
                                  b"[" * 100_000])
def test_garbage_instead_of_json(kind: str, body: bytes, backend: Start) -> None:
    s = probe(svc(kind, backend({FIRST[kind]: Reply(200, body, "text/html")}).url))
    assert s.state == "down" and s.reason.startswith(f"GET {FIRST[kind]} answered 200 but not JSON ("), s.reason
    assert "\n" not in s.reason and len(s.reason) < 200


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("send_length", [True, False])
def test_huge_body(kind: str, send_length: bool, backend: Start) -> None:
    s = probe(svc(kind, backend({FIRST[kind]: Reply(200, b" " * (2 << 20), send_length=send_length)}).url))
    assert s.state == "down" and "bytes a probe reads; is this URL the service's API?" in s.reason, s.reason


@pytest.mark.parametrize("kind", KINDS)
def test_too_many_requests_is_busy(kind: str, backend: Start) -> None:
    s = probe(svc(kind, backend({FIRST[kind]: Reply(429, "slow down", "text/plain")}).url))
    assert (s.state, s.reason) == ("busy", f"GET {FIRST[kind]} answered HTTP 429 Too Many Requests")


@pytest.mark.parametrize("kind", KINDS)
def test_redirect_is_not_followed(kind: str, backend: Start) -> None:
    fake = backend({FIRST[kind]: Reply(302, b"", headers=(("Location", "http://elsewhere/"),))})
    s = probe(svc(kind, fake.url))
    assert s.state == "down" and "answered HTTP 302 (a redirect); point url at" in s.reason


@pytest.mark.parametrize("kind", KINDS)
def test_not_http_at_all(kind: str, not_http: str) -> None:
    s = probe(svc(kind, not_http))
    assert s.state == "down" and s.reason.startswith(f"GET {FIRST[kind]}: not an HTTP answer ("), s.reason


def test_unknown_host() -> None:
    s = probe(svc("ollama", "http://no-such-host.invalid:11434"))
    assert s.state == "down" and s.reason.startswith("cannot resolve host 'no-such-host.invalid'")


def test_the_timeout_argument_overrides_the_probes(backend: Start) -> None:
    fake = backend({"/health": Reply(200, b"", delay_s=SLOW_S)})
    s = probe(ServiceConfig("v", Probe("vllm", fake.url, timeout_s=30.0)), timeout=0.1)
    assert s.reason == "GET /health: no answer within 0.1s"


def test_one_deadline_for_the_whole_probe(backend: Start) -> None:
    # /health answers after most of the budget: the later requests get only what is left, and say so.
    fake = backend(vllm_routes() | {"/metrics": Reply(200, "", delay_s=SLOW_S)})
    s = probe(svc("vllm", fake.url))
    assert s.state == "up" and "load unknown: GET /metrics: no answer within 0.2s" in s.reason
    assert "models unknown: GET /v1/models: no time left of the probe's 0.2s" in s.reason


def test_an_unknown_kind_is_a_status_not_an_error() -> None:
    s = probe(ServiceConfig("x", Probe("triton", "http://127.0.0.1:1")))
    assert s.state == "down" and "unknown probe kind 'triton'" in s.reason


def test_an_unforeseen_parse_error_is_still_a_status(backend: Start, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise KeyError("size")

    monkeypatch.setitem(backends.PROBES, "ollama", broken)
    s = probe(svc("ollama", backend(ollama_routes()).url))
    assert s.state == "down" and s.reason == "could not read the answer (KeyError: 'size')"


# --------------------------------------------------------------------------- many at once


def test_probe_services_keeps_the_order_and_reports_each(backend: Start, closed_port: int) -> None:
    up = backend(ollama_routes(ollama_model("m", 1 << 30, 1 << 30)))
    slow = backend({"/health": Reply(200, b"", delay_s=SLOW_S)})
    services = [service("ollama", up.url, name="a"), service("vllm", slow.url, name="b"),
                service("tfserving", f"http://127.0.0.1:{closed_port}", name="c", models=("m",))]
    statuses = probe_services(services, max_workers=2)
    assert [(s.name, s.state) for s in statuses] == [("a", "up"), ("b", "down"), ("c", "down")]
    assert probe_services([]) == []


@pytest.fixture
def stuck(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Probes that hang until the test ends (a server trickling headers forever), with no slack."""
    release = threading.Event()

    def hang(svc: ServiceConfig, **_: object) -> ServiceStatus:
        release.wait(10)
        raise AssertionError("released")

    monkeypatch.setattr(probe_mod, "probe", hang)
    monkeypatch.setattr(probe_mod, "_SLACK_S", 0.0)
    try:
        yield release
    finally:
        release.set()


def test_a_probe_that_never_finishes_is_reported_down(stuck: threading.Event) -> None:
    (s,) = probe_services([service("vllm", "http://127.0.0.1:1")], timeout=0.05)
    assert s.state == "down" and s.reason == "the probe did not finish within 0.05s"


def test_a_probe_that_crashes_is_reported_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(svc: ServiceConfig, **_: object) -> ServiceStatus:
        raise RuntimeError("bug")

    monkeypatch.setattr(probe_mod, "probe", crash)
    (s,) = probe_services([service("vllm", "http://127.0.0.1:1")])
    assert s.state == "down" and s.reason.startswith("the probe failed unexpectedly (RuntimeError: bug)")


# --------------------------------------------------------------------------- reservations and JSON


OLLAMA_RES = Reservation("ollama", 12 * 1024, gpu=0, match=Matcher(process="ollama"),
                         probe=Probe("ollama", "http://127.0.0.1:11434", "llama3:8b"))


def status(observed: int | None, reservation: str | None = "ollama", state: str = "up") -> ServiceStatus:
    return ServiceStatus("ollama", "ollama", "http://127.0.0.1:11434", state, "r", ("llama3:8b",), observed,
                         reservation=reservation, checked_at=1.5)


@pytest.mark.parametrize(("observed", "size"), [(None, 12288), (0, 12288), (11059, 12288), (14000, 14000)])
def test_reservation_size_is_max_of_declared_and_observed(observed: int | None, size: int) -> None:
    assert reservation_size_mib(OLLAMA_RES, status(observed)) == size
    assert reservation_size_mib(OLLAMA_RES, None) == 12288


def test_reservation_size_refuses_another_reservations_status() -> None:
    with pytest.raises(ValueError, match="not 'ollama'"):
        reservation_size_mib(OLLAMA_RES, status(1, reservation="vllm"))


def test_status_json_has_every_key_always() -> None:
    with_res = status_to_json(status(14000), OLLAMA_RES)
    without = status_to_json(ServiceStatus("v", "vllm", "http://h:1", "down", "refused"))
    assert set(with_res) == set(without) == JSON_KEYS
    assert (with_res["gpu"], with_res["declared_mib"], with_res["reserved_mib"]) == (0, 12288, 14000)
    assert (without["gpu"], without["reserved_mib"], without["models"], without["checked_at"]) == (None, None, [], 0.0)


def test_probe_reservation_is_the_controllers_probe_fn(backend: Start) -> None:
    fake = backend(ollama_routes(ollama_model("llama3:8b", 5 << 30, 5 << 30)))
    res = Reservation("ollama", 4096, probe=Probe("ollama", fake.url, "llama3:8b", 0.5))
    s = probe_reservation(res)
    assert s is not None and (s.name, s.reservation, s.observed_vram_mib) == ("ollama", "ollama", 5120)
    assert reservation_size_mib(res, s) == 5120
    assert probe_reservation(Reservation("static", 1024)) is None


def test_service_for(tmp_path: Path) -> None:
    path = tmp_path / "gpuarb.toml"
    path.write_text('version = 1\n[[reservations]]\nname = "ollama"\nsize = "1GiB"\nmatch = { user = "o" }\n'
                    'probe = { kind = "ollama", url = "http://127.0.0.1:11434" }\n'
                    '[[services]]\nname = "a"\nkind = "vllm"\nurl = "http://a:1"\n')
    path.chmod(0o644)
    cfg = load(path, env={})
    assert [s.name for s in cfg.services] == ["ollama", "a"]
    found = service_for(cfg, "ollama")
    assert found is not None and found.reservation == "ollama" and service_for(cfg, "b") is None
