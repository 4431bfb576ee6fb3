"""Sizing a Slurm job's lease from its allocation: GRES → GPUs, the size by mode, and the exports."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from slurm_gpuarb import engines
from slurm_gpuarb.config import Config, GpuConfig, NodeConfig, load
from slurm_gpuarb.daemon import jobs
from slurm_gpuarb.errors import NodeFault, ProtocolError
from slurm_gpuarb.model import Decision, Engine, GpuInfo, Lease, LeaseSpec, LeaseState, Outcome, Share, Vram
from slurm_gpuarb.protocol import Grant
from slurm_gpuarb.telemetry.fake import load_preset

DGX = list(load_preset("dgx-h100").gpus)
MIG = list(load_preset("h100-80g-mig-7x1g").gpus)
RTX = list(load_preset("rtx3090ti-24g").gpus)


@pytest.mark.parametrize(
    ("text", "expected"),
    [(None, ()), ("", ()), (" ", ()), ("0", (0,)), ("0,3", (0, 3)), ("3,0", (3, 0)), ("0-2,5", (0, 1, 2, 5)),
     ("1,1", (1,))],
)
def test_parse_gres(text: str | None, expected: tuple[int, ...]) -> None:
    assert jobs.parse_gres(text) == expected


@pytest.mark.parametrize("text", ["a", "0,", "0;1", "-1", "3-1", "99999", "0 1"])
def test_parse_gres_refuses_what_slurmd_never_writes(text: str) -> None:
    with pytest.raises(ProtocolError, match="SLURM_JOB_GPUS"):
        jobs.parse_gres(text)


def test_gres_slots_follow_the_rendered_gres_conf(cfg: Config) -> None:
    n1 = jobs.gres_slots(cfg, "n1")
    assert n1 is not None and [(s.gres_index, s.gpu_index, s.mode) for s in n1] == [(i, i, "whole") for i in range(8)]
    assert n1[5].device == "/dev/nvidia5"
    n3 = jobs.gres_slots(cfg, "n3")
    assert n3 is not None and [(s.gpu_index, s.mig_position, s.profile) for s in n3] == [
        (0, j, "1g.10gb") for j in range(7)]
    assert jobs.gres_slots(cfg, "n4") is None  # not in the inventory: GRES index = NVML index


def test_gres_slots_map_minors_and_mixed_nodes_explicitly(cfg: Config) -> None:
    # NVML 0 is /dev/nvidia1 and NVML 1 is /dev/nvidia0; a MIG GPU's instances come after them
    node = NodeConfig("x1", "fake:dgx-h100", (
        GpuConfig(0, "h100-80g", "whole", minor=1), GpuConfig(1, "h100-80g", "whole", minor=0),
        GpuConfig(2, "h100-80g", "mig", mig=("3g.40gb", "3g.40gb"))))
    mixed = replace(cfg, nodes=(*cfg.nodes, node))
    slots = jobs.gres_slots(mixed, "x1")
    assert slots is not None
    assert [(s.gres_index, s.gpu_index, s.device, s.mig_position) for s in slots] == [
        (0, 0, "/dev/nvidia1", None), (1, 1, "/dev/nvidia0", None), (2, 2, "/dev/nvidia2", 0),
        (3, 2, "/dev/nvidia3", 1)]


def _gres_map(cfg: Config, node: str, entries: object) -> None:
    cfg.gres_map_dir.mkdir(parents=True, exist_ok=True)
    (cfg.gres_map_dir / f"{node}.json").write_text(json.dumps({"version": 1, "node": node, "autodetect": "nvml",
                                                                "gres": entries}))


def test_a_rendered_gres_map_names_mig_instances_by_uuid(cfg: Config) -> None:
    # Slurm's order (AutoDetect=nvml sorts the lines itself) is not the inventory's: the map decides.
    order = [6, 5, 4, 3, 2, 1, 0]
    _gres_map(cfg, "n3", [{"index": k, "gpu": 0, "type": "1g.10gb", "uuid": MIG[0].uuid,
                           "mig_uuid": MIG[0].mig_instances[j].uuid, "files": ["/dev/nvidia0"]}
                          for k, j in enumerate(order)])
    s = _size(cfg, "n3", LeaseSpec(mig="1g.10gb"), (1,), MIG)
    assert (s.mode, s.mig_uuids) == ("mig", (MIG[0].mig_instances[5].uuid,))
    g = jobs.make_grant(BASE, s, *_lease(s, 9984))
    assert g.exports["CUDA_VISIBLE_DEVICES"] == MIG[0].mig_instances[5].uuid
    # Without the map: the inventory's order.
    (cfg.gres_map_dir / "n3.json").unlink()
    assert _size(cfg, "n3", LeaseSpec(mig="1g.10gb"), (1,), MIG).mig_uuids == (MIG[0].mig_instances[1].uuid,)


def test_a_gres_map_instance_that_is_gone_is_a_node_fault(cfg: Config) -> None:
    _gres_map(cfg, "n3", [{"index": 0, "gpu": 0, "type": "1g.10gb", "mig_uuid": "MIG-not-there", "files": []}])
    with pytest.raises(NodeFault, match=r"MIG-not-there.*its MIG layout changed since `gpuarb discover`"):
        _size(cfg, "n3", None, (0,), MIG)


@pytest.mark.parametrize("doc", ["{not json", "[]", '{"version": 1, "node": "n1", "gres": []}',
                                 '{"version": 9, "node": "n3", "gres": []}',
                                 '{"version": 1, "node": "n3", "gres": [{"index": 1, "gpu": 0}]}',
                                 '{"version": 1, "node": "n3", "gres": [{"index": 0, "gpu": 7}]}',
                                 '{"version": 1, "node": "n3", "gres": [[0, 0]]}'])
def test_a_gres_map_gpuarb_did_not_write_is_a_node_fault_naming_the_file(cfg: Config, doc: str) -> None:
    cfg.gres_map_dir.mkdir(parents=True)
    (cfg.gres_map_dir / "n3.json").write_text(doc)
    with pytest.raises(NodeFault, match=r"the GRES map .*n3\.json is not one gpuarb render wrote: .*re-run "
                                        r"`gpuarb discover` and `gpuarb render` for node n3"):
        jobs.gres_slots(cfg, "n3")


def test_pick_checks_gres_and_telemetry(cfg: Config) -> None:
    slots = jobs.gres_slots(cfg, "n1")
    assert [s.gpu_index for s in jobs.pick(slots, (2, 7), "n1", DGX)] == [2, 7]
    with pytest.raises(NodeFault, match="GRES index 8 on node n1"):
        jobs.pick(slots, (8,), "n1", DGX)
    with pytest.raises(NodeFault, match=r"Slurm gave GPU 7 \(GRES index 7\) on node n1, but telemetry sees"):
        jobs.pick(slots, (7,), "n1", DGX[:4])
    assert [s.gpu_index for s in jobs.pick(None, (1,), "n9", DGX)] == [1]
    empty_mig = [replace(MIG[0], mig_instances=MIG[0].mig_instances[:2])]
    with pytest.raises(NodeFault, match="MIG instance 5 of GPU 0 on node n3, but the GPU has 2 instances"):
        jobs.pick(jobs.gres_slots(cfg, "n3"), (5,), "n3", empty_mig)


def _size(cfg: Config, node: str, spec: LeaseSpec | None, gres: tuple[int, ...], gpus: list[GpuInfo],
          **kw: object) -> jobs.Sizing:
    chosen = jobs.pick(jobs.gres_slots(cfg, node), gres, node, gpus)
    return jobs.size_job(cfg, node, spec, chosen, gpus, **kw)  # type: ignore[arg-type]


def test_whole_sizes_keep_class_min_engine_and_drop_what_slurm_decides(cfg: Config) -> None:
    user = LeaseSpec(vram=Vram(percent=50), gpus=4, prio="llm", min=Vram(mib=1024), ttl_s=60, wait_s=5,
                     engine=Engine.TF)
    s = _size(cfg, "n1", user, (1, 0), DGX)
    assert (s.mode, s.pinned, s.pinned_mig_uuid) == ("whole", (0, 1), None)
    assert s.spec == LeaseSpec(vram=Vram(mib=81559 // 2), prio="llm", min=Vram(mib=1024), engine=Engine.TF)


def test_whole_size_subtracts_standing_reservations_of_that_gpu(cfg: Config) -> None:
    s = _size(cfg, "n2", None, (0,), RTX, slurm_asked=True)
    assert (s.mode, s.spec.vram) == ("whole", Vram(mib=24564 - 354 - 1024 - 12288))


def test_shard_sources_in_order(cfg: Config) -> None:
    canonical = LeaseSpec(vram=Vram(mib=6144), shards=12)
    assert _size(cfg, "n2", canonical, (0,), RTX, slurm_asked=True, slurm_shards=3).shards == 12
    s = _size(cfg, "n2", LeaseSpec(vram=Vram(mib=1000)), (0,), RTX, slurm_asked=True, slurm_shards=3)
    assert (s.shards, s.shards_from, s.spec.vram) == (3, "slurm", Vram(mib=1536))
    s = _size(cfg, "n2", LeaseSpec(vram=Vram(mib=1000)), (0,), RTX)
    assert (s.shards, s.shards_from) == (2, "vram")
    s = _size(cfg, "n2", None, (0,), RTX, partition="shard")
    assert (s.shards, s.shards_from) == (1, "guess") and "shard count unknown" in s.notes[0]
    assert s.context() == {"mode": "shard", "gpus": [0], "shards": 1, "shards_from": "guess",
                           "notes": list(s.notes)}


def test_partition_mode_decides_a_shard_gpu_used_whole(cfg: Config) -> None:
    assert _size(cfg, "n2", None, (0,), RTX, partition="llm").mode == "whole"
    assert _size(cfg, "n2", None, (0,), RTX, partition="shard").mode == "shard"
    assert _size(cfg, "n2", None, (0,), RTX).mode == "shard"  # no partition: the GPU's own mode
    assert _size(cfg, "n2", None, (0,), RTX, partition="unknown").mode == "shard"


def test_mig_sizes_take_the_instance_and_export_every_one(cfg: Config) -> None:
    s = _size(cfg, "n3", LeaseSpec(vram=Vram(mib=20000), prio="batch"), (6, 1), MIG)
    assert s.mode == "mig" and s.pinned == (0,)
    assert s.mig_uuids == ("MIG-fake-h100-80g-mig-7x1g-0-6", "MIG-fake-h100-80g-mig-7x1g-0-1")
    assert s.spec.vram == Vram(mib=9984) and s.spec.mig == "1g.10gb"
    assert any("2 MIG instances" in n for n in s.notes) and any("vram=20000MiB is more" in n for n in s.notes)


@pytest.mark.parametrize(
    ("part", "total", "expected"),
    [(6144, 81559, "0.0753"), (81559, 81559, "1.0000"), (99, 100, "0.9900"), (1, 100, "0.0100"),
     (0, 100, "0.0000"), (200, 100, "1.0000"), (5, 0, "0.0000")],
)
def test_fraction_rounds_down(part: int, total: int, expected: str) -> None:
    assert jobs.fraction(part, total) == expected


def test_engine_exports() -> None:
    assert jobs.engine_exports(None, 6144, 81559) == {}
    assert jobs.engine_exports(Engine.VLLM, 40000, 81559) == {
        "GPUARB_VLLM_GPU_MEMORY_UTILIZATION": "0.4904", "GPUARB_VLLM_ARGS": "--gpu-memory-utilization 0.4904"}
    assert jobs.engine_exports(Engine.OLLAMA, 2, 10, 1) == {
        "OLLAMA_GPU_OVERHEAD": str(7 * 1024 * 1024), "OLLAMA_MAX_LOADED_MODELS": "1",
        "GPUARB_OLLAMA_MAX_VRAM_BYTES": str(2 * 1024 * 1024)}
    assert jobs.engine_exports(Engine.TF, 5, 10) == {
        "GPUARB_TF_MEMORY_FRACTION": "0.5000", "GPUARB_TF_SERVING_ARGS": "--per_process_gpu_memory_fraction=0.5000"}
    assert jobs.engine_exports(Engine.TORCH, 5, 10) == {"GPUARB_TORCH_MEMORY_FRACTION": "0.5000"}


def _lease(s: jobs.Sizing, vram: int, prio: str = "batch") -> tuple[Decision, Lease]:
    lease = Lease(id="L1", node="n", gpus=s.pinned, vram_mib=vram, prio=prio, priority=10, preemptible=True,
                  state=LeaseState.GRANTED, created_at=1.0, mig_uuid=s.pinned_mig_uuid, job_id="5")
    return Decision(Outcome.GRANT, "n", "fits", prio, vram, vram, s.pinned, s.pinned_mig_uuid), lease


BASE = Grant(job_id="5", restart_count=0, node="n")


def test_make_grant_for_a_lease_and_for_a_refusal(cfg: Config) -> None:
    s = _size(cfg, "n3", LeaseSpec(vram=Vram(mib=1024), engine=Engine.OLLAMA), (2,), MIG)
    g = jobs.make_grant(BASE, s, *_lease(s, 9984))
    assert g.exports == {"GPUARB_VRAM_MB": "9984", "GPUARB_LEASE_ID": "L1", "GPUARB_PRIO": "batch",
                         "CUDA_VISIBLE_DEVICES": "MIG-fake-h100-80g-mig-7x1g-0-2",
                         # the instance is the job's whole: Ollama may plan with all it sees free
                         "OLLAMA_GPU_OVERHEAD": "0", "OLLAMA_MAX_LOADED_MODELS": "1",
                         "GPUARB_OLLAMA_MAX_VRAM_BYTES": str(9984 * 1024 * 1024)}
    no = jobs.make_grant(BASE, s, Decision(Outcome.WAIT, "n3", "instance taken by pid 5.", "batch", 9984), None)
    assert (no.lease_id, no.exports, no.prio) == (None, {}, "batch")
    assert no.refused == "gpuarb: the job's GPU memory is not available on n: instance taken by pid 5."


def test_ollama_overhead_leaves_the_rest_of_a_whole_gpu(cfg: Config) -> None:
    s = _size(cfg, "n1", LeaseSpec(vram=Vram(mib=6144), prio="llm", engine=Engine.OLLAMA), (3,), DGX)
    assert (s.reserved, s.uuids) == ({3: DGX[3].reserved_mib}, (DGX[3].uuid,))
    g = jobs.make_grant(BASE, s, *_lease(s, 6144, "llm"))
    # Ollama sees total − driver reserve free on a GPU the job has alone: all but the grant is overhead
    assert int(g.exports["OLLAMA_GPU_OVERHEAD"]) == (81559 - DGX[3].reserved_mib - 6144) * 1024 * 1024


@pytest.mark.parametrize(("prio", "cap"), [("batch", "30"), ("llm", None)])
def test_share_mps_carries_the_class_thread_cap_and_the_pinned_limit(cfg: Config, prio: str, cap: str | None) -> None:
    assert cfg.policy.classes["batch"].mps_thread_percent == 30 and cfg.policy.classes["llm"].mps_thread_percent is None
    s = _size(cfg, "n1", LeaseSpec(vram=Vram(mib=4096), prio=prio, share=Share.MPS), (2,), DGX)
    assert s.mps_thread_percent == (None if cap is None else int(cap))
    g = jobs.make_grant(BASE, s, *_lease(s, 4096, prio))
    mps = {k: v for k, v in g.exports.items() if "MPS" in k or k == "GPUARB_SHARE"}
    expected = {"GPUARB_SHARE": "mps", "GPUARB_MPS_DEVICE": DGX[2].uuid,
                "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={4096 + engines.CUDA_CONTEXT_MIB}M"}
    if cap is not None:
        expected["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = cap
    assert mps == expected


def test_share_mps_on_a_shard_gpu_keeps_the_cap(cfg: Config) -> None:
    s = _size(cfg, "n2", LeaseSpec(vram=Vram(mib=2048), share=Share.MPS), (0,), RTX, partition="shard")
    assert s.mode == "shard" and s.mps_thread_percent == 30  # the default class is batch
    assert jobs.make_grant(BASE, s, *_lease(s, 2048)).exports["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"


def test_no_mps_knobs_without_share_mps(cfg: Config) -> None:
    for spec in (LeaseSpec(vram=Vram(mib=4096)), LeaseSpec(vram=Vram(mib=4096), share=Share.SHARD)):
        s = _size(cfg, "n1", spec, (0,), DGX)
        assert s.mps_thread_percent is None
        exports = jobs.make_grant(BASE, s, *_lease(s, 4096)).exports
        assert not any("MPS" in k for k in exports) and "GPUARB_SHARE" not in exports


def test_share_mps_on_several_gpus_has_no_server_knobs(cfg: Config) -> None:
    s = _size(cfg, "n1", LeaseSpec(vram=Vram(mib=4096), share=Share.MPS), (0, 1), DGX)
    exports = jobs.make_grant(BASE, s, *_lease(s, 4096)).exports
    # the Prolog starts one server per GPU: a two-GPU lease runs time-sliced, with its thread cap
    assert exports["GPUARB_SHARE"] == "mps" and exports["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert "GPUARB_MPS_DEVICE" not in exports and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in exports


def test_mig_leases_never_share_by_mps(cfg: Config) -> None:
    s = _size(cfg, "n3", LeaseSpec(vram=Vram(mib=4096), share=Share.MPS), (1,), MIG)
    assert s.spec.share is None and s.mps_thread_percent is None
    assert "GPUARB_SHARE" not in jobs.make_grant(BASE, s, *_lease(s, 9984)).exports


def test_the_daemon_reads_the_gres_map_render_writes() -> None:
    repo = Path(__file__).resolve().parents[2]
    maps = repo / "tests" / "data" / "golden" / "dgx-h100" / "gres-map"
    dgx = load(repo / "templates" / "examples" / "dgx-h100.toml", env={}, overrides={"gres_map_dir": str(maps)})
    written = json.loads((maps / "dgx01.json").read_text())["gres"]
    slots = jobs.gres_slots(dgx, "dgx01")
    assert slots is not None and len(slots) == len(written) == 56
    assert [(s.gres_index, s.gpu_index, s.mig_uuid, s.profile, s.mode) for s in slots] == [
        (e["index"], e["gpu"], e["mig_uuid"], e["type"], "mig") for e in written]
