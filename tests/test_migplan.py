"""MIG layouts by placement rules, not only instance counts; mig-parted configs; `gpuarb mig plan`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from slurm_gpuarb import migplan, skus
from slurm_gpuarb.cli import admin  # noqa: F401 - registers the admin commands on the gpuarb group
from slurm_gpuarb.cli.commands import cli
from slurm_gpuarb.config import load
from slurm_gpuarb.errors import CapacityError

H100 = "h100-80g"


def starts(layout: migplan.MigLayout) -> list[tuple[str, int]]:
    return [(p.profile, p.start) for p in layout.instances]


# --------------------------------------------------------------------------- what fits


def test_two_3g_instances_take_slots_0_and_4() -> None:
    layout = migplan.plan(H100, [("3g.40gb", 2)])
    assert starts(layout) == [("3g.40gb", 0), ("3g.40gb", 4)]
    assert (layout.compute_slices, layout.memory_slots, layout.diagram()) == (6, 8, "aaaabbbb")


def test_4g_and_3g_share_the_gpu_at_0_and_4() -> None:
    layout = migplan.plan(H100, [("3g.40gb", 1), ("4g.40gb", 1)])
    assert starts(layout) == [("4g.40gb", 0), ("3g.40gb", 4)]
    assert layout.counts() == {"4g.40gb": 1, "3g.40gb": 1}


def test_seven_1g_instances_leave_slot_7_empty() -> None:
    layout = migplan.plan(H100, [("1g.10gb", 7)])
    assert [p.start for p in layout.instances] == [0, 1, 2, 3, 4, 5, 6]
    assert layout.diagram() == "abcdefg."


def test_three_2g_and_a_1g() -> None:
    layout = migplan.plan(H100, [("1g.10gb", 1), ("2g.20gb", 3)])
    assert starts(layout) == [("2g.20gb", 0), ("2g.20gb", 2), ("2g.20gb", 4), ("1g.10gb", 6)]
    assert layout.describe() == "2g.20gb@0 2g.20gb@2 2g.20gb@4 1g.10gb@6"


def test_a_size_becomes_the_smallest_profile_holding_it() -> None:
    layout = migplan.plan(H100, [(9 * 1024, 2), (11 * 1024, 1)])
    assert sorted(p.profile for p in layout.instances) == ["1g.10gb", "1g.10gb", "1g.20gb"]


def test_backtracking_finds_a_placement_first_choices_miss() -> None:
    # 3g first takes slot 0; then four 1g.10gb need slots 4-7, and 7 is no 1g's: 3g must go to 4.
    layout = migplan.plan(H100, [("3g.40gb", 1), ("1g.10gb", 4)])
    assert starts(layout) == [("1g.10gb", 0), ("1g.10gb", 1), ("1g.10gb", 2), ("1g.10gb", 3), ("3g.40gb", 4)]


# --------------------------------------------------------------------------- what is refused, and why


def test_two_4g_instances_are_refused_by_the_instance_limit() -> None:
    with pytest.raises(CapacityError, match=r"2 × 4g.40gb does not fit NVIDIA H100 80GB: it holds at most 1 × "
                                            r"4g.40gb, asked for 2"):
        migplan.plan(H100, [("4g.40gb", 2)])


def test_too_many_slices_are_refused() -> None:
    with pytest.raises(CapacityError, match=r"needs 8 of 7 compute and 8 of 8 memory slices"):
        migplan.plan(H100, [("4g.40gb", 1), ("1g.10gb", 4)])
    with pytest.raises(CapacityError, match=r"needs 7 of 7 compute and 9 of 8 memory slices"):
        migplan.check(H100, ["3g.40gb", "3g.40gb", "1g.10gb"])


def test_placement_refusal_names_the_instance_and_its_starts() -> None:
    # A geometry where the counts fit but the starts do not: two "2x" profiles that may both start
    # only at slot 2 of a 4-slot grid region.
    odd = skus.Sku("odd-8g", "Odd 8GB", (), 8192, 0, (
        skus.MigProfile("2g.2gb", 2048, 2, 2, 2, (2,), 2),
        skus.MigProfile("1g.1gb", 1024, 7, 1, 1, (0, 1, 2, 3, 4, 5, 6), 1),
    ))
    with pytest.raises(CapacityError, match=r"2 × 2g.2gb does not fit Odd 8GB: with 2g.2gb at slots 2-3 placed, no "
                                            r"2g.2gb can be placed \(it may start only at slot 2 and spans 2 of the 8 "
                                            r"memory slots\)"):
        migplan.plan(odd, [("2g.2gb", 2)])


def test_unknown_profile_and_empty_request() -> None:
    with pytest.raises(CapacityError, match=r"'1g.5gb' is not a MIG profile of NVIDIA H100 80GB"):
        migplan.plan(H100, [("1g.5gb", 1)])
    with pytest.raises(CapacityError, match="at least one instance"):
        migplan.plan(H100, [])
    with pytest.raises(CapacityError, match="count of at least 1"):
        migplan.plan(H100, [("1g.10gb", 0)])
    with pytest.raises(CapacityError, match="no MIG profile of NVIDIA H100 80GB holds 90000MiB"):
        migplan.plan(H100, [(90000, 1)])
    with pytest.raises(CapacityError, match="has no MIG"):
        migplan.plan("rtx3090ti-24g", [("1g.10gb", 1)])


@pytest.mark.parametrize(("text", "request_"), [
    ("1g.10gb", ("1g.10gb", 1)), ("2x3g.40gb", ("3g.40gb", 2)), ("20GiB", (20480, 1)), ("3x12GiB", (12288, 3)),
    ("MIG 1g.10gb", None), ("2×1G.10GB", ("1g.10gb", 2)),
])
def test_parse_request(text: str, request_: migplan.Request | None) -> None:
    if request_ is None:
        with pytest.raises(CapacityError, match="is not a MIG request"):
            migplan.parse_request(text)
    else:
        assert migplan.parse_request(text) == request_


def test_parse_request_bad_size() -> None:
    with pytest.raises(CapacityError, match=r"'12QB' is not a MIG request \(a size such as 20GiB"):
        migplan.parse_request("12QB")


# --------------------------------------------------------------------------- mig-parted configs


def test_node_configs_group_gpus_and_disable_mig_elsewhere(tmp_path: Path) -> None:
    inv = tmp_path / "gpuarb.toml"
    inv.write_text("version = 1\n" + textwrap.dedent("""
        [[nodes]]
        name = "m1"
        gpus = [{ count = 2, sku = "h100-80g", mode = "mig", mig = ["4g.40gb", "3g.40gb"] },
                { index = 2, sku = "h100-80g", mode = "shard" }]

        [[nodes]]
        name = "ws"
        gpus = [{ index = 0, sku = "rtx3090ti-24g" }]
        """))
    configs = migplan.node_configs(load(inv, env={}))
    assert [c.name for c in configs] == ["gpuarb-m1"]  # an RTX 3090 Ti has no MIG to configure
    mig, off = configs[0].entries
    assert (mig.devices, mig.mig_enabled, off.devices, off.mig_enabled, off.layout) == ((0, 1), True, (2,), False, None)
    assert mig.layout is not None and mig.layout.describe() == "4g.40gb@0 3g.40gb@4"


# --------------------------------------------------------------------------- gpuarb mig plan


def test_mig_plan_command() -> None:
    r = CliRunner().invoke(cli, ["mig", "plan", "--sku", H100, "4g.40gb", "3g.40gb"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        "NVIDIA H100 80GB: 4g.40gb@0 3g.40gb@4 (7/7 compute slices, 8/8 memory slots)",
        "  slots 01234567",
        "        aaaabbbb   a=4g.40gb b=3g.40gb",
        "  nvidia-mig-parted:",
        "    mig-enabled: true",
        "    mig-devices:",
        '      "4g.40gb": 1',
        '      "3g.40gb": 1',
    ]
    r = CliRunner().invoke(cli, ["mig", "plan", "--sku", H100, "--json", "3x2g.20gb", "9GiB"])
    data = json.loads(r.output)
    assert data["mig_devices"] == {"2g.20gb": 3, "1g.10gb": 1}
    assert [i["start"] for i in data["instances"]] == [0, 2, 4, 6]


def test_mig_plan_command_explains_a_refusal() -> None:
    r = CliRunner().invoke(cli, ["mig", "plan", "--sku", H100, "2x4g.40gb"])
    assert r.exit_code == 1
    assert r.output.startswith("Error: 2 × 4g.40gb does not fit NVIDIA H100 80GB: it holds at most 1 × 4g.40gb")
