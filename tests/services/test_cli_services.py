"""``gpuarb services`` and ``gpuarb route``: whatever a backend answers, a clear line and stable JSON, never
a traceback; exit codes 0 (fine), 3 (not now), 4 (no such model), 1 (bad config)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cliutil import run_cli

from slurm_gpuarb.cli.commands import cli

from .conftest import (
    GIB,
    SLOW_S,
    FakeBackend,
    Reply,
    ollama_model,
    ollama_routes,
    vllm_routes,
)

Start = Callable[[dict[str, Reply]], FakeBackend]
JSON_KEYS = {"name", "kind", "url", "state", "reason", "models", "missing", "observed_vram_mib", "waiting",
             "kv_cache_usage", "version", "reservation", "gpu", "node", "declared_mib", "reserved_mib", "checked_at"}
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("GPUARB_"):
            monkeypatch.delenv(key)


def write_config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "gpuarb.toml"
    path.write_text("version = 1\n" + body)
    path.chmod(0o644)
    return path


def ollama_reservation(url: str) -> str:
    return f"""
[[reservations]]
name = "ollama"
size = "12GiB"
gpu = 0
match = {{ process = "ollama" }}
probe = {{ kind = "ollama", url = "{url}", model = "llama3:8b", timeout = "200ms" }}
"""


def vllm_service(url: str, name: str = "vllm-a") -> str:
    return f"""
[[services]]
name = "{name}"
kind = "vllm"
url = "{url}"
models = ["llama3:8b"]
timeout = "200ms"
"""


def invoke(config: Path, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["--config", str(config), *args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


# (routes for the Ollama stand-in, or None for a closed port; state; exit code; a part of the line)
OLLAMA_CASES: dict[str, tuple[dict[str, Reply] | None, str, int, str]] = {
    "in-vram": (ollama_routes(ollama_model("llama3:8b", 11 * GIB, 11 * GIB)), "up", 0,
                "11GiB of 12GiB reserved on gpu0 (1 model) {url}  — 1 model loaded, 11GiB in VRAM"),
    "bigger-than-declared": (ollama_routes(ollama_model("llama3:70b", 14 * GIB, 14 * GIB)), "up", 0,
                             "14GiB on gpu0, over its 12GiB reservation (2 models) {url}"),
    "idle": (ollama_routes(), "up", 0, "12GiB reserved on gpu0 (1 model) {url}  — idle: no model loaded"),
    "half-on-cpu": (ollama_routes(ollama_model("llama3:8b", 10 * GIB, 5 * GIB)), "degraded", 3,
                    "llama3:8b is 50% in VRAM, the rest on the CPU (slow replies)"),
    "timeout": ({"/api/version": Reply(200, {"version": "1"}, delay_s=SLOW_S)}, "down", 3,
                "GET /api/version: no answer within 0.2s"),
    "500": (ollama_routes() | {"/api/ps": Reply(500, "boom", "text/plain")}, "down", 3,
            "GET /api/ps answered HTTP 500 ('boom')"),
    "garbage": (ollama_routes() | {"/api/ps": Reply(200, "<html>proxy error</html>")}, "down", 3,
                "GET /api/ps answered 200 but not JSON ('<html>proxy error</html>'); is this an Ollama server?"),
    "list-not-object": (ollama_routes() | {"/api/ps": Reply(200, [1, 2])}, "down", 3,
                        "GET /api/ps: the answer should be an object with \"models\" but is a list"),
    "string-not-number": (ollama_routes() | {"/api/ps": Reply(200, {"models": [
        ollama_model("m", 5, 5) | {"size_vram": "5GB"}]})}, "down", 3,
        "models[0].size_vram should be a byte count but is string '5GB'"),
    "huge": (ollama_routes() | {"/api/version": Reply(200, b"{" * (3 << 20))}, "down", 3,
             "more than the 1048576 bytes a probe reads"),
    "refused": (None, "down", 3, "connection refused (nothing listens on 127.0.0.1:"),
}


@pytest.mark.parametrize("case", list(OLLAMA_CASES))
def test_services_line_and_json_for_every_answer(case: str, backend: Start, closed_port: int, tmp_path: Path) -> None:
    routes, state, code, part = OLLAMA_CASES[case]
    url = backend(routes).url if routes is not None else f"http://127.0.0.1:{closed_port}"
    config = write_config(tmp_path, ollama_reservation(url))
    text = invoke(config, "services")
    assert text.exit_code == code
    (line,) = text.output.splitlines()
    assert line.startswith(f"ollama  {state:<8}  ") and part.format(url=url) in line, line
    out = invoke(config, "services", "--json")
    assert out.exit_code == code
    (doc,) = json.loads(out.output)
    assert set(doc) == JSON_KEYS and doc["state"] == state and doc["name"] == doc["reservation"] == "ollama"
    assert (doc["gpu"], doc["declared_mib"], doc["kind"], doc["url"]) == (0, 12288, "ollama", url)
    assert doc["reserved_mib"] == max(12288, doc["observed_vram_mib"] or 0)


def test_several_services_line_up(backend: Start, closed_port: int, tmp_path: Path) -> None:
    ollama = backend(ollama_routes())
    config = write_config(tmp_path, ollama_reservation(ollama.url) + vllm_service(backend(vllm_routes(20)).url)
                          + vllm_service(f"http://127.0.0.1:{closed_port}", "vllm-long-name"))
    result = invoke(config, "services")
    assert result.exit_code == 3
    lines = result.output.splitlines()
    assert [line.split()[:2] for line in lines] == [["ollama", "up"], ["vllm-a", "busy"], ["vllm-long-name", "down"]]
    assert len({line.index(line.split()[1]) for line in lines}) == 1  # the state column lines up
    assert "(2 models)" in lines[1] and "overloaded: 20 requests waiting" in lines[1]


def test_services_timeout_option(backend: Start, tmp_path: Path) -> None:
    slow = backend({"/health": Reply(200, b"", delay_s=SLOW_S)})
    result = invoke(write_config(tmp_path, vllm_service(slow.url)), "services", "--timeout", "0.1")
    assert result.exit_code == 3 and "GET /health: no answer within 0.1s" in result.output


def test_no_services_declared(tmp_path: Path) -> None:
    config = write_config(tmp_path, "")
    assert invoke(config, "services").output.startswith("no services declared: give a [[reservations]] entry a probe")
    result = invoke(config, "services", "--json")
    assert (result.exit_code, json.loads(result.output)) == (0, [])


def test_a_bad_config_is_an_error_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[services]]\nname = "x"\nkind = "tf"\nurl = "http://h:1"\nmodels = ["m"]\n')
    result = invoke(config, "services")
    assert result.exit_code == 1 and "services[0].kind: expected one of vllm, ollama, tfserving, found 'tf'; did you " \
                                      "mean 'tfserving'?" in result.output


# --------------------------------------------------------------------------- route


def route_config(tmp_path: Path, vllm: str, ollama: str) -> Path:
    return write_config(tmp_path, ollama_reservation(ollama) + vllm_service(vllm))


def test_route_prefers_a_healthy_vllm(backend: Start, tmp_path: Path) -> None:
    config = route_config(tmp_path, backend(vllm_routes()).url, backend(ollama_routes()).url)
    result = invoke(config, "route", "llama3:8b")
    assert result.exit_code == 0 and result.output.startswith("vllm-a http://127.0.0.1:")
    doc: dict[str, Any] = json.loads(invoke(config, "route", "llama3:8b", "--json").output)
    assert (doc["backend"], doc["kind"], doc["http_status"], doc["fallbacks"]) == ("vllm-a", "vllm", 200, ["ollama"])


def test_route_falls_back_to_ollama_when_vllm_is_busy(backend: Start, tmp_path: Path) -> None:
    config = route_config(tmp_path, backend(vllm_routes(kv=0.99)).url, backend(ollama_routes()).url)
    result = invoke(config, "route", "llama3:8b")
    assert result.exit_code == 0 and result.output.startswith("ollama http://127.0.0.1:")
    assert "skipped vllm-a busy (overloaded: KV cache 99% full" in result.output


def test_route_503_when_nothing_can_take_it(backend: Start, closed_port: int, tmp_path: Path) -> None:
    config = route_config(tmp_path, backend(vllm_routes(waiting=50)).url, f"http://127.0.0.1:{closed_port}")
    result = invoke(config, "route", "llama3:8b")
    assert result.exit_code == 3
    assert result.output.startswith("503 Retry-After: 5 — no backend for llama3:8b can take a request now: ollama down "
                                    "(connection refused")
    assert "vllm-a busy (overloaded: 50 requests waiting (busy above 8))" in result.output
    doc = json.loads(invoke(config, "route", "llama3:8b", "--json").output)
    assert (doc["http_status"], doc["retry_after_s"], doc["backend"], doc["url"]) == (503, 5, None, None)


def test_route_404_for_a_model_nobody_serves(backend: Start, tmp_path: Path) -> None:
    config = route_config(tmp_path, backend(vllm_routes()).url, backend(ollama_routes()).url)
    result = invoke(config, "route", "gpt-5")
    assert result.exit_code == 4
    assert result.output.strip() == f"404 — no service serves model 'gpt-5' (known models: llama3:8b, {LLAMA})"


def test_the_real_entry_point(closed_port: int, tmp_path: Path) -> None:
    config = write_config(tmp_path, vllm_service(f"http://127.0.0.1:{closed_port}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUARB_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    proc = run_cli(["--config", str(config), "services", "--json"], env)
    assert proc.returncode == 3 and proc.stderr == ""
    (doc,) = json.loads(proc.stdout)
    assert doc["state"] == "down" and doc["reason"].startswith("connection refused")
