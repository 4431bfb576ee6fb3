"""The Prolog's share=mps part: the MPS control daemon it starts (a fake binary), time-slicing without one,
a refusal when another user's daemon serves the GPU, and never a non-zero exit; end to end through the
real in-process Handlers, the thread cap a batch lease gets and an llm lease does not."""

from __future__ import annotations

import io
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mpsfake import FakeControl, installed

from slurm_gpuarb import mps
from slurm_gpuarb.hooks import common, grants, prolog, task_prolog

from .conftest import Cluster, FakeDaemon, Respond, grant_answer

Factory = Callable[[Respond], FakeDaemon]
REPO = Path(__file__).resolve().parents[2]
REAL_IN_PROCESS = common.in_process  # before the cluster fixture replaces it
UUID = "GPU-fake-dgx-h100-3"
MPS_EXPORTS = {"GPUARB_VRAM_MB": "4096", "GPUARB_LEASE_ID": "L1", "GPUARB_PRIO": "batch", "GPUARB_SHARE": "mps",
               "GPUARB_MPS_DEVICE": UUID, "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30",
               "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=4608M"}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeControl]:
    with installed(monkeypatch) as f:
        yield f


@pytest.fixture
def no_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-driver"
    empty.mkdir()
    monkeypatch.setattr(mps, "SEARCH_DIRS", (str(empty),))


def _answer(exports: dict[str, str] | None = None, gpus: list[int] | None = None) -> dict[str, Any]:
    a = grant_answer(vram=4096, exports=dict(MPS_EXPORTS if exports is None else exports))
    a["grant"]["gpus"] = [3] if gpus is None else gpus
    return a


def _grant(cluster: Cluster, job: str = "12") -> grants.Grant:
    g = grants.read_grant(str(cluster.state_dir), "n1", job)
    assert g is not None, cluster.log()
    return g


def test_without_the_binary_the_job_runs_time_sliced_with_its_thread_cap(cluster: Cluster, daemon_factory: Factory,
                                                                         no_binary: None) -> None:
    daemon_factory(lambda req: _answer())
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert g.status == "granted"
    assert g.exports == {"GPUARB_VRAM_MB": "4096", "GPUARB_LEASE_ID": "L1", "GPUARB_PRIO": "batch",
                         "GPUARB_SHARE": "mps", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "30"}
    assert "prolog: no MPS control binary; share=mps runs time-sliced job=12 node=n1 restart=0 gpu=3" in cluster.log()


def test_the_prolog_starts_the_users_daemon_and_points_the_job_at_it(cluster: Cluster, daemon_factory: Factory,
                                                                   fake: FakeControl) -> None:
    daemon_factory(lambda req: _answer())
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    pipe = f"{cluster.state_dir}/mps/gpu3/pipe"
    assert g.exports == {**{k: v for k, v in MPS_EXPORTS.items() if k != "GPUARB_MPS_DEVICE"},
                         "CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_VISIBLE_DEVICES": UUID}
    (call,) = fake.calls()
    assert (call["args"], call["uid"], call["pipe"], call["dev"]) == ("-d", str(os.getuid()), pipe, UUID)
    assert "prolog: MPS server started job=12" in cluster.log()

    # The same user's next job on that GPU shares the daemon.
    assert prolog.main(cluster.env(SLURM_JOB_ID="13")) == 0
    assert _grant(cluster, "13").exports["CUDA_MPS_PIPE_DIRECTORY"] == pipe
    assert len(fake.calls()) == 1 and "prolog: MPS server running job=13" in cluster.log()


def test_a_daemon_that_does_not_start_leaves_the_job_time_sliced(cluster: Cluster, daemon_factory: Factory,
                                                                fake: FakeControl) -> None:
    fake.mode("fail")
    daemon_factory(lambda req: _answer())
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert g.status == "granted" and "CUDA_MPS_PIPE_DIRECTORY" not in g.exports
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in g.exports
    assert g.exports["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "30"
    assert "no MPS server; share=mps runs time-sliced" in cluster.log()
    assert "boom: no CUDA-capable device" in cluster.log()


@pytest.mark.skipif(os.geteuid() != 0, reason="a process of another user needs root")
def test_another_users_daemon_serving_a_running_job_refuses_the_lease(cluster: Cluster, daemon_factory: Factory,
                                                                     fake: FakeControl) -> None:
    base = Path(mps.gpu_dir(str(cluster.state_dir), 3))
    (base / "pipe").mkdir(parents=True)
    (base / "jobs").mkdir()
    (base / "jobs" / "7").write_text("n1\n")
    other = subprocess.Popen(["nvidia-cuda-mps-control", "30"], executable="/bin/sleep", user=65534, group=65534)
    try:
        (base / "pipe" / mps.PID_FILE).write_text(f"{other.pid}\n")
        (base / "owner").write_text(f"65534 65534 {UUID}\n")
        grants.write_grant(str(cluster.state_dir), grants.Grant(grants.GRANTED, "7", "n1"), gid=None)  # job 7 runs
        daemon_factory(lambda req: _answer())
        assert prolog.main(cluster.env()) == 0  # a refusal, never a drained node
        g = _grant(cluster)
        assert g.status == "refused"
        assert g.reason is not None and g.reason.startswith("gpuarb: share=mps: GPU 3 runs the MPS server of uid "
                                                             "65534 for job(s) 7")
        assert other.poll() is None and fake.calls() == []
        assert "prolog: job refused job=12" in cluster.log()
    finally:
        other.kill()
        other.wait()


def test_a_bug_in_the_mps_step_never_fails_the_job(cluster: Cluster, daemon_factory: Factory, fake: FakeControl,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kw: object) -> mps.Outcome:
        raise RuntimeError("bug")

    monkeypatch.setattr(mps, "ensure", broken)
    daemon_factory(lambda req: _answer())
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert g.status == "granted" and "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in g.exports
    assert "MPS start failed; share=mps runs time-sliced" in cluster.log() and "RuntimeError: bug" in cluster.log()


def test_share_mps_on_several_gpus_starts_nothing(cluster: Cluster, daemon_factory: Factory,
                                                  fake: FakeControl) -> None:
    server_only = ("GPUARB_MPS_DEVICE", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT")  # the daemon sends neither for 2 GPUs
    exports = {k: v for k, v in MPS_EXPORTS.items() if k not in server_only}
    daemon_factory(lambda req: _answer(exports, gpus=[0, 1]))
    assert prolog.main(cluster.env(SLURM_JOB_GPUS="0,1")) == 0
    assert _grant(cluster).exports == exports
    assert fake.calls() == [] and "share=mps on 2 GPU(s) without one GPU's UUID runs time-sliced" in cluster.log()


def test_other_grants_never_look_for_mps(cluster: Cluster, daemon_factory: Factory,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("looked for MPS")

    monkeypatch.setattr(mps, "find_control", boom)
    daemon_factory(lambda req: grant_answer())
    assert prolog.main(cluster.env()) == 0
    assert _grant(cluster).status == "granted"


# --------------------------------------------------------------------------- end to end, real Handlers


@pytest.fixture
def real_fallback(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_binary: None) -> Cluster:
    """No daemon: the Prolog decides in-process on the test cluster's inventory (classes.batch has
    mps_thread_percent = 30, classes.llm none), with fake telemetry and a SQLite ledger."""
    monkeypatch.setattr(common, "in_process", REAL_IN_PROCESS)
    inventory = (REPO / "docker-slurm" / "inventory.toml").read_text().replace("version = 1\n", "", 1)
    (tmp_path / "fake").mkdir()
    cluster.write_config(quantum=None, extra=f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n'
                               f'[telemetry]\nfake_state = "{tmp_path}/fake"\n' + inventory)
    return cluster


def _task_exports(cluster: Cluster, env: dict[str, str]) -> dict[str, str]:
    out = io.StringIO()
    task_env = {"GPUARB_CONFIG": env["GPUARB_CONFIG"], "SLURM_JOB_ID": env["SLURM_JOB_ID"], "SLURMD_NODENAME": "n1",
                "SLURM_JOB_GPUS": env["SLURM_JOB_GPUS"]}
    assert task_prolog.main(task_env, out) == 0, out.getvalue()
    pairs = [line.removeprefix("export ").split("=", 1) for line in out.getvalue().splitlines()
             if line.startswith("export ")]
    return dict(pairs)


@pytest.mark.parametrize(("job", "comment", "partition", "cap"), [
    ("21", "gpuarb: vram=4GiB prio=batch share=mps", "batch", "30"),
    ("22", "gpuarb: vram=4GiB prio=llm share=mps", "llm", None),
    ("23", "gpuarb: vram=4GiB prio=batch", "batch", None),
])
def test_the_thread_cap_reaches_batch_mps_jobs_only(real_fallback: Cluster, job: str, comment: str, partition: str,
                                                   cap: str | None) -> None:
    env = real_fallback.env(SLURM_JOB_ID=job, SLURM_JOB_COMMENT=comment, SLURM_JOB_PARTITION=partition,
                            SLURM_JOB_GPUS="2")
    assert prolog.main(env) == 0
    exports = _task_exports(real_fallback, env)
    assert exports["GPUARB_VRAM_MB"] == "4096", real_fallback.log()
    assert exports.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") == cap
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" not in exports  # no MPS server runs here
    assert ("GPUARB_SHARE" in exports) == ("share=mps" in comment)


def test_the_epilog_stops_the_daemon_when_its_last_job_ends(cluster: Cluster, daemon_factory: Factory,
                                                            fake: FakeControl) -> None:
    from slurm_gpuarb.hooks import epilog

    def respond(req: dict[str, Any]) -> Any:
        return _answer() if req["op"] == "job_start" else {"v": 1, "ok": True, "released": ["L1"]}

    daemon_factory(respond)
    assert prolog.main(cluster.env()) == 0
    state = str(cluster.state_dir)
    assert mps.server_pid(state, 3) is not None
    assert epilog.main(cluster.env()) == 0
    assert mps.server_pid(state, 3) is None
    assert "epilog: MPS server stopped: its last job ended job=12 gpu=3" in cluster.log()
