"""Engine knobs from a grant: fractions rounded down, Ollama's overhead, vLLM/TF flags, and the MPS client knobs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from slurm_gpuarb import engines
from slurm_gpuarb.cli.commands import cli
from slurm_gpuarb.config import default_classes
from slurm_gpuarb.model import Engine, Lease, LeaseState
from slurm_gpuarb.telemetry.fake import load_preset

MIB = 1024 * 1024
H100 = 81559


def test_engine_names_are_the_spec_grammars() -> None:
    assert tuple(e.value for e in Engine) == engines.ENGINES


@pytest.mark.parametrize(
    ("part", "total", "places", "expected"),
    [(6144, H100, 4, "0.0753"), (6144, H100, 2, "0.07"), (H100, H100, 4, "1.0000"), (1, 3, 4, "0.3333"),
     (2, 3, 4, "0.6666"), (512, H100, 4, "0.0062"), (-5, 100, 4, "0.0000"), (7, 10, 0, "0")],
)
def test_fraction_never_rounds_up(part: int, total: int, places: int, expected: str) -> None:
    text = engines.fraction(part, total, places)
    assert text == expected
    assert float(text) * total <= max(part, 0)


def test_vllm_utilization_is_grant_over_total_with_ready_args() -> None:
    k = engines.engine_knobs("vllm", 6144, H100)
    assert k.exports == {"GPUARB_VLLM_GPU_MEMORY_UTILIZATION": "0.0753",
                         "GPUARB_VLLM_ARGS": "--gpu-memory-utilization 0.0753"}
    assert k.flags == "--gpu-memory-utilization 0.0753" and k.notes == ()


def test_vllm_kv_cache_option_is_bytes_and_must_fit_the_grant() -> None:
    k = engines.engine_knobs("vllm", 6144, H100, kv_cache_mib=2048)
    assert k.exports["GPUARB_VLLM_KV_CACHE_MEMORY_BYTES"] == str(2048 * MIB)
    assert k.exports["GPUARB_VLLM_ARGS"] == f"--gpu-memory-utilization 0.0753 --kv-cache-memory-bytes {2048 * MIB}"
    too_big = engines.engine_knobs("vllm", 6144, H100, kv_cache_mib=8192)
    assert "--kv-cache-memory-bytes" not in too_big.flags and "GPUARB_VLLM_KV_CACHE_MEMORY_BYTES" not in too_big.exports
    assert "8192MiB KV cache does not fit the 6144MiB grant" in too_big.notes[0]


def test_ollama_keeps_all_but_the_grant_free() -> None:
    k = engines.engine_knobs("ollama", 6144, H100, reserved_mib=512)
    assert k.exports == {"OLLAMA_GPU_OVERHEAD": str((H100 - 512 - 6144) * MIB), "OLLAMA_MAX_LOADED_MODELS": "1",
                         "GPUARB_OLLAMA_MAX_VRAM_BYTES": str(6144 * MIB)}
    assert k.flags == ""
    assert engines.engine_knobs("ollama", 100, 50, max_loaded_models=2).exports["OLLAMA_MAX_LOADED_MODELS"] == "2"
    assert engines.ollama_overhead_bytes(H100, H100, 512) == 0  # never negative


def test_tf_gets_a_wrapper_fraction_and_the_tf_serving_flag() -> None:
    k = engines.engine_knobs("tf", 6144, H100)
    assert k.exports == {"GPUARB_TF_MEMORY_FRACTION": "0.0753",
                         "GPUARB_TF_SERVING_ARGS": "--per_process_gpu_memory_fraction=0.0753"}
    assert k.flags == "--per_process_gpu_memory_fraction=0.0753"


def test_a_fraction_that_rounds_to_zero_is_never_printed() -> None:
    # TF Serving reads 0 as "pick a value yourself" (all of the GPU); vLLM rejects it
    for engine in ("vllm", "tf", "torch"):
        k = engines.engine_knobs(engine, 1, 2 * 10**6)
        assert k.exports == {} and k.flags == "" and "no memory fraction can express it" in k.notes[0]


def test_torch_none_and_unknown() -> None:
    assert engines.engine_knobs("torch", 40000, H100).exports == {"GPUARB_TORCH_MEMORY_FRACTION": "0.4904"}
    assert engines.engine_knobs(None, 40000, H100).to_json() == {"engine": None, "exports": {}, "flags": "",
                                                                   "notes": []}
    with pytest.raises(ValueError, match="unknown engine 'jax'; expected one of vllm, ollama, tf, torch"):
        engines.engine_knobs("jax", 1, 2)


def test_engine_enum_members_work_as_names() -> None:
    assert engines.engine_knobs(Engine.TORCH, 5, 10).exports == {"GPUARB_TORCH_MEMORY_FRACTION": "0.5000"}


def test_pinned_limit_is_grant_plus_context_per_client_ordinal() -> None:
    assert engines.pinned_mem_limit(6144) == f"0={6144 + engines.CUDA_CONTEXT_MIB}M"
    assert engines.pinned_mem_limit(4096, devices=2, context_mib=0) == "0=4096M,1=4096M"
    assert engines.pinned_mem_limit(H100, total_mib=H100) == f"0={H100}M"  # never above the GPU


def test_mps_exports_cap_only_classes_with_one() -> None:
    assert engines.mps_exports(4096, thread_percent=30) == {
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4608M"}
    assert engines.mps_exports(4096, thread_percent=None) == {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4608M"}
    assert engines.mps_exports(4096, thread_percent=30, server=False) == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}


def test_importing_engines_is_cheap() -> None:
    code = "import slurm_gpuarb.engines, sys; print(*sorted(m for m in sys.modules if m in ('typing', 'dataclasses', "\
           "'slurm_gpuarb.model', 'enum')))"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == []


# --------------------------------------------------------------------------- gpuarb lease request --engine


def _request(cli_env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(cli, ["lease", "request", *args], env=cli_env, catch_exceptions=False)


def test_lease_request_prints_the_tf_serving_flag(cli_env: dict[str, str]) -> None:
    r = _request(cli_env, "gpuarb: vram=6GiB prio=llm", "--engine", "tf")
    assert r.exit_code == 0, r.output
    share = engines.fraction(6144, 24564)  # the workstation's RTX 3090 Ti
    assert f"  export GPUARB_TF_MEMORY_FRACTION={share}\n" in r.output
    assert f"  tensorflow_model_server flags: --per_process_gpu_memory_fraction={share}\n" in r.output


def test_lease_request_knobs_from_the_spec_in_json(cli_env: dict[str, str]) -> None:
    r = _request(cli_env, "gpuarb: vram=2GiB prio=batch engine=vllm share=mps", "--kv-cache", "1GiB", "--json")
    assert r.exit_code == 0, r.output
    knobs = json.loads(r.output)["knobs"]
    assert knobs["engine"] == "vllm"
    share = engines.fraction(2048, 24564)
    assert knobs["flags"] == f"--gpu-memory-utilization {share} --kv-cache-memory-bytes {MIB * 1024}"
    assert knobs["exports"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"  # the example's batch class
    assert knobs["exports"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={2048 + engines.CUDA_CONTEXT_MIB}M"


def test_lease_request_without_an_engine_prints_no_knobs(cli_env: dict[str, str]) -> None:
    r = _request(cli_env, "gpuarb: vram=1GiB", "--json")
    assert r.exit_code == 0 and "knobs" not in json.loads(r.output)


@pytest.mark.parametrize(("args", "message"), [
    (("gpuarb: vram=1GiB engine=ollama", "--engine", "tf"), "--engine tf disagrees with the spec's engine=ollama"),
    (("gpuarb: vram=1GiB", "--kv-cache", "1GiB"), "--kv-cache sizes vLLM's KV cache: add --engine vllm"),
    (("gpuarb: vram=1GiB", "--engine", "vllm", "--kv-cache", "1Gx"), "unknown unit 'Gx'"),
])
def test_lease_request_engine_usage_errors(cli_env: dict[str, str], args: tuple[str, ...], message: str) -> None:
    r = CliRunner().invoke(cli, ["lease", "request", *args], env=cli_env)
    assert r.exit_code == 2 and message in r.output


def _lease(gpus: tuple[int, ...], vram: int, prio: str, mig_uuid: str | None = None) -> Lease:
    return Lease(id="L1", node="n", gpus=gpus, vram_mib=vram, prio=prio, priority=10, preemptible=True,
                 state=LeaseState.GRANTED, created_at=0.0, mig_uuid=mig_uuid)


def test_knobs_for_a_host_lease_use_the_gpu_or_the_mig_instance() -> None:
    dgx, mig = load_preset("dgx-h100").gpus, load_preset("h100-80g-mig-7x1g").gpus
    classes = default_classes()
    k = engines.knobs_for_lease(_lease((2,), 4096, "batch"), dgx, classes, engine="ollama", share_mps=True)
    assert k.exports["OLLAMA_GPU_OVERHEAD"] == str((dgx[2].total_mib - dgx[2].reserved_mib - 4096) * MIB)
    assert k.exports["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30" and "an MPS server" in k.notes[-1]
    llm = engines.knobs_for_lease(_lease((2,), 4096, "llm"), dgx, classes, engine=None, share_mps=True)
    assert llm.exports == {"CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4608M"}
    inst = mig[0].mig_instances[3]
    k = engines.knobs_for_lease(_lease((0,), inst.memory_mib, "batch", inst.uuid), mig, classes, engine="torch",
                                share_mps=True)
    assert k.exports == {"GPUARB_TORCH_MEMORY_FRACTION": "1.0000"}  # the whole instance; no MPS on MIG here
