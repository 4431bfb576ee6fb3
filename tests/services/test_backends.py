"""Each backend's documented answers, read into a status: vLLM, Ollama, TF Serving."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_gpuarb.services import STATES, Thresholds, probe, probing, same_model
from slurm_gpuarb.services.backends import parse_vllm_metrics
from slurm_gpuarb.services.fetch import Answer, Client

from .conftest import (
    GIB,
    OLLAMA_VERSION,
    TF_NOT_FOUND,
    VLLM_METRICS_V0,
    VLLM_MODELS,
    FakeBackend,
    Reply,
    ollama_model,
    ollama_routes,
    service,
    tf_status,
    vllm_routes,
)

Start = Callable[[dict[str, Reply]], FakeBackend]
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"

# --------------------------------------------------------------------------- vLLM


def test_vllm_healthy(backend: Start) -> None:
    fake = backend(vllm_routes(waiting=2, kv=0.41))
    s = probe(service("vllm", fake.url, models=("llama3.1:8b",)))
    assert (s.state, s.waiting, s.kv_cache_usage) == ("up", 2, 0.41)
    assert s.models == (LLAMA, "llama3.1:8b")  # reported, then declared
    assert s.reason == "healthy (2 waiting, KV cache 41% full)"
    assert s.observed_vram_mib is None and s.missing == ()
    assert fake.hits == ["/health", "/metrics", "/v1/models"]


@pytest.mark.parametrize(("waiting", "kv", "expect"), [
    (9, 0.5, "9 requests waiting (busy above 8)"),
    (0, 0.95, "KV cache 95% full (busy from 95%)"),
    (20, 0.99, "20 requests waiting (busy above 8), KV cache 99% full"),
])
def test_vllm_busy(backend: Start, waiting: int, kv: float, expect: str) -> None:
    s = probe(service("vllm", backend(vllm_routes(waiting, kv)).url))
    assert s.state == "busy" and s.reason.startswith(f"overloaded: {expect}"), s.reason


def test_vllm_thresholds_are_parameters(backend: Start) -> None:
    url = backend(vllm_routes(waiting=3, kv=0.5)).url
    assert probe(service("vllm", url), thresholds=Thresholds(max_waiting=2)).state == "busy"
    assert probe(service("vllm", url), thresholds=Thresholds(max_kv_cache_usage=0.4)).state == "busy"
    assert probe(service("vllm", url)).state == "up"


def test_vllm_older_metric_name(backend: Start) -> None:
    routes = vllm_routes() | {"/metrics": Reply(200, VLLM_METRICS_V0, "text/plain"), "/v1/models": Reply(404)}
    s = probe(service("vllm", backend(routes).url))
    assert (s.state, s.waiting, s.kv_cache_usage) == ("up", 1, 0.5)
    assert s.models == ("mistral-7b",)  # /v1/models failed: the metrics' model_name labels stand in
    assert "models unknown: GET /v1/models answered HTTP 404" in s.reason


def test_vllm_several_engines_sum_their_queues() -> None:
    m = parse_vllm_metrics('vllm:num_requests_waiting{engine="0",model_name="m"} 3\n'
                           'vllm:num_requests_waiting{engine="1",model_name="m"} 4\n'
                           'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
                           'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7\n')
    assert (m.waiting, m.kv_cache_usage, m.models, m.notes) == (7, 0.7, ("m",), ())


@pytest.mark.parametrize(("text", "note"), [
    ("vllm:kv_cache_usage_perc 41\n", "vllm:kv_cache_usage_perc is 41, which is implausible"),
    ("vllm:num_requests_waiting NaN\n", "vllm:num_requests_waiting is nan, which is implausible"),
    ("vllm:num_requests_waiting lots\n", "vllm:num_requests_waiting is 'lots', not a number"),
    ("<html>metrics</html>\n", "GET /metrics has no vllm: metrics"),
])
def test_vllm_implausible_metrics_are_noted_not_used(text: str, note: str) -> None:
    m = parse_vllm_metrics(text)
    assert (m.waiting, m.kv_cache_usage) == (None, None) and m.notes == (note,)


def test_vllm_metrics_missing_is_still_up(backend: Start) -> None:
    s = probe(service("vllm", backend(vllm_routes() | {"/metrics": Reply(404, "no")}).url))
    assert (s.state, s.waiting, s.kv_cache_usage, s.models) == ("up", None, None, (LLAMA,))
    assert "load unknown: GET /metrics answered HTTP 404" in s.reason


def test_vllm_dead_engine_is_down(backend: Start) -> None:  # /health answers 503 once the engine died
    s = probe(service("vllm", backend(vllm_routes() | {"/health": Reply(503, b"")}).url, models=("x",)))
    assert s.state == "down" and s.reason == "GET /health answered HTTP 503 (an empty body)"
    assert s.models == ("x",)  # a down service keeps its declared models: routing knows it once served them


def test_vllm_without_its_declared_model_is_degraded(backend: Start) -> None:
    s = probe(service("vllm", backend(vllm_routes()).url, model="qwen2:7b", reservation="vllm"))
    assert s.state == "degraded" and s.missing == ("qwen2:7b",) and s.models == (LLAMA,)
    assert "does not serve 'qwen2:7b' (serves: meta-llama/Llama-3.1-8B-Instruct)" in s.reason


@pytest.mark.parametrize("models", [[], {"data": "x"}, {"data": [{"id": 5}]}, {"object": "list"}])
def test_vllm_model_list_of_the_wrong_shape_is_noted(backend: Start, models: object) -> None:
    s = probe(service("vllm", backend(vllm_routes() | {"/v1/models": Reply(200, models)}).url))
    assert s.state == "up" and "models unknown: GET /v1/models: " in s.reason and "should be" in s.reason


# --------------------------------------------------------------------------- Ollama


def test_ollama_idle_with_nothing_loaded(backend: Start) -> None:
    s = probe(service("ollama", backend(ollama_routes()).url, models=("llama3:8b",)))
    assert (s.state, s.observed_vram_mib, s.version, s.models) == ("up", 0, "0.12.6", ("llama3:8b",))
    assert s.reason.startswith("idle: no model loaded")


def test_ollama_models_null_counts_as_none(backend: Start) -> None:
    routes = ollama_routes() | {"/api/ps": Reply(200, {"models": None})}
    assert probe(service("ollama", backend(routes).url)).observed_vram_mib == 0


def test_ollama_loaded_in_vram(backend: Start) -> None:
    a, b = ollama_model("llama3:8b", 6 * GIB, 6 * GIB), ollama_model("qwen2:7b", 4 * GIB + 1, 4 * GIB + 1)
    s = probe(service("ollama", backend(ollama_routes(a, b)).url, models=("llama3",)))
    assert s.state == "up" and s.observed_vram_mib == 10 * 1024 + 1  # bytes rounded up to a whole MiB
    # loaded first, then the declared "llama3" (llama3:latest: not llama3:8b), which Ollama loads on demand
    assert s.models == ("llama3:8b", "qwen2:7b", "llama3")
    assert s.reason == "2 models loaded, 10.0GiB in VRAM"


def test_ollama_model_half_on_the_cpu_is_degraded(backend: Start) -> None:
    big = ollama_model("llama3:70b", 40 * GIB, 15 * GIB)
    s = probe(service("ollama", backend(ollama_routes(big)).url))
    assert s.state == "degraded" and s.observed_vram_mib == 15 * 1024
    assert s.reason == "llama3:70b is 37% in VRAM, the rest on the CPU (slow replies); 1 model loaded, 15GiB in VRAM"


def test_ollama_entirely_on_the_cpu_is_degraded(backend: Start) -> None:
    s = probe(service("ollama", backend(ollama_routes(ollama_model("tiny", GIB, 0))).url))
    assert s.state == "degraded" and s.observed_vram_mib == 0 and "tiny is 0% in VRAM" in s.reason


@pytest.mark.parametrize(("ps", "expect"), [
    ([], "GET /api/ps: the answer should be an object with \"models\" but is a list"),
    ({"running": []}, "the answer should be an object with \"models\" but is an object"),
    ({"models": {}}, "models should be a list but is an object"),
    ({"models": ["llama3"]}, "models[0] should be an object but is string 'llama3'"),
    ({"models": [ollama_model("m", 5, 5) | {"size_vram": "5"}]}, "models[0].size_vram should be a byte count but is "
                                                                 "string '5'"),
    ({"models": [ollama_model("m", 5, 5) | {"size": True}]}, "models[0].size should be a byte count but is boolean"),
    ({"models": [ollama_model("m", 5, 5) | {"size": -1}]}, "models[0].size should be a byte count but is number -1"),
    ({"models": [{"size": 1, "size_vram": 1}]}, "models[0].name should be a string but is null"),
])
def test_ollama_wrong_shapes_are_down(backend: Start, ps: object, expect: str) -> None:
    s = probe(service("ollama", backend(ollama_routes() | {"/api/ps": Reply(200, ps)}).url))
    assert s.state == "down" and expect in s.reason and s.reason.endswith("is this an Ollama server?"), s.reason


@pytest.mark.parametrize("version", [["0.12.6"], {"version": 12}, {}])
def test_ollama_version_of_the_wrong_shape_is_down(backend: Start, version: object) -> None:
    s = probe(service("ollama", backend(ollama_routes() | {"/api/version": Reply(200, version)}).url))
    assert s.state == "down" and s.reason.startswith("GET /api/version: the answer should be")


def test_ollama_version_is_asked_first(backend: Start) -> None:
    fake = backend({"/api/version": Reply(200, OLLAMA_VERSION)})
    s = probe(service("ollama", fake.url))
    assert s.state == "down" and "GET /api/ps answered HTTP 404" in s.reason and fake.hits == ["/api/version",
                                                                                                  "/api/ps"]


# --------------------------------------------------------------------------- TF Serving


def test_tfserving_available(backend: Start) -> None:
    fake = backend({"/v1/models/ranker": Reply(200, tf_status("AVAILABLE", "END"))})
    s = probe(service("tfserving", fake.url, model="ranker", models=("ranker",)))
    assert (s.state, s.models, s.reason) == ("up", ("ranker",), "1 of 1 models AVAILABLE (ranker)")
    assert fake.hits == ["/v1/models/ranker"]  # the probe's model and the declared one are asked once


def test_tfserving_version_as_a_number_is_fine(backend: Start) -> None:
    body = {"model_version_status": [{"version": 3, "state": "AVAILABLE", "status": {}}]}
    assert probe(service("tfserving", backend({"/v1/models/r": Reply(200, body)}).url, models=("r",))).state == "up"


def test_tfserving_loading_is_down(backend: Start) -> None:
    body = tf_status("LOADING")
    body["model_version_status"][0]["status"]["error_message"] = "reading the SavedModel"
    s = probe(service("tfserving", backend({"/v1/models/ranker": Reply(200, body)}).url, models=("ranker",)))
    assert s.state == "down" and s.missing == ("ranker",) and s.models == ()
    assert s.reason == "answers, but no model is AVAILABLE: ranker: LOADING (reading the SavedModel)"


def test_tfserving_one_model_missing_is_degraded(backend: Start) -> None:
    fake = backend({"/v1/models/a": Reply(200, tf_status("AVAILABLE")), "/v1/models/b%2Fc": Reply(404, TF_NOT_FOUND)})
    s = probe(service("tfserving", fake.url, models=("a", "b/c")))
    assert (s.state, s.models, s.missing) == ("degraded", ("a",), ("b/c",))
    assert s.reason == ("1 of 2 models AVAILABLE (a); b/c: Servable not found for request: Latest(ranker) "
                        "(HTTP 404)")


@pytest.mark.parametrize("body", [{"model_version_status": "AVAILABLE"}, {"model_version_status": [{"state": 1}]},
                                  ["AVAILABLE"], {"error": "x"}])
def test_tfserving_wrong_shapes_are_down(backend: Start, body: object) -> None:
    s = probe(service("tfserving", backend({"/v1/models/r": Reply(200, body)}).url, models=("r",)))
    assert s.state == "down" and "should be" in s.reason and "TF Serving" in s.reason, s.reason


def test_tfserving_without_a_model_name_is_down_with_the_fix(backend: Start) -> None:
    s = probe(service("tfserving", backend({}).url))
    assert s.state == "down" and 'models = ["NAME"]' in s.reason


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(("asked", "served", "same"), [
    ("llama3", "llama3:latest", True), ("llama3:latest", "llama3", True), ("llama3", "llama3", True),
    ("llama3", "llama3:8b", False), ("a/b", "a/b:latest", True), ("Llama3", "llama3", False),
])
def test_same_model(asked: str, served: str, same: bool) -> None:
    assert same_model(asked, served) is same



# --------------------------------------------------------------------------- whatever comes back


LEAF = st.none() | st.booleans() | st.integers(-5, 1 << 40) | st.floats(allow_nan=True) | st.text(max_size=6)
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                      max_size=3), max_leaves=6)
METRIC_PARTS = ['vllm:num_requests_waiting{model_name="m"} ', "vllm:kv_cache_usage_perc ",
                'vllm:gpu_cache_usage_perc{x="', "1", "0.5", "NaN", "-1", "\n", "{", "}", "# TYPE"]
# The documented answers, which the fuzz below mutates: a field replaced by anything, or removed.
DOCUMENTED: dict[str, Any] = {
    "/v1/models": VLLM_MODELS, "/api/version": OLLAMA_VERSION,
    "/api/ps": {"models": [ollama_model("a", 10, 5), ollama_model("b", 10, 10)]},
    "/v1/models/m": tf_status("LOADING", "AVAILABLE"), "/v1/models/n": TF_NOT_FOUND,
}
PATHS = {"vllm": ("/health", "/metrics", "/v1/models"), "ollama": ("/api/version", "/api/ps"),
         "tfserving": ("/v1/models/m", "/v1/models/n")}


def paths_in(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else []
    for key, child in children:
        out += paths_in(child, (*prefix, key))
    return out


@st.composite
def mutated(draw: st.DrawFn, path: str) -> bytes:
    if path not in DOCUMENTED:  # /health (any body), /metrics (Prometheus text)
        return draw(st.lists(st.sampled_from(METRIC_PARTS), max_size=12).map(lambda p: "".join(p).encode())
                    | st.binary(max_size=20))
    doc = json.loads(json.dumps(DOCUMENTED[path]))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths_in(doc)))
        if not where:
            doc = draw(JSON)
            continue
        parent = doc
        for key in where[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[where[-1]]
        else:
            parent[where[-1]] = draw(JSON)
    return draw(st.just(json.dumps(doc).encode()) | st.binary(max_size=20))


def canned(answers: dict[str, tuple[int, bytes]]) -> type[Client]:
    """A client class that answers from a table instead of the network: parsers see every body fast."""

    class Canned(Client):
        def get(self, path: str, max_bytes: int = 0) -> Answer:
            status, body = answers.get(path, (404, b""))
            return Answer(status, body, path)

    return Canned


@settings(max_examples=100, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(PATHS)), status=st.sampled_from([200, 200, 200, 404, 500]))
def test_no_answer_makes_a_probe_raise(data: st.DataObject, kind: str, status: int) -> None:
    answers = {p: (status if i == 0 else 200, data.draw(mutated(p))) for i, p in enumerate(PATHS[kind])}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(probing, "Client", canned(answers))
        s = probe(service(kind, "http://127.0.0.1:1", models=("m", "n")))
    assert s.state in STATES and s.reason and "\n" not in s.reason
    assert not s.reason.startswith("could not read the answer")  # the parsers' own checks caught it, not the net
    assert s.waiting is None or s.waiting >= 0
    assert s.kv_cache_usage is None or 0 <= s.kv_cache_usage <= 1
