"""SKU tables, NVML name lookup, MIG profile selection and shard arithmetic."""

from __future__ import annotations

import pytest

from slurm_gpuarb.errors import CapacityError
from slurm_gpuarb.skus import (
    SKUS,
    Sku,
    mig_profile,
    shards_for,
    shards_needed,
    sku,
    sku_for_nvml_name,
    smallest_mig_profile,
    usable_mib,
)

GIB = 1024
H100 = sku("h100-80g")


def test_every_requested_sku_is_in_the_table() -> None:
    assert set(SKUS) == {
        "rtx3060-12g",
        "rtx3090-24g",
        "rtx3090ti-24g",
        "rtx4090-24g",
        "a100-40g",
        "a100-80g",
        "h100-80g",
        "h100-nvl-94g",
        "h200-141g",
    }


def test_h100_profiles_are_the_numbers_nvml_reports() -> None:
    table = {p.name: (p.memory_mib, p.max_instances) for p in H100.mig_profiles}
    assert table == {
        "1g.10gb": (9984, 7),
        "1g.20gb": (20096, 4),
        "2g.20gb": (20096, 3),
        "3g.40gb": (40448, 2),
        "4g.40gb": (40448, 1),
        "7g.80gb": (81152, 1),
    }
    assert 256 <= H100.reserved_mib <= 768  # "about 0.5 GiB"


def test_placements_follow_the_mig_user_guide() -> None:
    starts = {p.name: p.placements for p in H100.mig_profiles}
    assert starts["1g.10gb"] == (0, 1, 2, 3, 4, 5, 6)
    assert starts["1g.20gb"] == (0, 2, 4, 6)
    assert starts["2g.20gb"] == (0, 2, 4)
    assert starts["3g.40gb"] == (0, 4)
    assert starts["4g.40gb"] == (0,)
    assert starts["7g.80gb"] == (0,)


@pytest.mark.parametrize("s", list(SKUS.values()), ids=list(SKUS))
def test_table_is_self_consistent(s: Sku) -> None:
    assert 0 < s.reserved_mib < s.total_mib // 8
    for p in s.mig_profiles:
        assert p.memory_mib <= s.total_mib, p
        assert all(start + p.size <= 8 for start in p.placements), p
        assert p.max_instances <= len(p.placements), p
        assert p.size == p.memory_slices, p
        assert p.name.startswith(f"{p.compute_slices}g."), p
    if s.mig_profiles:
        names = [p.name for p in s.mig_profiles]
        assert len(names) == len(set(names))
        # a GPU split into its largest profile holds no more than the whole GPU
        assert max(p.memory_mib for p in s.mig_profiles) <= s.total_mib


def test_geforce_cards_have_no_mig() -> None:
    for key in ("rtx3060-12g", "rtx3090-24g", "rtx3090ti-24g", "rtx4090-24g"):
        assert not sku(key).mig_capable
    assert sku("a100-40g").mig_capable


def test_sku_lookup_is_case_insensitive() -> None:
    assert sku(" H100-80G ") is H100


def test_unknown_sku_names_known_keys_and_suggests() -> None:
    with pytest.raises(CapacityError) as err:
        sku("h100-80")
    msg = str(err.value)
    assert "'h100-80'" in msg
    assert "rtx3060-12g" in msg  # lists what exists
    assert "did you mean 'h100-80g'" in msg


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-80g"),
        ("NVIDIA H100 PCIe", "h100-80g"),
        ("NVIDIA H100 NVL", "h100-nvl-94g"),
        ("NVIDIA H200", "h200-141g"),
        ("NVIDIA H200 NVL", "h200-141g"),
        ("NVIDIA GeForce RTX 3090 Ti", "rtx3090ti-24g"),
        ("NVIDIA GeForce RTX 3090", "rtx3090-24g"),
        ("NVIDIA GeForce RTX 3060", "rtx3060-12g"),
        ("NVIDIA GeForce RTX 4090", "rtx4090-24g"),
        ("NVIDIA A100-SXM4-40GB", "a100-40g"),
        ("NVIDIA A100-PCIE-40GB", "a100-40g"),
        ("NVIDIA A100-SXM4-80GB", "a100-80g"),
        ("NVIDIA A100 80GB PCIe", "a100-80g"),
    ],
)
def test_sku_for_nvml_name(name: str, key: str) -> None:
    found = sku_for_nvml_name(name)
    assert found is not None and found.key == key
    # the table's own total confirms the name
    assert sku_for_nvml_name(name, found.total_mib) is found


@pytest.mark.parametrize(
    "name",
    ["NVIDIA GeForce RTX 3060 Ti", "NVIDIA GeForce RTX 4090 Laptop GPU", "Tesla T4", "NVIDIA L40S", ""],
)
def test_unknown_nvml_names(name: str) -> None:
    assert sku_for_nvml_name(name) is None


def test_total_memory_disambiguates_and_rejects() -> None:
    assert sku_for_nvml_name("NVIDIA A100-PCIE") is None  # 40 or 80 GB: never guess
    assert sku_for_nvml_name("NVIDIA A100-PCIE", 40536) is sku("a100-40g")  # older drivers' total
    assert sku_for_nvml_name("NVIDIA A100-PCIE", 81251) is sku("a100-80g")
    assert sku_for_nvml_name("NVIDIA GeForce RTX 3060", 8192) is None  # the 8 GiB RTX 3060
    assert sku_for_nvml_name("NVIDIA H100 80GB HBM3", 97871) is None  # an H100 96GB is another part


@pytest.mark.parametrize(
    ("need_mib", "profile"),
    [
        (9 * GIB, "1g.10gb"),
        (11 * GIB, "1g.20gb"),  # same memory as 2g.20gb, one compute slice fewer
        (25 * GIB, "3g.40gb"),  # not 4g.40gb
        (9984, "1g.10gb"),
        (9985, "1g.20gb"),
        (40448, "3g.40gb"),
        (40449, "7g.80gb"),
        (1, "1g.10gb"),
    ],
)
def test_smallest_mig_profile_on_h100(need_mib: int, profile: str) -> None:
    assert smallest_mig_profile(H100, need_mib).name == profile


def test_too_big_for_any_profile_lists_the_profiles() -> None:
    with pytest.raises(CapacityError) as err:
        smallest_mig_profile(H100, 90 * GIB)
    msg = str(err.value)
    assert "7g.80gb" in msg and "1g.10gb" in msg and "81152MiB" in msg


def test_a100_prefers_fewer_compute_slices() -> None:
    assert smallest_mig_profile(sku("a100-40g"), 5 * GIB).name == "1g.10gb"
    assert smallest_mig_profile(sku("a100-40g"), 4 * GIB).name == "1g.5gb"


def test_only_restricts_the_choice() -> None:
    assert smallest_mig_profile(H100, 11 * GIB, only="2g.20gb").name == "2g.20gb"
    assert smallest_mig_profile(H100, 11 * GIB, only="MIG 3g.40gb").name == "3g.40gb"
    assert smallest_mig_profile(H100, 11 * GIB, only="any").name == "1g.20gb"
    with pytest.raises(CapacityError, match="less than the 11264MiB"):
        smallest_mig_profile(H100, 11 * GIB, only="1g.10gb")
    with pytest.raises(CapacityError, match=r"'3g\.20gb' is not a MIG profile .*1g\.10gb"):
        smallest_mig_profile(H100, 11 * GIB, only="3g.20gb")


def test_no_mig_on_geforce() -> None:
    with pytest.raises(CapacityError, match="has no MIG"):
        smallest_mig_profile(sku("rtx3090ti-24g"), GIB)
    with pytest.raises(CapacityError, match="has no MIG"):
        smallest_mig_profile(sku("rtx3090ti-24g"), GIB, only="1g.10gb")
    with pytest.raises(CapacityError, match="positive"):
        smallest_mig_profile(H100, 0)


def test_mig_profile_by_name() -> None:
    assert mig_profile(H100, "MIG 7g.80gb").memory_mib == 81152
    assert sku("h100-nvl-94g").profile("1g.12gb") is not None
    assert H100.profile("1g.12gb") is None


def test_shard_arithmetic() -> None:
    assert shards_for(23552, 512) == 46
    assert shards_for(511, 512) == 0
    assert shards_for(0, 512) == 0
    assert shards_needed(6144, 512) == 12
    assert shards_needed(6145, 512) == 13  # never less than asked
    assert shards_needed(1, 512) == 1
    assert shards_needed(0, 512) == 0


@pytest.mark.parametrize("quantum", [0, -512])
def test_nonsense_quantum(quantum: int) -> None:
    with pytest.raises(CapacityError, match="quantum"):
        shards_for(1024, quantum)
    with pytest.raises(CapacityError, match="quantum"):
        shards_needed(1024, quantum)


def test_negative_sizes_are_refused() -> None:
    with pytest.raises(CapacityError):
        shards_for(-1, 512)
    with pytest.raises(CapacityError):
        shards_needed(-1, 512)
    with pytest.raises(CapacityError, match="margin"):
        usable_mib(24564, 354, -1, 0)


def test_usable_never_negative_and_sums_reservations() -> None:
    assert usable_mib(24564, 354, 1024, 12 * GIB) == 10898
    assert usable_mib(24564, 354, 1024, [8 * GIB, 4 * GIB]) == 10898
    assert usable_mib(12288, 83, 1024, 16 * GIB) == 0


def test_rtx3090ti_story_two_workers_fit_three_do_not() -> None:
    """Ollama reserved at 12 GiB plus a 1 GiB margin leaves room for 2 × 4.5 GiB, not 3 × 8."""
    card = sku("rtx3090ti-24g")
    usable = usable_mib(card.total_mib, card.reserved_mib, GIB, 12 * GIB)
    shards = shards_for(usable, 512)
    per_worker = shards_needed(4608, 512)
    assert shards // per_worker == 2
    assert shards_needed(8 * GIB, 512) * 3 > shards
