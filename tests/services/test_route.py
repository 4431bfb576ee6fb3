"""Load-shed advice: the healthy backend that serves the model, or 503 with Retry-After, or 404."""

from __future__ import annotations

import pytest

from slurm_gpuarb.services import RETRY_AFTER_BUSY_S, RETRY_AFTER_DOWN_S, ServiceStatus, advice_to_json, route

LLAMA = "llama3:8b"


def st(name: str, kind: str, state: str = "up", models: tuple[str, ...] = (LLAMA,), *, waiting: int | None = None,
       kv: float | None = None, missing: tuple[str, ...] = (), reason: str = "fine") -> ServiceStatus:
    return ServiceStatus(name, kind, f"http://{name}:1", state, reason, models, waiting=waiting, kv_cache_usage=kv,
                         missing=missing)


def test_vllm_before_ollama_before_tfserving_when_all_are_up() -> None:
    a = route(LLAMA, [st("tf", "tfserving"), st("ol", "ollama"), st("vl", "vllm")])
    assert (a.http_status, a.backend, a.kind, a.url, a.retry_after_s) == (200, "vl", "vllm", "http://vl:1", None)
    assert a.fallbacks == ("ol", "tf") and a.ok
    assert a.reason == "vl (vllm) is up and serves llama3:8b"


@pytest.mark.parametrize("state", ["down", "busy"])
def test_vllm_unhealthy_sends_to_ollama_serving_the_same_model(state: str) -> None:
    a = route(LLAMA, [st("vl", "vllm", state, reason="connection refused"), st("ol", "ollama")])
    assert (a.http_status, a.backend, a.fallbacks) == (200, "ol", ())
    assert a.reason == f"ol (ollama) is up and serves llama3:8b; skipped vl {state} (connection refused)"


def test_degraded_is_used_only_after_every_up_one() -> None:
    degraded = st("vl", "vllm", "degraded", reason="llama3 is 40% in VRAM")
    a = route(LLAMA, [degraded, st("ol", "ollama")])
    assert (a.backend, a.fallbacks) == ("ol", ("vl",))
    alone = route(LLAMA, [degraded, st("ol2", "ollama", "down")])
    assert alone.backend == "vl" and alone.reason.startswith("vl (vllm) is degraded and serves llama3:8b, but llama3")


def test_equals_are_ranked_by_queue_then_kv_cache_then_name() -> None:
    statuses = [st("v1", "vllm", waiting=3), st("v2", "vllm", waiting=1, kv=0.9), st("v3", "vllm", waiting=1, kv=0.2),
                st("v0", "vllm", waiting=1, kv=0.2)]
    a = route(LLAMA, statuses)
    assert (a.backend, a.fallbacks) == ("v0", ("v3", "v2", "v1"))


def test_prefer_is_a_parameter() -> None:
    assert route(LLAMA, [st("vl", "vllm"), st("ol", "ollama")], prefer=("ollama", "vllm")).backend == "ol"


def test_all_busy_is_503_with_a_short_retry() -> None:
    a = route(LLAMA, [st("vl", "vllm", "busy", reason="12 waiting"), st("ol", "ollama", "down", reason="refused")])
    assert (a.http_status, a.backend, a.url, a.retry_after_s) == (503, None, None, RETRY_AFTER_BUSY_S)
    assert a.reason == "no backend for llama3:8b can take a request now: vl busy (12 waiting), ol down (refused)"


def test_all_down_is_503_with_a_long_retry() -> None:
    a = route(LLAMA, [st("vl", "vllm", "down"), st("ol", "ollama", "down")], retry_after_down_s=60)
    assert (a.http_status, a.retry_after_s) == (503, 60)
    assert route(LLAMA, [st("vl", "vllm", "down")]).retry_after_s == RETRY_AFTER_DOWN_S


def test_a_model_that_is_declared_but_not_loaded_is_503() -> None:
    tf = st("tf", "tfserving", "degraded", models=("a",), missing=("b",), reason="b: LOADING")
    a = route("b", [tf])
    assert (a.http_status, a.retry_after_s) == (503, RETRY_AFTER_DOWN_S)
    assert a.reason == "no backend for b can take a request now: tf cannot serve it now (b: LOADING)"
    assert route("a", [tf]).backend == "tf"


def test_unknown_model_is_404_naming_the_known_ones() -> None:
    a = route("gpt-5", [st("vl", "vllm", models=("x", "y")), st("ol", "ollama", "down", models=("y", "z"))])
    assert (a.http_status, a.backend, a.retry_after_s) == (404, None, None)
    assert a.reason == "no service serves model 'gpt-5' (known models: x, y, z)"


def test_unknown_model_while_a_service_with_unknown_models_is_down_is_503() -> None:
    a = route("gpt-5", [st("vl", "vllm", "down", models=())])
    assert (a.http_status, a.retry_after_s) == (503, RETRY_AFTER_DOWN_S)
    assert "vl is down with no declared models, so it might" in a.reason


def test_no_services_at_all() -> None:
    a = route(LLAMA, [])
    assert a.http_status == 404 and "no services are declared" in a.reason


def test_ollama_latest_tag_matches() -> None:
    assert route("llama3", [st("ol", "ollama", models=("llama3:latest",))]).backend == "ol"
    assert route("llama3", [st("ol", "ollama", models=("llama3:8b",))]).http_status == 404


def test_advice_json_keys_are_stable() -> None:
    ok = advice_to_json(route(LLAMA, [st("vl", "vllm"), st("ol", "ollama")]))
    shed = advice_to_json(route(LLAMA, [st("vl", "vllm", "busy")]))
    missing = advice_to_json(route("x", [st("vl", "vllm")]))
    assert set(ok) == set(shed) == set(missing) == {"model", "backend", "kind", "url", "http_status", "retry_after_s",
                                                    "reason", "fallbacks"}
    assert (ok["fallbacks"], shed["backend"], shed["retry_after_s"], missing["http_status"]) == (["ol"], None, 5, 404)
