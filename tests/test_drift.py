"""gpuarb render --check: drift between the installed render and the inventory, naming the GPU whose
shard count is now too high (issue 4's acceptance: raise a reservation after rendering)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from slurm_gpuarb import drift, render
from slurm_gpuarb.cli import admin
from slurm_gpuarb.cli.commands import cli
from slurm_gpuarb.config import Config, load
from slurm_gpuarb.errors import RenderError
from slurm_gpuarb.render import RenderOptions

WORKSTATION = """version = 1

[[reservations]]
name = "ollama"
size = "{size}"
node = "ws1"
gpu = 0
match = {{ process = "ollama" }}

[[nodes]]
name = "ws1"
gpus = [{{ index = 0, sku = "rtx3090ti-24g", mode = "shard" }}, {{ index = 1, sku = "rtx3090ti-24g", mode = "shard" }}]
"""
OPTS = RenderOptions(lua=False)


@pytest.fixture(autouse=True)
def no_lua(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "slurm_gpuarb.lua", None)


def inventory(tmp_path: Path, size: str) -> Path:
    path = tmp_path / "gpuarb.toml"
    path.write_text(WORKSTATION.format(size=size))
    return path


def installed(tmp_path: Path, size: str) -> tuple[Config, Path]:
    cfg = load(inventory(tmp_path, size), env={})
    out = tmp_path / "etc"
    render.render_all(cfg, out, OPTS)
    return cfg, out


def test_a_fresh_render_is_clean(tmp_path: Path) -> None:
    cfg, out = installed(tmp_path, "12GiB")
    d = drift.check_rendered(cfg, out, OPTS)
    assert d.clean and d.files == () and d.shards == ()
    assert d.report() == f"{out}: up to date"
    (out / "unrelated.conf").write_text("x\n")  # files the render does not make are not its business
    assert drift.check_rendered(cfg, out, OPTS).clean


def test_raised_reservation_names_the_gpu_whose_shards_are_too_high(tmp_path: Path) -> None:
    _, out = installed(tmp_path, "12GiB")
    cfg = load(inventory(tmp_path, "14GiB"), env={})
    d = drift.check_rendered(cfg, out, OPTS)
    assert not d.clean
    assert [(s.node, s.gpu, s.installed, s.rendered, s.too_high) for s in d.shards] == [("ws1", 0, 21, 17, True)]
    report = d.report().splitlines()
    assert report[0] == ("node ws1 gpu 0 (/dev/nvidia0): shard count too high: gres.conf offers 21 shards, the "
                         "inventory now allows 17 (24564 total - 354 driver - 1024 margin - 14336 reserved = 8850 MiB "
                         "/ 512 MiB = 17 shards); Slurm can hand out memory that is not there: install the new render "
                         "and restart slurmd on ws1")
    assert [f.path for f in d.files] == ["gres.conf", "slurm.conf.part"]  # the node's Gres= sum moved too
    assert f"{out}/gres.conf: differs" in report
    assert "-NodeName=ws1 Name=shard Count=21 File=/dev/nvidia0" in report
    assert "+NodeName=ws1 Name=shard Count=17 File=/dev/nvidia0" in report
    assert not any("nvidia1" in line and line.startswith(("-", "+")) for line in report)  # GPU 1 is untouched


def test_lowered_reservation_is_drift_but_not_dangerous(tmp_path: Path) -> None:
    _, out = installed(tmp_path, "12GiB")
    d = drift.check_rendered(load(inventory(tmp_path, "10GiB"), env={}), out, OPTS)
    assert [(s.installed, s.rendered, s.too_high) for s in d.shards] == [(21, 25, False)]
    assert "shard count too low" in d.report()


def test_missing_file_is_drift(tmp_path: Path) -> None:
    cfg, out = installed(tmp_path, "12GiB")
    (out / "gpuarb-qos.sh").unlink()
    d = drift.check_rendered(cfg, out, OPTS)
    assert [(f.path, f.missing) for f in d.files] == [("gpuarb-qos.sh", True)]
    assert "+#!/bin/sh" in d.files[0].diff


def test_check_needs_a_directory(tmp_path: Path) -> None:
    cfg, _ = installed(tmp_path, "12GiB")
    with pytest.raises(RenderError, match="is not a directory; --check compares with the directory render --out"):
        drift.check_rendered(cfg, tmp_path / "nowhere", OPTS)


def test_shard_counts_reads_only_shard_lines() -> None:
    text = ("AutoDetect=off\n# NodeName=a Name=shard Count=9 File=/dev/nvidia9\n"
            "NodeName=a Name=gpu Type=x File=/dev/nvidia0\nNodeName=a Name=shard Count=21 File=/dev/nvidia0\n"
            "NodeName=b Name=shard Type=h100 Count=3 File=/d/nvidia1  # trailing comment\n")
    assert drift.shard_counts(text) == {("a", "/dev/nvidia0"): 21, ("b", "/d/nvidia1"): 3}


def test_render_check_command_exits_3_on_drift(tmp_path: Path) -> None:
    assert admin.EXIT_DRIFT == 3
    inv = inventory(tmp_path, "12GiB")
    out = tmp_path / "etc"
    base = ["--config", str(inv), "render", "--out", str(out), "--no-lua"]
    assert CliRunner().invoke(cli, base).exit_code == 0
    r = CliRunner().invoke(cli, [*base, "--check"])
    assert (r.exit_code, r.output) == (0, f"{out}: up to date\n")
    inv.write_text(WORKSTATION.format(size="14GiB"))
    r = CliRunner().invoke(cli, [*base, "--check"])
    assert r.exit_code == 3
    assert r.output.startswith("node ws1 gpu 0 (/dev/nvidia0): shard count too high: gres.conf offers 21 shards")
    # Re-rendering fixes it.
    assert CliRunner().invoke(cli, base).exit_code == 0
    assert CliRunner().invoke(cli, [*base, "--check"]).exit_code == 0
