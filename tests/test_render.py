"""gpuarb render: shard arithmetic, gres.conf / slurm.conf part formatting, golden files.

Golden files live in tests/data/golden/<inventory>/<path render --out writes>; the same
rendered files are what docker-slurm/native-up hands to real Slurm daemons. After a deliberate
change, regenerate them with ``GPUARB_UPDATE_GOLDEN=1 pytest tests/test_render.py`` and read the diff.
The Lua plugins have goldens of their own (slurm_gpuarb.lua); here a stand-in marks them rendered,
so the slurm.conf parts show the plugin lines a full render has.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path

import pytest

from slurm_gpuarb import discover, render, skus
from slurm_gpuarb.config import Config, load
from slurm_gpuarb.errors import RenderError
from slurm_gpuarb.render import HookPaths, NodeAddressing, RenderOptions

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "golden"
DISCOVERY = REPO / "tests" / "data" / "discovery"
INVENTORIES = {"docker-slurm": REPO / "docker-slurm" / "inventory.toml"} | {
    p.stem: p for p in sorted((REPO / "templates" / "examples").glob("*.toml"))
}
LUA_STANDIN = {"job_submit.lua": "-- stand-in\n", "cli_filter.lua": "-- stand-in\n"}


@pytest.fixture(autouse=True)
def no_lua(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests render without slurm_gpuarb.lua (it has tests of its own); a test installs a stand-in."""
    monkeypatch.setitem(sys.modules, "slurm_gpuarb.lua", None)


def cfg_from(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "gpuarb.toml"
    path.write_text("version = 1\n" + textwrap.dedent(body))
    return load(path, env={})


def golden_options(name: str, cfg: Config) -> RenderOptions:
    """The fixed, machine-independent options each golden inventory is rendered with."""
    if name == "docker-slurm":  # as native-up renders it, less the host name
        return RenderOptions(dev_dir="/tmp/gpuarb-cluster/dev/{node}", hooks=HookPaths.at("/tmp/gpuarb-cluster/hooks"),
                             addressing=NodeAddressing(hostname="localhost", addr="127.0.0.1", port_base=17001))
    hooks = HookPaths.at("/opt/gpuarb")
    if name == "workstation-3090ti":  # one host, no slurmdbd: partition priorities preempt
        return RenderOptions(hooks=hooks, accounting=False)
    if name == "mixed-cluster":  # only the serving team's account may use the llm QoS
        return RenderOptions(hooks=hooks, accounting=True, privileged_accounts=("inference",), grace_time_s=120)
    return RenderOptions(hooks=hooks, accounting=True,
                         discovery=discover.load_dir(DISCOVERY, [n.name for n in cfg.nodes]))


def lua_standin(monkeypatch: pytest.MonkeyPatch, files: Mapping[str, str] = LUA_STANDIN) -> list[object]:
    """Install a stand-in slurm_gpuarb.lua; returns the calls its render_lua got."""
    calls: list[object] = []

    def render_lua(cfg: Config, *, use_qos: bool = False) -> dict[str, str]:
        calls.append((cfg, use_qos))
        return dict(files)

    monkeypatch.setitem(sys.modules, "slurm_gpuarb.lua", types.SimpleNamespace(render_lua=render_lua))
    return calls


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("name", sorted(INVENTORIES))
def test_golden(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lua_standin(monkeypatch)
    cfg = load(INVENTORIES[name], env={})
    rendered = {k: v for k, v in render.build(cfg, golden_options(name, cfg)).files.items() if not k.endswith(".lua")}
    update = os.environ.get("GPUARB_UPDATE_GOLDEN") == "1"
    for fname, text in rendered.items():
        golden = GOLDEN / name / fname
        if update:
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert golden.is_file(), f"no golden {golden}: run GPUARB_UPDATE_GOLDEN=1 pytest tests/test_render.py"
        assert text == golden.read_text(), f"{name}/{fname} differs from its golden file"
    # *.lua goldens belong to tests/test_lua.py, which renders them with the real lua.py.
    stale = sorted(str(p.relative_to(GOLDEN / name)) for p in (GOLDEN / name).rglob("*")
                   if p.is_file() and p.suffix != ".lua" and str(p.relative_to(GOLDEN / name)) not in rendered)
    if update:
        for rel in stale:
            (GOLDEN / name / rel).unlink()
    else:
        assert not stale, f"golden files no render makes any more: {stale}"


def test_every_template_has_goldens_over_three_inventories() -> None:
    shipped = sorted(str(p.relative_to(REPO / "templates" / "etc")) for p in (REPO / "templates" / "etc").rglob("*.j2"))
    outputs = {"slurm/gres.conf.j2": "gres.conf", "slurm/slurm.conf.j2": "slurm.conf.part",
               "slurm/gpuarb-qos.sh.j2": "gpuarb-qos.sh",
               "nvidia-mig-manager/config.yaml.j2": "nvidia-mig-manager/config.yaml"}
    assert [t for t in shipped if not t.endswith(".lua.j2")] == sorted(outputs)
    for template, out in outputs.items():
        assert len([n for n in INVENTORIES if (GOLDEN / n / out).is_file()]) >= 3, template


def test_dgx_golden_binds_discovered_mig_devices() -> None:
    """The DGX H100's MIG node from its discovery file: each instance's parent minor and GI/CI caps."""
    text = (GOLDEN / "dgx-h100" / "gres.conf").read_text()
    # GPU 0 is /dev/nvidia2 on this board; GI 7 / CI 0 are caps 3 + 135*2 + 9*7 = 336 and 337.
    assert ("NodeName=dgx01 Name=gpu Type=1g.10gb MultipleFiles=/dev/nvidia2,/dev/nvidia-caps/nvidia-cap336,"
            "/dev/nvidia-caps/nvidia-cap337\n") in text
    assert text.count("NodeName=dgx01 Name=gpu Type=1g.10gb MultipleFiles=") == 56
    assert "NodeName=dgx02 Name=shard Count=78 File=/dev/nvidia7\n" in text
    part = (GOLDEN / "dgx-h100" / "slurm.conf.part").read_text()
    assert "NodeName=dgx01 Gres=gpu:1g.10gb:56\n" in part


# --------------------------------------------------------------------------- shard arithmetic

SHARD_NODE = """
[policy]
margin = "1GiB"
quantum = "512MiB"

[[nodes]]
name = "g1"
gpus = [{ count = 2, sku = "a100-40g", mode = "shard" }]

[[nodes]]
name = "g2"
gpus = [{ index = 0, sku = "a100-40g", mode = "shard" }]
"""


def test_shard_count_is_usable_memory_over_quantum(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE)
    a100 = skus.sku("a100-40g")
    per_gpu = (a100.total_mib - a100.reserved_mib - 1024) // 512
    assert per_gpu == 77  # 40960 - 512 - 1024 = 39424 MiB
    g1 = render.plan_node(cfg.nodes[0], cfg)
    assert [d.count for d in g1.devices if d.name == "shard"] == [per_gpu, per_gpu]
    assert g1.gres == f"gpu:a100:2,shard:{2 * per_gpu}"


def test_static_reservation_reduces_only_its_gpu(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE + """
[[reservations]]
name = "ollama"
size = "12GiB"
node = "g1"
gpu = 1
match = { process = "ollama" }
""")
    g1, g2 = (render.plan_node(n, cfg) for n in cfg.nodes)
    assert [d.count for d in g1.devices if d.name == "shard"] == [77, 77 - 24]
    assert "12288 reserved" in g1.devices[-1].note
    assert g1.gres == "gpu:a100:2,shard:130"
    assert g2.gres == "gpu:a100:1,shard:77"  # another node's GPU 1 reservation does not touch it


def test_nodeless_reservation_applies_to_every_node_with_that_gpu(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE + """
[[reservations]]
name = "vllm"
size = "4GiB"
match = { process = "vllm" }
""")
    counts = [[d.count for d in render.plan_node(n, cfg).devices if d.name == "shard"] for n in cfg.nodes]
    assert counts == [[77 - 8, 77], [77 - 8]]


def test_holder_reservation_is_not_subtracted(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE + """
[[reservations]]
name = "ollama"
size = "12GiB"
node = "g2"
mode = "holder"
match = { process = "ollama" }
probe = { kind = "ollama", url = "http://127.0.0.1:11434" }
""")
    assert render.plan_node(cfg.nodes[1], cfg).gres == "gpu:a100:1,shard:77"


def test_reservation_leaving_no_shard_is_an_error(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE + """
[[reservations]]
name = "huge"
size = "39GiB"
node = "g2"
match = { process = "big" }
""")
    with pytest.raises(RenderError, match=r"node g2 gpu 0 \(a100-40g\) has no room for one shard: .*= 0 shards"):
        render.render_gres_conf(cfg)


def test_shard_budget_explains_itself() -> None:
    b = render.ShardBudget(total_mib=24564, reserved_mib=354, margin_mib=1024, static_reservations_mib=12288,
                           quantum_mib=512)
    assert (b.usable_mib, b.count) == (10898, 21)
    assert b.explain() == "24564 total - 354 driver - 1024 margin - 12288 reserved = 10898 MiB / 512 MiB = 21 shards"
    assert render.ShardBudget(1000, 0, 0, 2000, 512).count == 0  # over-reserved: none, never negative


# --------------------------------------------------------------------------- gres.conf lines


@pytest.mark.parametrize(("sku", "gres_type"), [
    ("a100-80g", "a100"), ("a100-40g", "a100"), ("h100-80g", "h100"), ("h100-nvl-94g", "h100-nvl"),
    ("h200-141g", "h200"), ("rtx3090ti-24g", "rtx3090ti"), ("RTX3060-12G", "rtx3060"),
])
def test_gres_type_drops_the_memory_suffix(sku: str, gres_type: str) -> None:
    assert render.gres_type(sku) == gres_type


def test_gres_type_refuses_what_slurm_would_misread() -> None:
    with pytest.raises(RenderError, match="no usable GRES type '3060'"):
        render.gres_type("3060-12g")  # gpu:3060:1 reads as a count


def test_whole_and_mps_gpus(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, """
[[nodes]]
name = "m1"
gpus = [{ index = 0, sku = "h100-80g", mode = "whole", minor = 3 }, { index = 1, sku = "h100-80g", mode = "mps" }]
""")
    text = render.render_gres_conf(cfg, dev_dir="/dev")
    assert "AutoDetect=off\n" in text
    assert "NodeName=m1 Name=gpu Type=h100 File=/dev/nvidia3\n" in text  # the minor, not the index
    assert "NodeName=m1 Name=gpu Type=h100 File=/dev/nvidia1\n" in text
    assert "NodeName=m1 Name=mps Count=100 File=/dev/nvidia1\n" in text
    assert "Name=shard" not in text
    assert "NodeName=m1 Gres=gpu:h100:2,mps:100\n" in render.render_slurm_conf_part(cfg)


def test_dev_dir_per_node(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE)
    text = render.render_gres_conf(cfg, dev_dir="/tmp/c/dev/{node}/")
    assert "NodeName=g2 Name=shard Count=77 File=/tmp/c/dev/g2/nvidia0\n" in text


def test_device_path_that_slurm_cannot_parse_is_refused(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE)
    with pytest.raises(RenderError, match="must be absolute, without spaces"):
        render.render_gres_conf(cfg, dev_dir="/my devices")


MIG_NODE = """
[[nodes]]
name = "m3"
telemetry = "fake:h100-80g-mig-7x1g"
gpus = [{ index = 0, sku = "h100-80g", mode = "mig", mig = ["2x1g.10gb", "3g.40gb"] }]
"""


def test_mig_standins_one_device_per_instance(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, MIG_NODE)
    node = render.plan_node(cfg.nodes[0], cfg, dev_dir="/d")
    assert [(d.type, d.file) for d in node.devices] == [
        ("1g.10gb", "/d/nvidia0"), ("1g.10gb", "/d/nvidia1"), ("3g.40gb", "/d/nvidia2")]
    assert node.gres == "gpu:1g.10gb:2,gpu:3g.40gb:1"


def test_mig_standins_follow_the_other_gpus(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, """
[[nodes]]
name = "m3"
telemetry = "fake:dgx-h100"
gpus = [{ index = 0, sku = "h100-80g", mode = "mig", mig = ["1g.10gb"] }, { index = 1, sku = "h100-80g" }]
""")
    files = [d.file for d in render.plan_node(cfg.nodes[0], cfg, dev_dir="/d").devices]
    assert files == ["/d/nvidia2", "/d/nvidia1"]  # nvidia1 is the whole GPU's; the stand-in comes after


def test_mig_layout_must_fit_the_sku(tmp_path: Path) -> None:
    too_many = MIG_NODE.replace('["2x1g.10gb", "3g.40gb"]', '["2x3g.40gb", "1g.10gb"]')
    with pytest.raises(RenderError, match="needs 7 of 7 compute and 9 of 8 memory slices"):
        render.render_gres_conf(cfg_from(tmp_path, too_many))
    wrong = MIG_NODE.replace('["2x1g.10gb", "3g.40gb"]', '["1g.5gb"]')  # an A100 40GB profile
    with pytest.raises(RenderError, match=r"MIG layout does not fit its SKU: '1g\.5gb' is not a MIG profile"):
        render.render_gres_conf(cfg_from(tmp_path, wrong))


def test_real_mig_is_not_guessed(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, MIG_NODE.replace('telemetry = "fake:h100-80g-mig-7x1g"\n', ""))
    with pytest.raises(RenderError, match=r"node m3 gpu 0 is in MIG mode: .*run `gpuarb discover --out m3.json` on m3"):
        render.render_gres_conf(cfg)


# --------------------------------------------------------------------------- slurm.conf part

PARTITIONS = SHARD_NODE + """
[[partitions]]
name = "batch"
nodes = ["g1", "g2"]
classes = ["batch"]
default = true

[[partitions]]
name = "llm"
nodes = ["g1"]
classes = ["llm"]

[[partitions]]
name = "any"
nodes = ["g2"]
mode = "shard"
"""


def test_partition_tiers_and_preemption(tmp_path: Path) -> None:
    plans = {p.name: p for p in render.plan_partitions(cfg_from(tmp_path, PARTITIONS))}
    assert (plans["batch"].priority_tier, plans["batch"].preempt_mode, plans["batch"].default) == (1, "REQUEUE", True)
    assert (plans["llm"].priority_tier, plans["llm"].preempt_mode, plans["llm"].default) == (2, "OFF", False)
    # A partition admitting batch work is as preemptible as batch.
    assert (plans["any"].priority_tier, plans["any"].preempt_mode) == (1, "REQUEUE")
    assert plans["batch"].nodes == "g1,g2"


def test_slurm_conf_part_lines(tmp_path: Path) -> None:
    text = render.render_slurm_conf_part(cfg_from(tmp_path, PARTITIONS),
                                         addressing=NodeAddressing("h", "127.0.0.1", 17001))
    lines = text.splitlines()
    for line in ("GresTypes=gpu,shard,mps", "SelectType=select/cons_tres", "PrologFlags=Alloc",
                 "NodeName=g1 NodeHostname=h NodeAddr=127.0.0.1 Port=17001 Gres=gpu:a100:2,shard:154",
                 "NodeName=g2 NodeHostname=h NodeAddr=127.0.0.1 Port=17002 Gres=gpu:a100:1,shard:77",
                 "PartitionName=batch Nodes=g1,g2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 "
                 "PreemptMode=REQUEUE",
                 "PartitionName=llm Nodes=g1 MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF"):
        assert line in lines
    assert not any(line.startswith(("Prolog=", "Epilog=", "PrologEpilogTimeout")) for line in lines)


def test_hook_lines(tmp_path: Path) -> None:
    text = render.render_slurm_conf_part(cfg_from(tmp_path, SHARD_NODE), hooks=HookPaths.at("/opt/gpuarb"))
    lines = text.splitlines()
    for line in ("Prolog=/opt/gpuarb/prolog/gpuarb-prolog", "Epilog=/opt/gpuarb/epilog/gpuarb-epilog",
                 "TaskProlog=/opt/gpuarb/prolog/gpuarb-task-prolog",
                 "PrologSlurmctld=/opt/gpuarb/prolog/gpuarb-prolog-slurmctld",
                 "EpilogSlurmctld=/opt/gpuarb/epilog/gpuarb-epilog-slurmctld",
                 "HealthCheckProgram=/opt/gpuarb/prolog/gpuarb-health-check", "HealthCheckNodeState=ANY",
                 "HealthCheckInterval=60", "PrologEpilogTimeout=60"):
        assert line in lines


def test_hooks_installed_only_takes_existing_shims(tmp_path: Path) -> None:
    (tmp_path / "prolog").mkdir()
    (tmp_path / "prolog" / "gpuarb-prolog").write_text("#!/bin/sh\n")
    hooks = HookPaths.at(tmp_path, installed_only=True)
    assert hooks.prolog == str(tmp_path / "prolog" / "gpuarb-prolog")
    assert (hooks.epilog, hooks.task_prolog, hooks.health_check) == (None, None, None)
    assert [k for k, _ in hooks.lines()] == ["Prolog", "PrologEpilogTimeout"]
    assert HookPaths.at(tmp_path / "nothing", installed_only=True).lines() == []
    assert HookPaths.at(tmp_path / "nothing").epilog == str(tmp_path / "nothing" / "epilog" / "gpuarb-epilog")


def test_hook_path_with_a_space_is_refused() -> None:
    with pytest.raises(RenderError, match="Prolog path '/opt/my gpuarb/p'"):
        HookPaths(prolog="/opt/my gpuarb/p").lines()


def test_node_hostname_that_would_break_the_line_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RenderError, match="node hostname 'a b'"):
        render.render_slurm_conf_part(cfg_from(tmp_path, SHARD_NODE), addressing=NodeAddressing(hostname="a b"))


# --------------------------------------------------------------------------- templates and files


def test_site_template_overrides_by_relative_path(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "etc" / "slurm").mkdir(parents=True)
    (site / "etc" / "slurm" / "gres.conf.j2").write_text(
        "{% for n in nodes %}{% for d in n.devices %}{{ n.name }}:{{ d.name }}:{{ d.file }}\n{% endfor %}{% endfor %}")
    cfg = cfg_from(tmp_path, SHARD_NODE)
    assert render.render_gres_conf(cfg, template_dir=site).splitlines()[:2] == [
        "g1:gpu:/dev/nvidia0", "g1:shard:/dev/nvidia0"]
    # The other template still comes from the shipped set.
    assert "GresTypes=gpu,shard,mps" in render.render_slurm_conf_part(cfg, template_dir=site)


def test_undefined_template_variable_is_an_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "etc" / "slurm").mkdir(parents=True)
    (site / "etc" / "slurm" / "gres.conf.j2").write_text("{{ nodes[0].no_such_field }}\n")
    with pytest.raises(RenderError, match=r"template etc/slurm/gres.conf.j2 failed to render: .*no_such_field"):
        render.render_gres_conf(cfg_from(tmp_path, SHARD_NODE), template_dir=site)


def test_render_all_writes_every_file(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, PARTITIONS)
    out = tmp_path / "out"
    paths = render.render_all(cfg, out, RenderOptions(lua=False))
    assert [p.name for p in paths] == ["gres.conf", "slurm.conf.part", "gpuarb-qos.sh", "config.yaml"]
    assert paths[0].read_text() == render.render_gres_conf(cfg)
    assert oct(paths[1].stat().st_mode & 0o777) == "0o644"
    assert oct(paths[2].stat().st_mode & 0o777) == "0o755"  # the QoS script runs as is
    assert paths[3] == out / "nvidia-mig-manager" / "config.yaml"  # A100s: MIG off, by mig-parted
    # no temp files left
    assert sorted(p.name for p in out.iterdir()) == ["gpuarb-qos.sh", "gres.conf", "nvidia-mig-manager",
                                                     "slurm.conf.part"]


def test_render_all_writes_nothing_when_rendering_fails(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, MIG_NODE.replace('telemetry = "fake:h100-80g-mig-7x1g"\n', ""))
    out = tmp_path / "out"
    with pytest.raises(RenderError):
        render.render_all(cfg, out)
    assert not out.exists()


def test_module_entry_point(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = tmp_path / "inv.toml"
    inv.write_text("version = 1\n" + PARTITIONS)
    assert render.main(["--config", str(inv), "--out", str(tmp_path / "o"), "--port-base", "17001"]) == 0
    assert "NodeName=g2 Port=17002 Gres=" in (tmp_path / "o" / "slurm.conf.part").read_text()
    inv.write_text("version = 1\n" + MIG_NODE.replace('telemetry = "fake:h100-80g-mig-7x1g"\n', ""))
    assert render.main(["--config", str(inv), "--out", str(tmp_path / "o2")]) == 1
    assert capsys.readouterr().err.startswith("Error: node m3 gpu 0 is in MIG mode: its gres.conf lines need")


# --------------------------------------------------------------------------- MIG from discovery

DGX01 = discover.load(DISCOVERY / "dgx01.json")
DGX_NODE = """
[[nodes]]
name = "dgx01"
gpus = [{ count = 8, sku = "h100-80g", mode = "mig", mig = ["7x1g.10gb"] }]
"""


def test_discovered_mig_lines_follow_nvml_order_and_minors(tmp_path: Path) -> None:
    node = render.plan_node(cfg_from(tmp_path, DGX_NODE).nodes[0], cfg_from(tmp_path, DGX_NODE), discovery=DGX01)
    first = DGX01.gpus[0].mig[0]
    assert node.devices[0].files == ("/dev/nvidia2", f"/dev/nvidia-caps/nvidia-cap{first.gi_minor}",
                                     f"/dev/nvidia-caps/nvidia-cap{first.ci_minor}")
    assert node.devices[0].mig_uuid == first.uuid and node.devices[0].uuid == DGX01.gpus[0].uuid
    # GRES index k is the k-th MIG device NVML lists, GPU by GPU: what the daemon's map expects.
    assert [d.mig_uuid for d in node.devices] == [m.uuid for g in DGX01.gpus for m in g.mig]
    assert node.gres == "gpu:1g.10gb:56"


def test_discovery_supplies_minors_and_is_checked(tmp_path: Path) -> None:
    body = DGX_NODE.replace('mode = "mig", mig = ["7x1g.10gb"]', 'mode = "shard"')
    cfg = cfg_from(tmp_path, body)
    whole = discover.Discovery("dgx01", tuple(
        discover.DiscoveredGpu(g.index, g.minor, g.uuid, g.name, g.total_mib, g.sku) for g in DGX01.gpus))
    node = render.plan_node(cfg.nodes[0], cfg, discovery=whole)
    assert [d.file for d in node.devices if d.name == "shard"][:3] == ["/dev/nvidia2", "/dev/nvidia3", "/dev/nvidia0"]
    with pytest.raises(RenderError, match=r"gpu 0 is in MIG mode on the node but shard in the inventory; disable MIG"):
        render.plan_node(cfg.nodes[0], cfg, discovery=DGX01)
    pinned = cfg_from(tmp_path, body.replace('{ count = 8, sku = "h100-80g", mode = "shard" }',
                                             '{ index = 0, sku = "h100-80g", mode = "shard", minor = 0 }'))
    with pytest.raises(RenderError, match=r"inventory says /dev/nvidia0 but discovery found /dev/nvidia2"):
        render.plan_node(pinned.nodes[0], pinned, discovery=whole)
    a100 = cfg_from(tmp_path, body.replace("h100-80g", "a100-80g"))
    with pytest.raises(RenderError, match=r"gpu 0 is a100-80g in the inventory but discovery found a h100-80g"):
        render.plan_node(a100.nodes[0], a100, discovery=whole)
    nine = cfg_from(tmp_path, body.replace("count = 8", "count = 9"))
    with pytest.raises(RenderError, match=r"gpu 8 is in the inventory but not in its discovery file"):
        render.plan_node(nine.nodes[0], nine, discovery=whole)


def test_live_mig_layout_must_be_the_inventorys(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, DGX_NODE.replace('["7x1g.10gb"]', '["3g.40gb", "4g.40gb"]'))
    with pytest.raises(RenderError, match=r"gpu 0: its live MIG layout \(7x1g.10gb\) is not the inventory's "
                                          r"\(1x3g.40gb \+ 1x4g.40gb\); apply it \(nvidia-mig-parted apply .* "
                                          r"-c gpuarb-dgx01\), then run gpuarb discover again"):
        render.plan_node(cfg.nodes[0], cfg, discovery=DGX01)


def test_gres_map_only_for_discovered_nodes(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, DGX_NODE + """
[[nodes]]
name = "g1"
gpus = [{ count = 2, sku = "a100-40g", mode = "shard" }]
""")
    files = render.build(cfg, RenderOptions(discovery={"dgx01": DGX01}, lua=False)).files
    assert [f for f in files if f.startswith("gres-map/")] == ["gres-map/dgx01.json"]
    m = json.loads(files["gres-map/dgx01.json"])
    assert (m["version"], m["node"], m["autodetect"], len(m["gres"])) == (1, "dgx01", "off", 56)
    assert m["gres"][8] == {"index": 8, "gpu": 1, "type": "1g.10gb", "uuid": DGX01.gpus[1].uuid,
                            "mig_uuid": DGX01.gpus[1].mig[1].uuid, "files": list(render.plan_node(
                                cfg.nodes[0], cfg, discovery=DGX01).devices[8].files)}


def test_render_all_loads_a_discovery_directory(tmp_path: Path) -> None:
    inv = tmp_path / "inv.toml"
    inv.write_text("version = 1\n" + DGX_NODE)
    assert render.main(["--config", str(inv), "--out", str(tmp_path / "o"), "--discovery", str(DISCOVERY)]) == 0
    assert (tmp_path / "o" / "gres-map" / "dgx01.json").is_file()
    assert "MultipleFiles=/dev/nvidia2," in (tmp_path / "o" / "gres.conf").read_text()


# --------------------------------------------------------------------------- options


def test_autodetect_option(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, SHARD_NODE)
    text = render.render_gres_conf(cfg, options=RenderOptions(autodetect="nvml"))
    assert "\nAutoDetect=nvml\n" in text and "no NVML autodetection" not in text
    with pytest.raises(RenderError, match="AutoDetect='rsmi' is not one of off, nvml"):
        render.render_gres_conf(cfg, options=RenderOptions(autodetect="rsmi"))


def test_accounting_decides_preempt_type_and_the_qos_script(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, PARTITIONS)
    on = render.build(cfg, RenderOptions(accounting=True, lua=False)).files
    lines = on["slurm.conf.part"].splitlines()
    assert "PreemptType=preempt/qos" in lines and "AccountingStoreFlags=job_comment" in lines
    assert "gpuarb-qos.sh" in on
    off = render.build(cfg, RenderOptions(accounting=False, lua=False)).files
    lines = off["slurm.conf.part"].splitlines()
    assert "PreemptType=preempt/partition_prio" in lines and "AccountingStoreFlags=job_comment" not in lines
    assert "gpuarb-qos.sh" not in off
    unknown = render.build(cfg, RenderOptions(lua=False)).files["slurm.conf.part"]  # the base slurm.conf decides
    assert "PreemptType" not in unknown and "AccountingStoreFlags" not in unknown


def test_preempt_mode_cancel_and_suspend_refused(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, PARTITIONS)
    text = render.render_slurm_conf_part(cfg, options=RenderOptions(preempt_mode="cancel"))
    assert "PreemptMode=CANCEL" in text.splitlines()
    assert "PartitionName=batch Nodes=g1,g2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=CANCEL" \
        in text.splitlines()
    assert "# Batch is cancelled, never suspended" in text
    with pytest.raises(RenderError, match="SUSPEND is refused for GPU partitions: a suspended job keeps its GPU"):
        render.build(cfg, RenderOptions(preempt_mode="SUSPEND"))
    with pytest.raises(RenderError, match="PreemptMode 'GANG' is not one of REQUEUE, CANCEL"):
        render.build(cfg, RenderOptions(preempt_mode="GANG"))


def test_lua_files_and_plugin_lines_come_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_from(tmp_path, PARTITIONS)
    files = render.build(cfg).files  # no slurm_gpuarb.lua: no Lua, no plugin lines
    assert not any(f.endswith(".lua") for f in files) and "JobSubmitPlugins" not in files["slurm.conf.part"]
    with pytest.raises(RenderError, match=r"the Lua plugins were asked for, but slurm_gpuarb\.lua cannot be imported"):
        render.build(cfg, RenderOptions(lua=True))
    calls = lua_standin(monkeypatch)
    files = render.build(cfg, RenderOptions(accounting=True)).files
    assert files["job_submit.lua"] == "-- stand-in\n" and calls == [(cfg, True)]  # QoS mapping with slurmdbd
    assert {"JobSubmitPlugins=lua", "CliFilterPlugins=cli_filter/lua"} <= set(files["slurm.conf.part"].splitlines())
    assert "JobSubmitPlugins" not in render.build(cfg, RenderOptions(lua=False)).files["slurm.conf.part"]
    lua_standin(monkeypatch, {"../job_submit.lua": ""})
    with pytest.raises(RenderError, match=r"rendered '../job_submit.lua'; expected plain \*.lua file names"):
        render.build(cfg)


# --------------------------------------------------------------------------- the gpuarb render command


def test_render_command(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from slurm_gpuarb.cli import admin  # noqa: F401 - registers the admin commands on the gpuarb group
    from slurm_gpuarb.cli.commands import cli

    inv = tmp_path / "inv.toml"
    inv.write_text("version = 1\n" + PARTITIONS)
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["--config", str(inv), "render", "--out", str(out), "--no-accounting",
                                       "--preempt-mode", "cancel", "--no-lua"])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [str(out / "gres.conf"), str(out / "slurm.conf.part"),
                                     str(out / "nvidia-mig-manager" / "config.yaml")]
    assert "PreemptType=preempt/partition_prio" in (out / "slurm.conf.part").read_text()
    r = CliRunner().invoke(cli, ["--config", str(inv), "render", "--out", str(out), "--preempt-mode", "suspend"])
    assert r.exit_code == 1 and "Error: PreemptMode=SUSPEND is refused for GPU partitions" in r.output
    r = CliRunner().invoke(cli, ["--config", str(inv), "render", "--out", str(out), "--grace-time", "soon"])
    assert r.exit_code == 2 and "is not a duration" in r.output


def test_templates_installed_by_a_wheel_are_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyproject's data-files put the templates in <prefix>/share/slurm-gpuarb/templates."""
    shared = tmp_path / "share" / "slurm-gpuarb" / "templates"
    (shared / "etc" / "slurm").mkdir(parents=True)
    (shared / render.GRES_CONF).write_text("# gres\n")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    checkout = Path(render.__file__).resolve().parent.parent / "templates"
    assert render.default_template_dirs() == (checkout, shared)
    pyproject = tomllib.loads((checkout.parent / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["data-files"]
    shipped = {str(p.relative_to(checkout)) for p in checkout.rglob("*") if p.is_file()}
    listed = {str(f.relative_to(checkout)) for dest, globs in data.items() for g in globs
              for f in checkout.parent.glob(g) if dest.endswith(str(f.parent.relative_to(checkout.parent)))}
    assert shipped == listed, "a template the wheel would not carry (add its folder to pyproject's data-files)"
