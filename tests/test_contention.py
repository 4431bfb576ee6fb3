"""bench/contention.py: its summaries, its refusal to run without PyTorch or a GPU, its orchestration (a dry run
with a stub ``torch``, fake telemetry and the fake MPS binary: the numbers mean nothing, the wiring is what is
checked), and, in the ``gpu`` tier, a short real run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from mpsfake import FakeControl, installed

from slurm_gpuarb import mps, subproc

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "contention.py"
SMI = ("nvidia-smi", "--id=0", "--query-gpu=name,driver_version,memory.total,compute_mode",
       "--format=csv,noheader,nounits")

# Just enough of torch's API for the workers to run their loops (no GPU, no numbers worth reading).
STUB_TORCH = '''
__version__ = "stub"
float16 = "float16"
class version:
    cuda = "stub"
class cuda:
    is_available = staticmethod(lambda: AVAILABLE)
    synchronize = staticmethod(lambda: None)
    set_per_process_memory_fraction = staticmethod(lambda f: None)
class _T:
    def __matmul__(self, other): return self
    def __mul__(self, other): return self
def device(name): return name
def randn(*a, **k): return _T()
def empty_like(t): return _T()
def matmul(a, b, out=None): return out
def relu(t): return t
'''


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("contention", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


contention = _load()


@pytest.fixture
def stub_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The stub ``torch`` first on this process's path and the workers' (``PYTHONPATH``); gone afterwards."""
    stub = _stub(tmp_path)
    monkeypatch.syspath_prepend(str(stub))
    monkeypatch.setenv("PYTHONPATH", f"{stub}{os.pathsep}{REPO}")
    sys.modules.pop("torch", None)
    try:
        yield stub
    finally:
        sys.modules.pop("torch", None)


def _stub(tmp_path: Path, *, available: bool = True, missing: bool = False) -> Path:
    d = tmp_path / "stub"
    (d / "torch").mkdir(parents=True)
    text = 'raise ImportError("no torch here")\n' if missing else f"AVAILABLE = {available}\n" + STUB_TORCH
    (d / "torch" / "__init__.py").write_text(text)
    return d


# --------------------------------------------------------------------------- pure parts


def test_percentiles_are_nearest_rank() -> None:
    samples = [float(i) for i in range(1, 101)]
    assert (contention.percentile(samples, 0.5), contention.percentile(samples, 0.99)) == (50.0, 99.0)
    assert contention.percentile([7.0], 0.99) == 7.0
    with pytest.raises(ValueError):
        contention.percentile([], 0.5)
    s = contention.latency_summary([3.0, 1.0, 2.0])
    assert (s["p50_ms"], s["p99_ms"], s["min_ms"], s["max_ms"], s["steps"]) == (2.0, 3.0, 1.0, 3.0, 3)


def test_batch_throughput_and_the_summary() -> None:
    b = contention.batch_summary([{"iters": 100, "seconds": 2.0}, {"iters": 50, "seconds": 1.0}], 1000)
    assert b == {"workers": 2, "matmuls_per_s": 100.0, "tflops": 0.2}
    runs = {"alone": {"llm": {"p50_ms": 0.5}}, "time_sliced": {"llm": {"p50_ms": 5.0}},
            "batch_alone": {"batch": {"matmuls_per_s": 200.0}}, "mps_uncapped": {"llm": {"p50_ms": 15.0},
                                                                                 "batch": {"matmuls_per_s": 180.0}},
            "mps_capped": {"llm": {"p50_ms": 0.7}, "batch": {"matmuls_per_s": 126.0}}}
    assert contention.summarize(runs) == {
        "time_sliced_p50_over_alone": 10.0, "mps_uncapped_p50_over_alone": 30.0, "mps_capped_p50_over_alone": 1.4,
        "capped_batch_over_uncapped": 0.7, "capped_batch_over_batch_alone": 0.63}
    assert contention.summarize({"mps_capped": {"skipped": "no binary"}}) == {}


# --------------------------------------------------------------------------- no PyTorch, no GPU


@pytest.mark.parametrize(("missing", "message"), [
    (True, "PyTorch is not installed"), (False, "PyTorch sees no CUDA GPU"),
])
def test_without_torch_or_gpu_it_exits_2_and_writes_nothing(tmp_path: Path, missing: bool, message: str) -> None:
    stub = _stub(tmp_path, available=False, missing=missing)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(SCRIPT), "--short", "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": f"{stub}{os.pathsep}{REPO}"}, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Nothing was measured or written" in p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


# --------------------------------------------------------------------------- the orchestration, dry


@pytest.fixture
def fake_mps(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeControl]:
    with installed(monkeypatch) as f:
        yield f


def test_dry_run_wires_leases_knobs_and_mps_into_the_workers(tmp_path: Path, stub_torch: Path,
                                                             fake_mps: FakeControl) -> None:
    """Slower than a unit test (a few seconds: 11 worker processes, the ledger): the whole path but the GPU."""
    out = tmp_path / "out"
    with subproc.replay({SMI: "NVIDIA H100 80GB HBM3, 550.54.15, 81559, Default\n"}):
        code = contention.main(["--seconds", "0.05", "--warmup", "1", "--telemetry", "fake:h100-80g",
                                "--out", str(out)])
    assert code == 0
    r = json.loads((out / "contention.json").read_text())
    assert r["dry_run"] == "telemetry fake:h100-80g: not a measurement"
    assert r["machine"]["gpu"] == "NVIDIA H100 80GB HBM3" and r["machine"]["driver"] == "550.54.15"
    assert [b["exports"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] for b in r["leases"]["batch"]] == ["30", "30"]
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in r["leases"]["llm"]["exports"]
    assert set(r["runs"]) == set(contention.RUNS)
    for name in contention.RUNS:
        run = r["runs"][name]
        assert ("llm" in run) == (name != "batch_alone") and ("batch" in run) == (name != "alone")
    runs = r["runs"]
    assert runs["time_sliced"]["batch_env"]["CUDA_MPS_PIPE_DIRECTORY"].endswith("/no-mps")
    pipe = runs["mps_uncapped"]["batch_env"]["CUDA_MPS_PIPE_DIRECTORY"]
    assert pipe.endswith("/mps/gpu0/pipe")
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in runs["mps_uncapped"]["batch_env"]
    assert runs["mps_capped"]["batch_env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"  # from the grant
    assert runs["mps_capped"]["batch_env"]["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={2048 + 512}M"
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in runs["mps_capped"]["llm_env"]
    assert [c["args"] for c in fake_mps.calls()] == ["-d", ""]  # started, then quit
    md = (out / "contention.md").read_text()
    assert md.startswith("# Compute contention on one GPU") and "**DRY RUN**" in md
    assert "LLM + 2 batch, MPS, batch capped by their grant" in md


def test_without_the_mps_binary_the_mps_runs_are_skipped(tmp_path: Path, stub_torch: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mps, "SEARCH_DIRS", (str(tmp_path),))
    with subproc.replay({SMI: "NVIDIA H100 80GB HBM3, 550.54.15, 81559, Default\n"}):
        assert contention.main(["--seconds", "0.05", "--warmup", "1", "--telemetry", "fake:h100-80g",
                                "--out", str(tmp_path / "out")]) == 0
    r = json.loads((tmp_path / "out" / "contention.json").read_text())
    assert r["runs"]["mps_capped"] == {"skipped": f"no {mps.CONTROL} in {tmp_path}"}
    assert "skipped: no" in (tmp_path / "out" / "contention.md").read_text()


# --------------------------------------------------------------------------- the gpu tier


@pytest.mark.gpu
def test_short_contention_run_on_a_real_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch sees no CUDA GPU")
    p = subprocess.run([sys.executable, str(SCRIPT), "--short", "--out", str(tmp_path)], capture_output=True,
                       text=True, timeout=600, check=False, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "contention.json").read_text())
    assert "dry_run" not in r and r["machine"]["gpu"]
    for name in ("alone", "time_sliced"):
        assert r["runs"][name]["llm"]["steps"] > 0 and r["runs"][name]["llm"]["p50_ms"] > 0
    assert r["runs"]["batch_alone"]["batch"]["matmuls_per_s"] > 0
    if "skipped" not in r["runs"]["mps_capped"]:
        assert r["runs"]["mps_capped"]["batch_env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
