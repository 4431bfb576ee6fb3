"""The registry, ``select()`` (including ``auto``), deferred errors and the /proc helper."""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from slurm_gpuarb import subproc
from slurm_gpuarb.errors import ConfigError
from slurm_gpuarb.model import GpuInfo, GpuProcess
from slurm_gpuarb.telemetry import Telemetry, backends, base, presets, proc_identity, register, select
from slurm_gpuarb.telemetry.fake import FakeTelemetry
from slurm_gpuarb.telemetry.nvml import NvmlTelemetry
from slurm_gpuarb.telemetry.smi import SmiTelemetry

from .conftest import smi_mapping

NO_SMI = {argv: subproc.Reply(raises=FileNotFoundError(2, "No such file")) for argv in smi_mapping("rtx3090ti")}


class _Probe(Telemetry):
    name = "probe"

    def __init__(self, arg: str, node: str | None) -> None:
        self.arg, self.node, self.closed = arg, node, 0

    def gpus(self) -> list[GpuInfo]:
        return []

    def processes(self) -> list[GpuProcess]:
        return []

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def registry() -> Iterator[None]:
    """Restore the registry after the test."""
    saved = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


def test_builtin_backends_are_registered() -> None:
    known = backends()
    assert {"nvml", "smi", "fake"} <= set(known)
    assert known["nvml"] is None  # nvidia-ml-py is a dependency, so NVML is usable as a backend here


def test_register_passes_argument_and_node(registry: None) -> None:
    register("probe", _Probe)
    t = select("probe:some:arg", node="n7")
    assert isinstance(t, _Probe) and (t.arg, t.node) == ("some:arg", "n7")
    with t:
        pass
    assert t.closed == 1


def test_deferred_error_is_raised_only_when_chosen(registry: None) -> None:
    msg = "telemetry 'dcgm' needs the dcgm package: pip install pydcgm"
    register("dcgm", _Probe, error=msg)
    assert backends()["dcgm"] == msg
    with pytest.raises(ConfigError) as info:
        select("dcgm")
    assert str(info.value) == msg


def test_unknown_choice_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown telemetry 'nvlm'; did you mean 'nvml'\?") as info:
        select("nvlm")
    assert "h100-80g-mig-7x1g" in str(info.value)  # the presets are listed
    with pytest.raises(ConfigError, match=r"did you mean 'fake:dgx-h100'\?"):
        select("fakee:dgx-h100")
    with pytest.raises(ConfigError, match=r"unknown telemetry 'NVML'; did you mean 'nvml'\?"):
        select("NVML")


def test_unknown_fake_preset_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError, match=r"unknown fake telemetry preset 'h100-80'; did you mean 'h100-80g'\?"):
        select("fake:h100-80")


def test_fake_needs_a_preset_and_others_take_no_argument() -> None:
    with pytest.raises(ConfigError, match=r"needs a preset: fake:<preset>, presets: a100-40g"):
        select("fake")
    with pytest.raises(ConfigError, match="takes no argument"):
        select("smi:fast")


def test_fake_is_selected_with_its_node() -> None:
    t = select(" fake:h100-80g ", node="gpu-n1")
    assert isinstance(t, FakeTelemetry) and t.name == "fake:h100-80g" and t.node == "gpu-n1"


def test_nvml_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml → ImportError
    with pytest.raises(ConfigError, match="pip install nvidia-ml-py"):
        select("nvml")


def test_auto_prefers_nvml(fake_pynvml: Callable[..., types.ModuleType]) -> None:
    fake_pynvml("rtx3090ti")
    with subproc.replay({}) as r:  # nvidia-smi must not even be tried
        t = select("auto")
    assert isinstance(t, NvmlTelemetry) and r.calls == []


def test_auto_falls_back_to_nvidia_smi(fake_pynvml: Callable[..., types.ModuleType],
                                       smi_replay: Callable[[str], subproc.Replay]) -> None:
    fake_pynvml("rtx3090ti", init_error=9)  # driver not loaded
    smi_replay("rtx3090ti")
    t = select("auto")
    assert isinstance(t, SmiTelemetry) and t.gpus()[0].name == "NVIDIA GeForce RTX 3090 Ti"


def test_auto_never_falls_back_to_fake(fake_pynvml: Callable[..., types.ModuleType]) -> None:
    fake_pynvml("rtx3090ti", init_error=12)
    with subproc.replay(NO_SMI), pytest.raises(ConfigError) as info:
        select("auto")
    msg = str(info.value)
    assert msg.startswith("no GPU telemetry: NVML did not initialise")
    assert "NVML Shared Library Not Found" in msg and "nvidia-smi was not found" in msg
    assert "--telemetry fake:<preset>" in msg and "rtx3060-12g" in msg


def test_auto_reports_a_broken_nvidia_smi(fake_pynvml: Callable[..., types.ModuleType]) -> None:
    fake_pynvml("rtx3090ti", init_error=9)
    broken = {argv: subproc.Reply(stdout="NVIDIA-SMI has failed because it couldn't communicate with the "
                                         "NVIDIA driver.", returncode=9) for argv in smi_mapping("rtx3090ti")}
    with subproc.replay(broken), pytest.raises(ConfigError, match="couldn't communicate with the NVIDIA driver"):
        select("auto")


def test_auto_with_a_deferred_nvml_error(registry: None) -> None:
    register("nvml", _Probe, error=base.NVML_MISSING)
    with subproc.replay(NO_SMI), pytest.raises(ConfigError, match="pip install nvidia-ml-py and nvidia-smi was"):
        select("auto")


def test_package_import_does_not_import_pynvml_or_backends() -> None:
    code = ("import sys, slurm_gpuarb.telemetry as t; "
            "bad = [m for m in ('pynvml', 'slurm_gpuarb.telemetry.nvml', 'slurm_gpuarb.telemetry.smi') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


def test_presets_are_reexported() -> None:
    assert "dgx-h100" in presets()


def test_proc_identity_of_this_process() -> None:
    comm, uid, user = proc_identity(os.getpid())
    assert comm == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
    assert uid == os.getuid()
    assert user == pwd.getpwuid(os.getuid()).pw_name


def test_proc_identity_of_an_invisible_process(tmp_path: Path) -> None:
    assert proc_identity(4242, tmp_path) == (None, None, None)
