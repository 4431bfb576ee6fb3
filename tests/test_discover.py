"""gpuarb discover: mig-minors parsing, the discovery file, and the recorded DGX H100 discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from slurm_gpuarb import discover
from slurm_gpuarb.cli import admin  # noqa: F401 - registers the admin commands on the gpuarb group
from slurm_gpuarb.cli.commands import cli
from slurm_gpuarb.errors import ConfigError, TelemetryError
from slurm_gpuarb.model import GpuInfo, GpuProcess, MigInstance
from slurm_gpuarb.telemetry.base import Telemetry
from slurm_gpuarb.telemetry.fake import FakeTelemetry

DGX01 = Path(__file__).resolve().parent / "data" / "discovery" / "dgx01.json"


class Stub(Telemetry):
    """Telemetry answering fixed GPUs (a real backend's shape: name 'nvml')."""

    def __init__(self, gpus: list[GpuInfo], name: str = "nvml") -> None:
        self._gpus, self.name = gpus, name

    def gpus(self) -> list[GpuInfo]:
        return self._gpus

    def processes(self) -> list[GpuProcess]:
        return []


def h100(index: int, minor: int | None, *gis: int) -> GpuInfo:
    mig = tuple(MigInstance(f"MIG-{index}-{gi}", "1g.10gb", 9984, gi, 0, gi - 7, 1) for gi in gis)
    return GpuInfo(index, f"GPU-{index}", "NVIDIA H100 80GB HBM3", 81559, 512, 0, minor=minor, sku="h100-80g",
                   mig_enabled=bool(gis), mig_instances=mig)


def proc_root(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc" / discover.MIG_MINORS
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return tmp_path / "proc"


# --------------------------------------------------------------------------- mig-minors


def test_parse_mig_minors_as_nvidia_writes_it() -> None:
    text = "config 1\nmonitor 2\ngpu0/gi0/access 3\ngpu0/gi0/ci0/access 4\n\nsomething-new 7\ngpu0/gi1/access x\n"
    assert discover.parse_mig_minors(text) == {"config": 1, "monitor": 2, "gpu0/gi0/access": 3,
                                               "gpu0/gi0/ci0/access": 4}


def test_driver_table_matches_published_minors() -> None:
    # Published pairs: gi1 → cap12/13 and gi2 → cap21/22 on GPU 0 (nvidia-container-toolkit tests and
    # the MIG guide's examples); a GPU 1 gres.conf with nvidia-cap201 (gi7) and nvidia-cap237 (gi11).
    caps = discover.parse_mig_minors(discover.driver_mig_minors(2))
    assert (caps["gpu0/gi1/access"], caps["gpu0/gi1/ci0/access"]) == (12, 13)
    assert (caps["gpu0/gi2/access"], caps["gpu0/gi2/ci0/access"]) == (21, 22)
    assert (caps["gpu1/gi7/access"], caps["gpu1/gi11/access"]) == (201, 237)
    assert len(caps) == 2 + 2 * 15 * 9 and len(set(caps.values())) == len(caps)


# --------------------------------------------------------------------------- discover()


def test_discover_reads_the_minors_of_each_instance(tmp_path: Path) -> None:
    root = proc_root(tmp_path, discover.driver_mig_minors(4))
    d = discover.discover(Stub([h100(0, 3, 7, 8), h100(1, 0)]), node="n1", proc_root=root)
    assert (d.node, d.telemetry, d.mig_minors) == ("n1", "nvml", str(root / discover.MIG_MINORS))
    g0 = d.gpus[0]
    assert (g0.index, g0.minor, g0.mig_enabled) == (0, 3, True)
    # GPU minor 3 (not its index 0) keys the table: 3 + 135*3 + 9*7 = 471.
    assert [(m.uuid, m.gi_minor, m.ci_minor) for m in g0.mig] == [("MIG-0-7", 471, 472), ("MIG-0-8", 480, 481)]
    assert d.gpus[1].mig == () and d.gpu(1) is d.gpus[1] and d.gpu(5) is None


def test_discover_needs_minors_and_the_table(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match="cannot tell the /dev/nvidiaN minor of GPU 0"):
        discover.discover(Stub([h100(0, None)]), node="n1", proc_root=tmp_path)
    with pytest.raises(TelemetryError, match=r"cannot read .*mig-minors, the driver's table"):
        discover.discover(Stub([h100(0, 0, 7)]), node="n1", proc_root=tmp_path)
    root = proc_root(tmp_path, "config 1\nmonitor 2\ngpu0/gi7/access 66\n")
    with pytest.raises(TelemetryError, match="has no entry gpu0/gi7/ci0/access for MIG device MIG-0-7 of GPU 0"):
        discover.discover(Stub([h100(0, 0, 7)]), node="n1", proc_root=root)
    # No MIG instances: the table is not needed at all.
    assert discover.discover(Stub([h100(0, 0)]), node="n1", proc_root=tmp_path).mig_minors == ""


def test_fake_node_uses_the_driver_table(tmp_path: Path) -> None:
    d = discover.discover(FakeTelemetry("h100-80g-mig-7x1g", node="n3"), node="n3", proc_root=tmp_path)
    assert d.mig_minors.startswith("synthesized")
    assert [(m.gi_id, m.gi_minor) for m in d.gpus[0].mig][:2] == [(7, 66), (8, 75)]


# --------------------------------------------------------------------------- the file


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    d = discover.discover(Stub([h100(0, 2, 7), h100(1, 0)]), node="n1",
                          proc_root=proc_root(tmp_path, discover.driver_mig_minors(3)), note="n")
    path = tmp_path / "n1.json"
    path.write_text(discover.dump(d))
    assert discover.load(path) == d
    assert json.loads(path.read_text())["gpus"][0]["mig"][0]["gi_cap"] == "gpu2/gi7/access"


def _doc() -> dict[str, object]:
    data: dict[str, object] = json.loads(DGX01.read_text())
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(version=2), "discovery version 2 is not 1"),
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d["gpus"][0].update(minor="2"), r"gpus\[0\]: 'minor' must be an integer"),
    (lambda d: d["gpus"][0].update(minor=-1), r"gpus\[0\]: 'minor' must not be negative"),
    (lambda d: d["gpus"][0].update(uuid="GPU-a b"), r"'uuid' 'GPU-a b' is not valid"),
    (lambda d: d["gpus"][0]["mig"][0].update(gi_minor=True), r"mig\[0\]: 'gi_minor' must be an integer"),
    (lambda d: d["gpus"][0]["mig"][0].update(gi_cap="gpu0/gi7/access"),
     r"'gi_cap' is 'gpu0/gi7/access' but GPU minor 2, GI 7 and CI 0 make it 'gpu2/gi7/access'"),
    (lambda d: d["gpus"][0]["mig"][0].update(profile="1g.10gb; rm"), r"'profile' .* is not valid"),
    (lambda d: d["gpus"][0].update(mig_enabled=False), "lists MIG devices but mig_enabled is false"),
    (lambda d: d["gpus"][1].update(minor=2, mig=[], mig_enabled=False), "GPU index 1 or minor 2 appears twice"),
    (lambda d: d.pop("node"), "missing 'node'"),
])
def test_malformed_discovery_is_refused(change: object, message: str) -> None:
    doc = _doc()
    change(doc)  # type: ignore[operator]
    with pytest.raises(ConfigError, match=message):
        discover.from_dict(doc, "dgx01.json")


def test_load_errors_and_directories(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read the discovery file; run `gpuarb discover --out x\.json`"):
        discover.load(tmp_path / "x.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json: is not JSON"):
        discover.load(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="the discovery directory does not exist"):
        discover.load_dir(tmp_path / "none", ["dgx01"])
    (tmp_path / "dgx02.json").write_text(DGX01.read_text())  # copied from another node
    with pytest.raises(ConfigError, match=r"dgx02\.json: describes node 'dgx01', not 'dgx02'"):
        discover.load_dir(tmp_path, ["dgx02"])
    assert discover.load_dir(DGX01.parent, ["dgx01", "dgx02"]).keys() == {"dgx01"}


def test_recorded_dgx_h100_discovery() -> None:
    d = discover.load(DGX01)
    assert (d.node, len(d.gpus)) == ("dgx01", 8)
    assert [g.minor for g in d.gpus] != [g.index for g in d.gpus]  # the renderer may not assume they agree
    for g in d.gpus:
        assert (g.sku, g.mig_enabled, [m.profile for m in g.mig]) == ("h100-80g", True, ["1g.10gb"] * 7)
        assert sorted(m.placement_start or 0 for m in g.mig) == list(range(7))
        for m in g.mig:  # consistent with the driver's table
            assert (m.gi_minor, m.ci_minor) == (3 + 135 * g.minor + 9 * m.gi_id, 4 + 135 * g.minor + 9 * m.gi_id)
    uuids = [m.uuid for g in d.gpus for m in g.mig]
    assert len(set(uuids)) == 56


# --------------------------------------------------------------------------- gpuarb discover


def test_discover_command(tmp_path: Path) -> None:
    args = ["--telemetry", "fake:h100-80g-mig-7x1g", "--node", "n3", "discover", "--proc-root", str(tmp_path)]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert discover.from_dict(json.loads(r.output)).node == "n3"
    out = tmp_path / "n3.json"
    r = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert (r.exit_code, r.output) == (0, f"{out}\n")
    assert len(discover.load(out).gpus[0].mig) == 7
    assert oct(out.stat().st_mode & 0o777) == "0o644"
