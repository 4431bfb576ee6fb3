"""The SlurmAdapter interface, JobInfo, the registry with its deferred errors, and the pyslurm adapter."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import types
from collections.abc import Iterable

import pytest

from slurm_gpuarb.errors import ConfigError, GpuArbError
from slurm_gpuarb.slurm import base
from slurm_gpuarb.slurm.base import (
    PYSLURM_ERROR,
    JobInfo,
    SlurmAdapter,
    SlurmError,
    adapters,
    register,
    select_adapter,
)
from slurm_gpuarb.slurm.cli import CliSlurmAdapter

HAVE_PYSLURM = importlib.util.find_spec("pyslurm") is not None


def job(job_id: str, state: str, nodes: tuple[str, ...] = ("n1",)) -> JobInfo:
    return JobInfo(job_id=job_id, state=state, restart_count=0, nodes=nodes, comment="", partition="p", qos="",
                   user="u", uid=1000, tres_per_node="", gres_shards=None)


class ListAdapter(SlurmAdapter):
    """The smallest adapter: what other modules' test doubles look like."""

    name = "list"

    def __init__(self, jobs: list[JobInfo]) -> None:
        self._jobs = jobs

    def jobs(self, job_ids: Iterable[str | int] | None = None) -> list[JobInfo]:
        return list(self._jobs)

    def drain(self, node: str, reason: str) -> None:
        raise NotImplementedError

    def resume(self, node: str) -> None:
        raise NotImplementedError

    def node_state(self, node: str) -> str:
        return "IDLE"


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """The registry, restored after the test."""
    saved = dict(base._REGISTRY)
    monkeypatch.setattr(base, "_REGISTRY", saved)
    return saved  # type: ignore[return-value]


# --------------------------------------------------------------------------- JobInfo and the interface


def test_jobinfo_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        job("1", "RUNNING").state = "PENDING"  # type: ignore[misc]


def test_slurm_error_is_a_gpuarb_error() -> None:
    assert issubclass(SlurmError, GpuArbError)


@pytest.mark.parametrize(("state", "nodes", "holds"), [
    ("RUNNING", ("n1",), True),
    ("CONFIGURING", ("n1",), True),
    ("COMPLETING", ("n1",), True),
    ("SUSPENDED", ("n1",), True),
    ("REQUEUED", ("n1",), True),
    ("PENDING", ("n1",), False),
    ("COMPLETED", ("n1",), False),
    ("CANCELLED", ("n1",), False),
    ("NODE_FAIL", ("n1",), False),
    ("RUNNING", (), False),
])
def test_holds_allocation(state: str, nodes: tuple[str, ...], holds: bool) -> None:
    assert job("1", state, nodes).holds_allocation is holds


def test_running_on_default_uses_jobs() -> None:
    slurm = ListAdapter([job("1", "RUNNING"), job("2", "COMPLETED"), job("3", "COMPLETING", ("n1", "n2")),
                         job("4", "RUNNING", ("n2",)), job("5", "PENDING", ())])
    assert [j.job_id for j in slurm.running_on("n1")] == ["1", "3"]
    assert [j.job_id for j in slurm.running_on("n2")] == ["3", "4"]


def test_the_interface_is_only_the_contract() -> None:
    assert SlurmAdapter.__abstractmethods__ == frozenset({"jobs", "drain", "resume", "node_state"})


# --------------------------------------------------------------------------- registry


def test_default_is_the_cli_adapter() -> None:
    slurm = select_adapter()
    assert isinstance(slurm, CliSlurmAdapter) and slurm.name == "cli"
    assert (slurm.squeue, slurm.scontrol) == ("/usr/bin/squeue", "/usr/bin/scontrol")


def test_select_passes_bin_dir_and_timeout() -> None:
    slurm = select_adapter("cli", bin_dir="/opt/slurm/bin", timeout=2.5)
    assert isinstance(slurm, CliSlurmAdapter)
    assert (slurm.squeue_argv[0], slurm.timeout) == ("/opt/slurm/bin/squeue", 2.5)


@pytest.mark.skipif(HAVE_PYSLURM, reason="pyslurm is installed here")
def test_pyslurm_is_registered_with_its_deferred_error() -> None:
    assert adapters() == {"cli": None, "pyslurm": PYSLURM_ERROR}
    with pytest.raises(ConfigError) as e:
        select_adapter("pyslurm")
    assert str(e.value) == PYSLURM_ERROR
    assert "use the default cli adapter" in str(e.value)


@pytest.mark.parametrize(("name", "words"), [("clii", "did you mean 'cli'?"), ("slurmrestd", "expected one of: cli")])
def test_unknown_adapter(name: str, words: str) -> None:
    with pytest.raises(ConfigError, match="unknown Slurm adapter") as e:
        select_adapter(name)
    assert words in str(e.value)


def test_relative_bin_dir_is_refused() -> None:
    with pytest.raises(ConfigError, match="absolute path"):
        select_adapter(bin_dir="usr/bin")


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan")])
def test_timeout_must_be_positive(timeout: float) -> None:
    with pytest.raises(ConfigError, match="positive"):
        select_adapter(timeout=timeout)


def test_register_replaces_and_defers(registry: dict[str, object]) -> None:
    register("list", lambda bin_dir, timeout: ListAdapter([]))
    assert isinstance(select_adapter("list"), ListAdapter)
    register("list", lambda bin_dir, timeout: ListAdapter([]), error="install list-slurm")
    assert adapters()["list"] == "install list-slurm"
    with pytest.raises(ConfigError, match="install list-slurm"):
        select_adapter("list")


# --------------------------------------------------------------------------- pyslurm


@pytest.mark.skipif(HAVE_PYSLURM, reason="pyslurm is installed here")
def test_pyslurm_adapter_without_pyslurm() -> None:
    from slurm_gpuarb.slurm.pyslurm import PyslurmAdapter

    with pytest.raises(ConfigError, match=r"pyslurm has no release matching Slurm 22\.05"):
        PyslurmAdapter()


def pyslurm_double(jobs: dict[int, object] | Exception) -> types.ModuleType:
    """A stand-in for pyslurm ≥ 23.2's job API (Jobs.load() → {id: Job}); real pyslurm cannot build here."""

    def load() -> dict[int, object]:
        if isinstance(jobs, Exception):
            raise jobs
        return jobs

    module = types.ModuleType("pyslurm")
    module.Jobs = types.SimpleNamespace(load=load)  # type: ignore[attr-defined]
    return module


def test_pyslurm_adapter_maps_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_gpuarb.slurm.pyslurm import PyslurmAdapter

    running = types.SimpleNamespace(id=5, state="RUNNING", requeue_count=1, allocated_nodes="n[1-2]",
                                    comment="gpuarb: vram=2GiB", partition="shard", qos="normal", user_name="alice",
                                    user_id=1000, gres_per_node={"shard": 4})
    pending = types.SimpleNamespace(id=6, state="PENDING", requeue_count=0, allocated_nodes=None, comment=None,
                                    partition="batch", qos=None, user_name="bob", user_id=1001, gres_per_node={})
    monkeypatch.setitem(sys.modules, "pyslurm", pyslurm_double({5: running, 6: pending}))
    slurm = PyslurmAdapter()
    assert slurm.jobs(["5"]) == [JobInfo(job_id="5", state="RUNNING", restart_count=1, nodes=("n1", "n2"),
                                         comment="gpuarb: vram=2GiB", partition="shard", qos="normal", user="alice",
                                         uid=1000, tres_per_node="gres:shard:4", gres_shards=4)]
    assert [(j.job_id, j.nodes, j.comment, j.gres_shards) for j in slurm.running_on("n2")] == [("5", ("n1", "n2"),
                                                                                               "gpuarb: vram=2GiB", 4)]
    assert slurm.jobs()[1].nodes == ()


def test_pyslurm_adapter_failure_is_a_slurm_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from slurm_gpuarb.slurm.pyslurm import PyslurmAdapter

    monkeypatch.setitem(sys.modules, "pyslurm", pyslurm_double(RuntimeError("slurm_load_jobs: timeout")))
    with pytest.raises(SlurmError, match="pyslurm could not load Slurm's jobs") as e:
        PyslurmAdapter().jobs()
    assert "slurm_load_jobs: timeout" in str(e.value)
