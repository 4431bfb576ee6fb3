"""The NVML backend against a pynvml double built from tests/data/nvml/, and against real NVML (``gpu``)."""

from __future__ import annotations

import json
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from slurm_gpuarb.errors import ConfigError, TelemetryError
from slurm_gpuarb.telemetry import select
from slurm_gpuarb.telemetry.nvml import NvmlTelemetry

from . import pynvml_double
from .conftest import NVML_DIR

Installer = Callable[..., types.ModuleType]
H100 = json.loads((NVML_DIR / "h100-mig.json").read_text())


@pytest.fixture
def no_proc(tmp_path: Path) -> Path:
    return tmp_path


def test_h100_mig_gpu(fake_pynvml: Installer) -> None:
    fake_pynvml("h100-mig")
    (gpu,) = select("nvml").gpus()
    assert (gpu.name, gpu.total_mib, gpu.reserved_mib, gpu.used_mib, gpu.minor) == (
        "NVIDIA H100 80GB HBM3", 81559, 512, 4200, 0)
    assert gpu.uuid == H100["devices"][0]["uuid"] and gpu.pci_bus_id == "00000000:1B:00.0"
    assert gpu.mig_enabled and len(gpu.mig_instances) == 7
    assert {(m.profile, m.memory_mib, m.ci_id) for m in gpu.mig_instances} == {("1g.10gb", 9984, 0)}
    assert [m.gi_id for m in gpu.mig_instances] == [7, 8, 9, 11, 12, 13, 14]
    assert [m.uuid for m in gpu.mig_instances] == [d["uuid"] for d in H100["devices"][0]["mig_devices"]]
    # placements need root (nvmlDeviceGetGpuInstanceById): unknown, not guessed
    assert {(m.placement_start, m.placement_size) for m in gpu.mig_instances} == {(None, None)}


def test_h100_mig_placements_when_privileged(fake_pynvml: Installer) -> None:
    fake_pynvml("h100-mig", privileged=True)
    (gpu,) = NvmlTelemetry().gpus()
    assert [(m.gi_id, m.placement_start, m.placement_size) for m in gpu.mig_instances] == [
        (7, 4, 1), (8, 5, 1), (9, 6, 1), (11, 0, 1), (12, 1, 1), (13, 2, 1), (14, 3, 1)]


def test_h100_mig_processes_are_read_per_instance(fake_pynvml: Installer, no_proc: Path) -> None:
    m = fake_pynvml("h100-mig")  # unprivileged: the parent's aggregate would raise NO_PERMISSION
    procs = NvmlTelemetry(proc_root=no_proc).processes()
    migs = [d["uuid"] for d in H100["devices"][0]["mig_devices"]]
    assert [(p.pid, p.gpu_index, p.used_mib, p.mig_uuid) for p in procs] == [
        (2101, 0, 4096, migs[0]), (2102, 0, 0, migs[3])]  # None memory reads as 0
    assert all(p.name == "" and p.uid is None for p in procs)
    assert m.state["calls"]["nvmlDeviceGetComputeRunningProcesses"] == 7


def test_empty_mig_slots_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    data = json.loads(json.dumps(H100))
    data["devices"][0]["mig_devices"] = [d for d in data["devices"][0]["mig_devices"] if d["slot"] != 3]
    (gpu,) = NvmlTelemetry(pynvml_double.build(data)).gpus()
    assert len(gpu.mig_instances) == 6 and 11 not in {m.gi_id for m in gpu.mig_instances}


def test_compute_instance_prefix_is_dropped_and_a_nameless_profile_is_an_error() -> None:
    data = json.loads(json.dumps(H100))
    devs = data["devices"][0]["mig_devices"]
    devs[0]["name"] = "NVIDIA H100 80GB HBM3 MIG 1c.2g.20gb"
    (gpu,) = NvmlTelemetry(pynvml_double.build(data)).gpus()
    assert gpu.mig_instances[0].profile == "2g.20gb"
    devs[1]["name"] = "NVIDIA H100 80GB HBM3"
    with pytest.raises(TelemetryError, match=f"cannot tell the MIG profile of GPU 0 MIG device {devs[1]['uuid']}"):
        NvmlTelemetry(pynvml_double.build(data)).gpus()


def test_rtx3090ti_without_mig(fake_pynvml: Installer, no_proc: Path) -> None:
    fake_pynvml("rtx3090ti")
    t = NvmlTelemetry(proc_root=no_proc)
    (gpu,) = t.gpus()
    assert (gpu.total_mib, gpu.reserved_mib, gpu.used_mib, gpu.mig_enabled, gpu.mig_instances) == (
        24564, 256, 11315, False, ())
    procs = {p.pid: p for p in t.processes()}
    assert {pid: p.used_mib for pid, p in procs.items()} == {4242: 11059, 5555: 0, 1312: 243}  # Xorg is graphics
    assert all(p.mig_uuid is None and p.gpu_index == 0 for p in procs.values())


def test_process_identity_comes_from_proc(fake_pynvml: Installer, tmp_path: Path) -> None:
    fake_pynvml("rtx3090ti")
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "comm").write_text("ollama\n")
    # the real uid (who started it), not the effective one of a setuid program
    (tmp_path / "4242" / "status").write_text("Name:\tollama\nUid:\t999\t0\t0\t0\nGid:\t999\t999\t999\t999\n")
    procs = {p.pid: p for p in NvmlTelemetry(proc_root=tmp_path).processes()}
    assert procs[4242].name == "ollama" and procs[4242].uid == 999
    assert procs[5555].name == "" and procs[5555].uid is None


def test_v1_memory_fallback_keeps_free_memory_right(fake_pynvml: Installer) -> None:
    m = fake_pynvml("rtx3090ti", memory_v2=False)
    t = NvmlTelemetry()
    (gpu,) = t.gpus()
    assert (gpu.reserved_mib, gpu.used_mib) == (0, 11315 + 256)
    assert gpu.total_mib - gpu.reserved_mib - gpu.used_mib == 24564 - 256 - 11315
    t.gpus()
    assert m.state["calls"]["nvmlDeviceGetMemoryInfo"] == 3  # v2 refused once, then v1 only


def test_bytes_round_against_free_memory() -> None:
    data = json.loads((NVML_DIR / "rtx3090ti.json").read_text())
    data["devices"][0]["memory"] = {"total": (1 << 30) + 5, "reserved": (1 << 20) + 1, "used": 1}
    (gpu,) = NvmlTelemetry(pynvml_double.build(data)).gpus()
    assert (gpu.total_mib, gpu.reserved_mib, gpu.used_mib) == (1024, 2, 1)


def test_minor_number_not_supported_is_none() -> None:
    data = json.loads((NVML_DIR / "rtx3090ti.json").read_text())
    data["devices"][0]["minor"] = None
    assert NvmlTelemetry(pynvml_double.build(data)).gpus()[0].minor is None


def test_static_facts_are_read_once(fake_pynvml: Installer) -> None:
    m = fake_pynvml("rtx3090ti")
    t = NvmlTelemetry()
    t.gpus()
    t.gpus()
    assert m.state["calls"]["nvmlDeviceGetUUID"] == 1 and m.state["calls"]["nvmlDeviceGetMemoryInfo"] == 2


def test_init_failure_names_the_cause(fake_pynvml: Installer) -> None:
    fake_pynvml("rtx3090ti", init_error=pynvml_double.NVML_ERROR_LIBRARY_NOT_FOUND)
    with pytest.raises(TelemetryError, match=r"NVML did not initialise .*: NVML Shared Library Not Found"):
        select("nvml")


def test_nvml_errors_carry_context(fake_pynvml: Installer) -> None:
    fake_pynvml("h100-mig", fail={"nvmlDeviceGetMemoryInfo": pynvml_double.NVML_ERROR_GPU_IS_LOST})
    with pytest.raises(TelemetryError, match="NVML: could not read GPU 0 memory: GPU is lost") as info:
        NvmlTelemetry().gpus()
    assert isinstance(info.value.__cause__, pynvml_double.NVMLError)


def test_close_is_idempotent_and_final(fake_pynvml: Installer) -> None:
    m = fake_pynvml("rtx3090ti")
    with NvmlTelemetry() as t:
        t.gpus()
    t.close()
    assert m.state["shutdown"] == 1
    with pytest.raises(TelemetryError, match="closed"):
        t.gpus()


def test_a_failing_shutdown_does_not_mask_the_error_being_handled(fake_pynvml: Installer) -> None:
    fake_pynvml("rtx3090ti", fail={"nvmlShutdown": pynvml_double.NVML_ERROR_GPU_IS_LOST})
    with pytest.raises(KeyError, match="the real problem"), NvmlTelemetry():
        raise KeyError("the real problem")


def test_missing_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(ConfigError, match="pip install nvidia-ml-py"):
        NvmlTelemetry()


# --------------------------------------------------------------------------- real NVML


@pytest.fixture
def real_nvml() -> NvmlTelemetry:
    try:
        import pynvml
    except ImportError:
        pytest.skip("nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        pytest.skip(f"no usable NVIDIA GPU here (NVML: {e})")
    pynvml.nvmlShutdown()
    return NvmlTelemetry(pynvml)


@pytest.mark.gpu
def test_real_nvml_reads_gpus_and_processes(real_nvml: NvmlTelemetry) -> None:
    with real_nvml as t:
        gpus = t.gpus()
        assert gpus, "NVML initialised but reports no GPU"
        for g in gpus:
            assert g.uuid.startswith("GPU-") and g.total_mib > g.reserved_mib >= 0 and 0 <= g.used_mib <= g.total_mib
            assert g.minor is not None and g.pci_bus_id
            assert all(m.uuid.startswith("MIG-") and m.memory_mib <= g.total_mib for m in g.mig_instances)
        assert {p.gpu_index for p in t.processes()} <= {g.index for g in gpus}
