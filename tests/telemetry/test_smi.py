"""The nvidia-smi backend on replayed fixtures, and its parsers on hand-written garbage."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from slurm_gpuarb import subproc
from slurm_gpuarb.errors import TelemetryError
from slurm_gpuarb.model import GpuProcess
from slurm_gpuarb.subproc import CommandNotFound, CommandTimeout, Reply
from slurm_gpuarb.telemetry import smi
from slurm_gpuarb.telemetry.smi import SmiTelemetry, parse_apps_csv, parse_gpu_csv, parse_list, parse_query

from .conftest import SMI_DIR, smi_mapping

Replayer = Callable[[str], subproc.Replay]


@pytest.fixture
def no_proc(tmp_path: Path) -> Path:
    """A /proc in which no fixture pid is visible (the host's pid 4242 is not Ollama)."""
    return tmp_path


def test_rtx3090ti(smi_replay: Replayer, no_proc: Path) -> None:
    smi_replay("rtx3090ti")
    t = SmiTelemetry(proc_root=no_proc)
    (gpu,) = t.gpus()
    assert (gpu.index, gpu.name, gpu.total_mib, gpu.reserved_mib, gpu.used_mib) == (
        0, "NVIDIA GeForce RTX 3090 Ti", 24564, 256, 11315)
    assert gpu.uuid.startswith("GPU-") and gpu.pci_bus_id == "00000000:01:00.0"
    assert gpu.minor == 0 and not gpu.mig_enabled and gpu.mig_instances == ()
    # without /proc the name is the basename of nvidia-smi's process_name
    assert t.processes() == [GpuProcess(pid=4242, gpu_index=0, used_mib=11059, name="ollama")]


def test_minor_numbers_come_from_q_by_bus_id_not_index(smi_replay: Replayer) -> None:
    smi_replay("dgx-h100")
    gpus = SmiTelemetry().gpus()
    assert [g.index for g in gpus] == list(range(8))
    assert [g.minor for g in gpus] == [2, 3, 0, 1, 6, 7, 4, 5]


def test_minor_numbers_are_read_once_without_mig(smi_replay: Replayer) -> None:
    r = smi_replay("dgx-h100")
    t = SmiTelemetry()
    t.gpus()
    t.gpus()
    assert r.count(smi.GPU_ARGV) == 2 and r.count(smi.QUERY_ARGV) == 1 and r.count(smi.LIST_ARGV) == 0


def test_processes_map_gpu_uuid_to_index(smi_replay: Replayer, no_proc: Path) -> None:
    smi_replay("dgx-h100")
    procs = SmiTelemetry(proc_root=no_proc).processes()
    assert [(p.pid, p.gpu_index, p.used_mib, p.name) for p in procs] == [
        (31337, 0, 4096, "python3"), (5150, 7, 20480, "python3")]


def test_mig_instances_from_list_and_query(smi_replay: Replayer, no_proc: Path) -> None:
    r = smi_replay("h100-mig")
    t = SmiTelemetry(proc_root=no_proc)
    (gpu,) = t.gpus()
    assert gpu.mig_enabled and len(gpu.mig_instances) == 7
    assert [m.gi_id for m in gpu.mig_instances] == [7, 8, 9, 11, 12, 13, 14]
    assert {(m.profile, m.memory_mib, m.ci_id, m.placement_start) for m in gpu.mig_instances} == {
        ("1g.10gb", 9984, 0, None)}
    assert all(m.uuid.startswith("MIG-") for m in gpu.mig_instances)
    assert gpu.used_mib == 6235  # [N/A] for the parent: the MIG devices' Used, summed
    t.gpus()
    assert r.count(smi.QUERY_ARGV) == 2  # the MIG layout can change: read every time
    assert [(p.pid, p.used_mib, p.mig_uuid) for p in t.processes()] == [(2101, 0, None), (2102, 0, None)]


def test_old_driver_without_memory_reserved(smi_replay: Replayer) -> None:
    r = smi_replay("old-driver")
    t = SmiTelemetry(probe=True)
    (gpu,) = t.gpus()
    assert (gpu.total_mib, gpu.reserved_mib, gpu.used_mib, gpu.minor) == (12288, 0, 1200, 0)
    assert r.count(smi.GPU_ARGV) == 1 and r.count(smi.GPU_ARGV_OLD) == 2  # not asked again
    assert t.processes() == []


def test_missing_nvidia_smi_is_a_telemetry_error_from_command_not_found() -> None:
    missing = Reply(raises=FileNotFoundError(2, "No such file"))
    with subproc.replay({smi.GPU_ARGV: missing}), pytest.raises(TelemetryError, match="'nvidia-smi' was not") as info:
        SmiTelemetry(probe=True)
    assert isinstance(info.value.__cause__, CommandNotFound)


def test_hung_nvidia_smi_times_out() -> None:
    hung = Reply(raises=subprocess.TimeoutExpired(list(smi.GPU_ARGV), 2))
    with subproc.replay({smi.GPU_ARGV: hung}), pytest.raises(TelemetryError, match="did not finish within 2s") as info:
        SmiTelemetry(timeout=2).gpus()
    assert isinstance(info.value.__cause__, CommandTimeout)


def test_failing_query_is_not_mistaken_for_an_old_driver() -> None:
    reply = Reply(stdout="Unable to determine the device handle for GPU0000:01:00.0: Unknown Error", returncode=15)
    with subproc.replay({smi.GPU_ARGV: reply}) as r, pytest.raises(TelemetryError, match="Unknown Error"):
        SmiTelemetry().gpus()
    assert smi.GPU_ARGV_OLD not in r.calls


def test_process_on_an_unknown_gpu(smi_replay: Replayer) -> None:
    mapping = smi_mapping("rtx3090ti")
    mapping[smi.APPS_ARGV] = "77, GPU-00000000-0000-0000-0000-000000000000, 5, python\n"
    with subproc.replay(mapping), pytest.raises(TelemetryError, match="process 77 on GPU GPU-0000"):
        SmiTelemetry().processes()


def test_mig_device_missing_from_query(tmp_path: Path) -> None:
    mapping = smi_mapping("h100-mig")
    q = (SMI_DIR / "h100-mig" / "q.txt").read_text()
    mapping[smi.QUERY_ARGV] = q[: q.index("        MIG Device\n            Index                         : 1")]
    with subproc.replay(mapping), pytest.raises(TelemetryError, match=r"MIG device 1 .* does not describe it"):
        SmiTelemetry().gpus()


# --------------------------------------------------------------------------- parsers


def test_gpu_csv_tolerates_whitespace_and_unknowns() -> None:
    text = "  3 ,GPU-a ,  NVIDIA A100-SXM4-40GB , 40960,[Not Supported] , 7 ,00000000:07:00.0, Disabled \n\n"
    (row,) = parse_gpu_csv(text)
    assert (row.index, row.uuid, row.name, row.total_mib, row.reserved_mib, row.used_mib, row.mig_enabled) == (
        3, "GPU-a", "NVIDIA A100-SXM4-40GB", 40960, 0, 7, False)


@pytest.mark.parametrize(("line", "expected"), [
    ("0, GPU-a, X, 100", "expected 8 fields, got 4, in line '0, GPU-a, X, 100'"),
    ("0, GPU-a, X, lots, 0, 1, 00000000:01:00.0, Disabled", "memory.total is 'lots', not a number"),
    ("0, GPU-a, X, [N/A], 0, 1, 00000000:01:00.0, Disabled", "GPU 0 reports no total memory"),
    ("0, GPU-a, X, 100, 0, -1, 00000000:01:00.0, Disabled", "memory.used is negative"),
    ("0, GPU-a, X, 100, 0, 1, 00000000:01:00.0, Maybe", "MIG mode is 'Maybe'"),
    ("x, GPU-a, X, 100, 0, 1, 00000000:01:00.0, Disabled", "the index is 'x'"),
])
def test_gpu_csv_garbage_names_the_line(line: str, expected: str) -> None:
    with pytest.raises(TelemetryError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        parse_gpu_csv(line)


def test_apps_csv_keeps_commas_in_the_process_name_and_reads_na_as_zero() -> None:
    rows = parse_apps_csv("12, GPU-a, [N/A], python3 train.py --lr=1,2\n\nNo running processes found\n")
    assert [(r.pid, r.gpu_uuid, r.used_mib, r.process_name) for r in rows] == [
        (12, "GPU-a", 0, "python3 train.py --lr=1,2")]


@pytest.mark.parametrize(("text", "expected"), [
    ("12, GPU-a, 5", "expected 4 fields, got 3"),
    ("12, 0, 5, python", "'0' is not a GPU UUID"),
    ("pid, GPU-a, 5, python", "the pid is 'pid'"),
])
def test_apps_csv_garbage_names_the_line(text: str, expected: str) -> None:
    with pytest.raises(TelemetryError, match=expected):
        parse_apps_csv(text)


def test_query_parser_reads_minor_and_mig_devices() -> None:
    parsed = parse_query((SMI_DIR / "h100-mig" / "q.txt").read_text())
    (bus,) = parsed
    assert bus == "00000000:1B:00.0" and parsed[bus].minor == 0
    assert parsed[bus].mig_devices[0] == (7, 0, 9984, 4109)
    assert sorted(parsed[bus].mig_devices) == list(range(7))


def test_query_parser_rejects_incomplete_mig_devices() -> None:
    text = ("GPU 00000000:1B:00.0\n    Minor Number : N/A\n    MIG Devices\n        MIG Device\n"
            "            Index : 0\n    Accounting Mode : Disabled\n")
    with pytest.raises(TelemetryError, match="lacks Compute Instance ID, GPU Instance ID, Total, Used"):
        parse_query(text)


def test_query_parser_unknown_minor_is_none() -> None:
    assert parse_query("GPU 00000000:01:00.0\n    Minor Number : N/A\n")["00000000:01:00.0"].minor is None


def test_list_parser_strips_compute_instance_prefix_and_rejects_garbage() -> None:
    parsed = parse_list("GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-a)\n"
                        "  MIG 1c.3g.20gb    Device  0: (UUID: MIG-b)\n")
    assert parsed == {"GPU-a": [(0, "3g.20gb", "MIG-b")]}
    with pytest.raises(TelemetryError, match="cannot read line 'No devices were found'"):
        parse_list("No devices were found\n")
