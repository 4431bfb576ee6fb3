"""Fixtures shared by the telemetry tests: replayed nvidia-smi, a pynvml double, a fake-state dir."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path

import pytest

from slurm_gpuarb import subproc
from slurm_gpuarb.telemetry import smi

from . import pynvml_double

DATA = Path(__file__).resolve().parent.parent / "data"
SMI_DIR = DATA / "smi"
NVML_DIR = DATA / "nvml"

# fixture file → the argv it answers (see tests/data/smi/README.md)
_SMI_FILES: Mapping[str, tuple[str, ...]] = {
    "query-gpu.csv": smi.GPU_ARGV,
    "query-gpu-old.csv": smi.GPU_ARGV_OLD,
    "compute-apps.csv": smi.APPS_ARGV,
    "q.txt": smi.QUERY_ARGV,
    "L.txt": smi.LIST_ARGV,
}


def smi_mapping(node: str) -> dict[tuple[str, ...], subproc.ReplyLike]:
    """argv → recorded reply for the nvidia-smi fixtures of one node directory."""
    base = SMI_DIR / node
    mapping: dict[tuple[str, ...], subproc.ReplyLike] = {
        argv: base / name for name, argv in _SMI_FILES.items() if (base / name).is_file()
    }
    failing = base / "query-gpu.stdout"
    if failing.is_file():
        mapping[smi.GPU_ARGV] = subproc.Reply(stdout=failing, returncode=2)
    return mapping


SMI_NODES = sorted(p.name for p in SMI_DIR.iterdir() if p.is_dir())
NVML_FIXTURES = sorted(p.stem for p in NVML_DIR.glob("*.json"))


@pytest.fixture
def smi_replay() -> Iterator[Callable[[str], subproc.Replay]]:
    """Enter a replay of one node's nvidia-smi fixtures; it lasts until the test ends."""
    with ExitStack() as stack:
        yield lambda node: stack.enter_context(subproc.replay(smi_mapping(node)))


@pytest.fixture
def fake_pynvml(monkeypatch: pytest.MonkeyPatch) -> Callable[..., types.ModuleType]:
    """Build a pynvml double from ``tests/data/nvml/<name>.json`` and install it as ``pynvml``."""

    def install(name: str, **options: object) -> types.ModuleType:
        module = pynvml_double.build(pynvml_double.load(NVML_DIR / f"{name}.json"), **options)  # type: ignore[arg-type]
        monkeypatch.setitem(sys.modules, "pynvml", module)
        return module

    return install


@pytest.fixture
def fake_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty ``$GPUARB_FAKE_STATE`` directory for this test."""
    state = tmp_path / "fake-state"
    monkeypatch.setenv("GPUARB_FAKE_STATE", str(state))
    yield state
