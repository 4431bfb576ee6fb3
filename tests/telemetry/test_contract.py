"""One contract, every backend (ReFrame's scheduler fixture): what any caller of Telemetry may rely on.

Backends: every fake preset, nvidia-smi replaying each fixture node, NVML through the pynvml
double for each fixture, and the real NVML under the ``gpu`` marker. A backend whose
deferred error is set here is skipped with that error as the reason.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from slurm_gpuarb import subproc
from slurm_gpuarb.errors import TelemetryError
from slurm_gpuarb.model import GpuInfo, GpuProcess, MigInstance
from slurm_gpuarb.telemetry import Telemetry, backends, select
from slurm_gpuarb.telemetry.fake import presets
from slurm_gpuarb.telemetry.nvml import NvmlTelemetry
from slurm_gpuarb.telemetry.smi import SmiTelemetry

from . import pynvml_double
from .conftest import NVML_DIR, NVML_FIXTURES, SMI_NODES, smi_mapping

CASES = (
    [pytest.param(f"fake:{p}", id=f"fake:{p}") for p in presets()]
    + [pytest.param(f"smi:{n}", id=f"smi:{n}") for n in SMI_NODES]
    + [pytest.param(f"nvml:{f}", id=f"nvml:{f}") for f in NVML_FIXTURES]
    + [pytest.param("nvml:real", id="nvml:real", marks=pytest.mark.gpu)]
)
_PROFILE_RE = re.compile(r"\d+g\.\d+gb\S*")


@pytest.fixture(params=CASES)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Telemetry]:
    kind, _, which = request.param.partition(":")
    error = backends().get(kind)
    if error is not None:
        pytest.skip(error)
    with ExitStack() as stack:
        if kind == "fake":
            t: Telemetry = select(request.param, node="contract")
        elif kind == "smi":
            stack.enter_context(subproc.replay(smi_mapping(which)))
            t = SmiTelemetry(probe=True, proc_root=tmp_path)
        elif which == "real":
            import pynvml

            try:
                t = NvmlTelemetry(pynvml)
            except TelemetryError as e:
                pytest.skip(f"no usable NVIDIA GPU here ({e})")
        else:
            t = NvmlTelemetry(pynvml_double.build(pynvml_double.load(NVML_DIR / f"{which}.json")), proc_root=tmp_path)
        with t:
            yield t


def test_gpus_are_model_types_with_plain_fields(backend: Telemetry) -> None:
    gpus = backend.gpus()
    assert isinstance(gpus, list) and gpus
    for g in gpus:
        assert type(g) is GpuInfo
        for name in ("index", "total_mib", "reserved_mib", "used_mib"):
            assert type(getattr(g, name)) is int, name
        assert type(g.uuid) is str and type(g.name) is str and type(g.pci_bus_id) is str
        assert g.minor is None or type(g.minor) is int
        assert g.sku is None or type(g.sku) is str
        assert type(g.mig_enabled) is bool and type(g.mig_instances) is tuple
        for m in g.mig_instances:
            assert type(m) is MigInstance
            assert all(type(getattr(m, f)) is int for f in ("memory_mib", "gi_id", "ci_id"))
            for f in ("placement_start", "placement_size"):
                assert getattr(m, f) is None or type(getattr(m, f)) is int


def test_indices_are_unique_and_contiguous(backend: Telemetry) -> None:
    # No fixture or preset hides a GPU; a real node that does must document its gaps.
    indices = [g.index for g in backend.gpus()]
    assert indices == list(range(len(indices)))


def test_identities_are_unique(backend: Telemetry) -> None:
    gpus = backend.gpus()
    assert all(g.uuid.startswith("GPU-") for g in gpus)
    assert len({g.uuid for g in gpus}) == len(gpus)
    minors = [g.minor for g in gpus if g.minor is not None]
    assert len(set(minors)) == len(minors) and all(m >= 0 for m in minors)
    migs = [m.uuid for g in gpus for m in g.mig_instances]
    assert len(set(migs)) == len(migs) and all(u.startswith("MIG-") for u in migs)


def test_memory_is_consistent(backend: Telemetry) -> None:
    for g in backend.gpus():
        assert g.total_mib > g.reserved_mib >= 0, g
        assert 0 <= g.used_mib <= g.total_mib, g


def test_mig_instances_fit_their_gpu(backend: Telemetry) -> None:
    for g in backend.gpus():
        if not g.mig_enabled:
            assert g.mig_instances == ()
            continue
        assert sum(m.memory_mib for m in g.mig_instances) <= g.total_mib - g.reserved_mib
        for m in g.mig_instances:
            assert 0 < m.memory_mib <= g.total_mib and _PROFILE_RE.fullmatch(m.profile), m
        gis = [m.gi_id for m in g.mig_instances]
        assert len(set(gis)) == len(gis)


def test_processes_reference_existing_gpus(backend: Telemetry) -> None:
    gpus = {g.index: g for g in backend.gpus()}
    procs = backend.processes()
    assert isinstance(procs, list)
    for p in procs:
        assert type(p) is GpuProcess and type(p.pid) is int and p.pid > 0
        assert p.gpu_index in gpus and type(p.used_mib) is int and p.used_mib >= 0
        assert p.mig_uuid is None or p.mig_uuid in {m.uuid for m in gpus[p.gpu_index].mig_instances}
        assert type(p.name) is str and (p.uid is None or type(p.uid) is int)
    for index, g in gpus.items():
        assert sum(p.used_mib for p in procs if p.gpu_index == index) <= g.total_mib - g.reserved_mib


def test_identity_is_stable_between_calls(backend: Telemetry) -> None:
    first = [(g.index, g.uuid, g.minor, g.pci_bus_id, g.total_mib) for g in backend.gpus()]
    second = [(g.index, g.uuid, g.minor, g.pci_bus_id, g.total_mib) for g in backend.gpus()]
    assert first == second


def test_close_is_idempotent(backend: Telemetry) -> None:
    backend.close()
    backend.close()
    assert isinstance(backend.name, str) and backend.name
