"""The fake backend: presets with real SKU numbers, and the live overlay state file."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from slurm_gpuarb.errors import ConfigError, TelemetryError
from slurm_gpuarb.model import GpuProcess
from slurm_gpuarb.telemetry import fake
from slurm_gpuarb.telemetry.fake import (
    FakeTelemetry,
    add_process,
    clear,
    load_preset,
    overlay_path,
    presets,
    read_overlay,
    remove_process,
    set_used_extra,
)

REQUIRED = {
    "rtx3060-12g", "rtx3090-24g", "rtx3090ti-24g", "rtx4090-24g", "a100-40g", "a100-80g", "h100-80g",
    "h100-80g-mig-7x1g", "dgx-h100", "h100-nvl-94g", "h200-141g",
}
SKU_KEYS = {"rtx3060-12g", "rtx3090-24g", "rtx3090ti-24g", "rtx4090-24g", "a100-40g", "a100-80g", "h100-80g",
            "h100-nvl-94g", "h200-141g"}


def test_every_required_preset_ships() -> None:
    assert set(presets()) >= REQUIRED
    assert presets() == sorted(presets())


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_preset_gpus_carry_a_known_sku_and_stable_ids(name: str) -> None:
    gpus = FakeTelemetry(name).gpus()
    assert gpus and all(g.sku in SKU_KEYS for g in gpus)
    assert [g.uuid for g in gpus] == [f"GPU-fake-{name}-{i}" for i in range(len(gpus))]
    assert [g.minor for g in gpus] == list(range(len(gpus)))


@pytest.mark.parametrize(("name", "total", "gpu_name"), [
    ("rtx3060-12g", 12288, "NVIDIA GeForce RTX 3060"),
    ("rtx3090ti-24g", 24564, "NVIDIA GeForce RTX 3090 Ti"),
    ("a100-40g", 40960, "NVIDIA A100-SXM4-40GB"),
    ("a100-80g", 81920, "NVIDIA A100-SXM4-80GB"),
    ("h100-80g", 81559, "NVIDIA H100 80GB HBM3"),
])
def test_preset_totals_are_what_nvml_reports(name: str, total: int, gpu_name: str) -> None:
    (gpu,) = FakeTelemetry(name).gpus()
    assert (gpu.total_mib, gpu.name) == (total, gpu_name)


def test_h100_reserves_about_half_a_gib() -> None:
    (gpu,) = FakeTelemetry("h100-80g").gpus()
    assert 400 <= gpu.reserved_mib <= 600 and not gpu.mig_enabled


def test_rtx3090ti_carries_the_ollama_of_the_user_story() -> None:
    t = FakeTelemetry("rtx3090ti-24g")
    assert t.processes() == [GpuProcess(pid=4242, gpu_index=0, used_mib=11059, name="ollama", uid=999,
                                        user="ollama")]
    assert t.gpus()[0].used_mib == 11059


def test_h100_mig_preset_has_seven_1g10gb_instances() -> None:
    (gpu,) = FakeTelemetry("h100-80g-mig-7x1g").gpus()
    assert gpu.mig_enabled and len(gpu.mig_instances) == 7
    assert {m.profile for m in gpu.mig_instances} == {"1g.10gb"}
    assert {m.memory_mib for m in gpu.mig_instances} == {9984}
    assert sorted(m.placement_start for m in gpu.mig_instances if m.placement_start is not None) == list(range(7))
    assert len({m.gi_id for m in gpu.mig_instances}) == 7
    assert len({m.uuid for m in gpu.mig_instances}) == 7 and all(m.uuid.startswith("MIG-fake-")
                                                                  for m in gpu.mig_instances)


def test_dgx_h100_has_eight_distinct_gpus() -> None:
    gpus = FakeTelemetry("dgx-h100").gpus()
    assert len(gpus) == 8 and {g.sku for g in gpus} == {"h100-80g"}
    assert len({g.pci_bus_id for g in gpus}) == 8 and gpus[0].pci_bus_id == "00000000:1B:00.0"


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'rtx3090ti-24g'\?.*presets: a100-40g"):
        FakeTelemetry("rtx3090-ti")
    with pytest.raises(ConfigError, match=r"unknown fake telemetry preset '\.\./h100-80g'"):
        load_preset("../h100-80g")


def test_a_bad_preset_file_names_file_and_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.json").write_text(json.dumps(
        {"version": 1, "gpus": [{"name": "X", "total_mib": 1024, "reserved_mib": 0, "totl": 3}]}))
    monkeypatch.setattr(fake, "PRESET_DIR", tmp_path)
    load_preset.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"broken.json: unknown key 'totl' in gpus\[0\]"):
            load_preset("broken")
    finally:
        load_preset.cache_clear()


# --------------------------------------------------------------------------- overlay


def test_without_state_the_preset_shows_as_shipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPUARB_FAKE_STATE", raising=False)
    t = FakeTelemetry("h100-80g", node="n1")
    assert t.overlay_path is None and t.processes() == [] and t.gpus()[0].used_mib == 0


def test_an_added_process_shows_up_live(fake_state: Path) -> None:
    t = FakeTelemetry("rtx3090ti-24g", node="n1")
    worker = GpuProcess(pid=31337, gpu_index=0, used_mib=8192, name="python3", uid=1000, user="alice", job_id="12")
    add_process(fake_state, "n1", worker)
    assert worker in t.processes()
    assert t.gpus()[0].used_mib == 11059 + 8192
    assert (fake_state / "n1.json").is_file()


def test_overlays_are_per_node(fake_state: Path) -> None:
    add_process(fake_state, "n1", GpuProcess(pid=7, gpu_index=0, used_mib=100))
    n2 = FakeTelemetry("h100-80g", node="n2")
    default = FakeTelemetry("h100-80g")
    assert n2.processes() == [] and default.processes() == []
    add_process(fake_state, None, GpuProcess(pid=8, gpu_index=0, used_mib=200))
    assert [p.pid for p in default.processes()] == [8]
    assert default.overlay_path == fake_state / "default.json"


def test_removing_the_preset_ollama_and_bringing_it_back(fake_state: Path) -> None:
    t = FakeTelemetry("rtx3090ti-24g", node="ws")
    remove_process(fake_state, "ws", 4242)
    assert t.processes() == [] and t.gpus()[0].used_mib == 0
    remove_process(fake_state, "ws", 4242)  # idempotent
    assert read_overlay(overlay_path(fake_state, "ws")).remove == (4242,)
    bigger = GpuProcess(pid=4242, gpu_index=0, used_mib=12000, name="ollama", uid=999, user="ollama")
    add_process(fake_state, "ws", bigger)
    assert t.processes() == [bigger] and t.gpus()[0].used_mib == 12000


def test_added_process_with_a_preset_pid_replaces_it(fake_state: Path) -> None:
    t = FakeTelemetry("rtx3090ti-24g", node="ws")
    add_process(fake_state, "ws", GpuProcess(pid=4242, gpu_index=0, used_mib=2048, name="ollama"))
    assert [(p.pid, p.used_mib) for p in t.processes()] == [(4242, 2048)]


def test_used_extra_counts_memory_without_a_process(fake_state: Path) -> None:
    t = FakeTelemetry("dgx-h100", node="dgx1")
    set_used_extra(fake_state, "dgx1", 3, 1500)
    assert [g.used_mib for g in t.gpus()] == [0, 0, 0, 1500, 0, 0, 0, 0]
    assert t.processes() == []
    set_used_extra(fake_state, "dgx1", 3, 0)
    assert t.gpus()[3].used_mib == 0


def test_clear_restores_the_preset(fake_state: Path) -> None:
    t = FakeTelemetry("rtx3090ti-24g", node="ws")
    remove_process(fake_state, "ws", 4242)
    set_used_extra(fake_state, "ws", 0, 64)
    clear(fake_state, "ws")
    clear(fake_state, "ws")  # nothing to clear is fine
    assert [p.pid for p in t.processes()] == [4242] and t.gpus()[0].used_mib == 11059


def test_process_in_a_mig_instance(fake_state: Path) -> None:
    t = FakeTelemetry("h100-80g-mig-7x1g", node="mig1")
    mig = t.gpus()[0].mig_instances[2].uuid
    add_process(fake_state, "mig1", GpuProcess(pid=5, gpu_index=0, used_mib=9000, mig_uuid=mig))
    assert t.processes()[0].mig_uuid == mig
    add_process(fake_state, "mig1", GpuProcess(pid=6, gpu_index=0, used_mib=1000, mig_uuid=mig))
    with pytest.raises(TelemetryError, match=f"10000 MiB used in MIG instance {mig}, more than its 9984 MiB"):
        t.gpus()


def test_overlay_mistakes_name_the_file(fake_state: Path) -> None:
    t = FakeTelemetry("h100-80g", node="n1")
    path = fake_state / "n1.json"
    add_process(fake_state, "n1", GpuProcess(pid=9, gpu_index=1, used_mib=10))
    with pytest.raises(TelemetryError, match=f"{path}: process 9 is on GPU 1, but there are 1 GPUs"):
        t.processes()
    remove_process(fake_state, "n1", 9)
    add_process(fake_state, "n1", GpuProcess(pid=10, gpu_index=0, used_mib=90000))
    with pytest.raises(TelemetryError, match="90000 MiB used on GPU 0, more than its 81047 MiB"):
        t.gpus()
    add_process(fake_state, "n1", GpuProcess(pid=10, gpu_index=0, used_mib=1, mig_uuid="MIG-nope"))
    with pytest.raises(TelemetryError, match="names MIG instance MIG-nope, which GPU 0 does not have"):
        t.gpus()


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "is not valid JSON"),
    ('["a list"]', "the overlay must be a JSON object"),
    ('{"add": [], "remvoe": [1]}', "unknown key 'remvoe' in the overlay"),
    ('{"add": [{"pid": 1, "gpu_index": 0}]}', r"add\[0\] needs 'used_mib'"),
    ('{"add": [{"pid": 1, "gpu_index": 0, "used_mib": -5}]}', "must be an integer >= 0"),
    ('{"remove": ["4242"]}', "must be a list of pids"),
    ('{"used_extra_mib": {"gpu0": 5}}', "keys must be GPU indices"),
    ('{"version": 2}', "unsupported overlay version 2"),
])
def test_malformed_overlay_is_a_telemetry_error_naming_the_file(fake_state: Path, text: str, expected: str) -> None:
    fake_state.mkdir()
    (fake_state / "n1.json").write_text(text)
    t = FakeTelemetry("h100-80g", node="n1")
    with pytest.raises(TelemetryError, match=expected) as info:
        t.gpus()
    assert str(fake_state / "n1.json") in str(info.value)


def test_node_names_cannot_escape_the_state_dir(fake_state: Path) -> None:
    for bad in ("../etc", "a/b", "..", ".hidden"):
        with pytest.raises(ConfigError, match="cannot name a fake telemetry overlay file"):
            FakeTelemetry("h100-80g", node=bad)


def test_concurrent_writers_lose_nothing(fake_state: Path) -> None:
    def writer(base: int) -> None:
        for i in range(10):
            add_process(fake_state, "busy", GpuProcess(pid=base + i, gpu_index=0, used_mib=1))

    threads = [threading.Thread(target=writer, args=(1000 * k,)) for k in range(1, 7)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(FakeTelemetry("h100-80g", node="busy").processes()) == 60
    assert sorted(p.name for p in fake_state.iterdir()) == ["busy.json", "busy.json.lock"]  # no temp files left


def test_overlay_file_round_trips(fake_state: Path) -> None:
    p = GpuProcess(pid=3, gpu_index=0, used_mib=5, name="vllm", uid=0, user="root", mig_uuid=None, job_id="9")
    written = add_process(fake_state, None, p)
    assert read_overlay(overlay_path(fake_state, None)) == written
    raw = json.loads((fake_state / "default.json").read_text())
    assert raw["version"] == 1 and raw["add"] == [{"pid": 3, "gpu_index": 0, "used_mib": 5, "name": "vllm",
                                                    "uid": 0, "user": "root", "job_id": "9"}]
