"""gpuarb render: shard arithmetic, gres.conf / slurm.conf part formatting, golden files.

Golden files live in tests/data/golden/<inventory>/{gres.conf,slurm.conf.part}; the same
rendered files are what docker-slurm/native-up hands to real Slurm daemons. After a deliberate
change, regenerate them with ``GPUARB_UPDATE_GOLDEN=1 pytest tests/test_render.py`` and read the diff.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from slurm_gpuarb import render, skus
from slurm_gpuarb.config import Config, load
from slurm_gpuarb.errors import RenderError
from slurm_gpuarb.render import HookPaths, NodeAddressing

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "tests" / "data" / "golden"
INVENTORIES = {"docker-slurm": REPO / "docker-slurm" / "inventory.toml"} | {
    p.stem: p for p in sorted((REPO / "templates" / "examples").glob("*.toml"))
}


def cfg_from(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "gpuarb.toml"
    path.write_text("version = 1\n" + textwrap.dedent(body))
    return load(path, env={})


def golden_render(name: str, path: Path) -> dict[str, str]:
    """The fixed, machine-independent options each golden inventory is rendered with."""
    cfg = load(path, env={})
    if name == "docker-slurm":  # as native-up renders it, less the host name
        dev_dir = "/tmp/gpuarb-cluster/dev/{node}"
        addressing: NodeAddressing | None = NodeAddressing(hostname="localhost", addr="127.0.0.1", port_base=17001)
        hooks = HookPaths.at("/tmp/gpuarb-cluster/hooks")
    else:
        dev_dir, addressing, hooks = "/dev", None, HookPaths.at("/opt/gpuarb")
    return {"gres.conf": render.render_gres_conf(cfg, dev_dir=dev_dir),
            "slurm.conf.part": render.render_slurm_conf_part(cfg, hooks=hooks, addressing=addressing)}


# --------------------------------------------------------------------------- golden files


@pytest.mark.parametrize("name", sorted(INVENTORIES))
def test_golden(name: str) -> None:
    try:
        rendered = golden_render(name, INVENTORIES[name])
    except RenderError as e:
        if "real MIG instances are not rendered yet" not in str(e):
            raise
        # Real MIG device files (MultipleFiles=, nvidia-caps minors) need discovery on the node.
        pytest.xfail(f"{name}: {e}")
    for fname, text in rendered.items():
        golden = GOLDEN / name / fname
        if os.environ.get("GPUARB_UPDATE_GOLDEN") == "1":
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(text)
        assert golden.is_file(), f"no golden {golden}: run GPUARB_UPDATE_GOLDEN=1 pytest tests/test_render.py"
        assert text == golden.read_text(), f"{name}/{fname} differs from its golden file"


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
    with pytest.raises(RenderError, match="real MIG instances are not rendered yet"):
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


def test_render_all_writes_both_files(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, PARTITIONS)
    out = tmp_path / "out"
    paths = render.render_all(cfg, out)
    assert [p.name for p in paths] == ["gres.conf", "slurm.conf.part"]
    assert paths[0].read_text() == render.render_gres_conf(cfg)
    assert oct(paths[1].stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in out.iterdir()) == ["gres.conf", "slurm.conf.part"]  # no temp files left


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
    assert capsys.readouterr().err.startswith("Error: node m3 gpu 0: gres.conf lines for real MIG")
