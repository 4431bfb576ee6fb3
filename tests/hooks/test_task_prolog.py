"""The TaskProlog: reads only the grant file and speaks export/print lines."""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import pytest

from slurm_gpuarb.hooks import grants, task_prolog

from .conftest import Cluster, FakeDaemon, Respond

Factory = Callable[[Respond], FakeDaemon]


def _task_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    # The job's environment: no comment, no uid/user variables of the Prolog.
    env = {"GPUARB_CONFIG": str(cluster.config), "SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1",
           "SLURM_JOB_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0", "HOME": "/home/alice"}
    env.update(extra)
    return {k: v for k, v in env.items() if v != ""}


def _write(cluster: Cluster, grant: grants.Grant) -> None:
    grants.write_grant(str(cluster.state_dir), grant, gid=os.getgid())


def _run(cluster: Cluster, **extra: str) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = task_prolog.main(_task_env(cluster, **extra), out)
    return code, out.getvalue().splitlines()


def _granted(**kw: object) -> grants.Grant:
    g = grants.Grant(grants.GRANTED, "12", "n1", 0, lease_id="L1", vram_mib=6144, quantum_mib=512,
                     exports={"CUDA_VISIBLE_DEVICES": "MIG-4f1c", "GPUARB_VRAM_MB": "6144",
                              "GPUARB_LEASE_ID": "L1", "VLLM_ARGS": "--gpu-memory-utilization 0.075"})
    for k, v in kw.items():
        setattr(g, k, v)
    return g


def test_grant_prints_export_lines(cluster: Cluster, daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: {})
    _write(cluster, _granted())
    code, lines = _run(cluster)
    assert code == 0
    assert lines == ["export CUDA_VISIBLE_DEVICES=MIG-4f1c", "export GPUARB_VRAM_MB=6144", "export GPUARB_LEASE_ID=L1",
                     "export VLLM_ARGS=--gpu-memory-utilization 0.075"]
    assert d.requests == []  # never the daemon


def test_refusal_prints_the_reason_and_fails_the_job(cluster: Cluster) -> None:
    _write(cluster, grants.Grant(grants.REFUSED, "12", "n1", reason="only 2048MiB free on gpu0 (asked 6144MiB)"))
    code, lines = _run(cluster)
    assert code == 1
    assert lines == ["print gpuarb: job refused: only 2048MiB free on gpu0 (asked 6144MiB)"]


def test_no_grant_for_a_gpu_job_warns_and_runs(cluster: Cluster) -> None:
    code, lines = _run(cluster)
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith("print gpuarb: warning: no grant for job 12 on n1")


def test_cpu_job_prints_nothing(cluster: Cluster) -> None:
    _write(cluster, _granted())  # even a stray grant is not read
    assert _run(cluster, SLURM_JOB_GPUS="", CUDA_VISIBLE_DEVICES="") == (0, [])


def test_shard_job_without_job_gpus_still_reads_its_grant(cluster: Cluster) -> None:
    _write(cluster, _granted(vram_mib=6144))
    code, lines = _run(cluster, SLURM_JOB_GPUS="", SLURM_SHARDS_ON_NODE="12")
    assert code == 0 and lines[0] == "export CUDA_VISIBLE_DEVICES=MIG-4f1c"
    assert not any(line.startswith("print") for line in lines)  # 12 × 512 = 6144


def test_shard_mismatch_warns(cluster: Cluster) -> None:
    _write(cluster, _granted(vram_mib=6144))
    code, lines = _run(cluster, SLURM_SHARDS_ON_NODE="8")
    assert code == 0
    assert lines[-1] == ("print gpuarb: warning: Slurm gave this job 8 shards (4096MiB at 512MiB each) "
                         "but its lease L1 holds 6144MiB")


def test_malformed_shard_count_warns(cluster: Cluster) -> None:
    _write(cluster, _granted())
    _, lines = _run(cluster, SLURM_SHARDS_ON_NODE="lots")
    assert lines[-1] == "print gpuarb: warning: SLURM_SHARDS_ON_NODE=lots is not a number"


def test_a_value_spanning_lines_is_never_printed(cluster: Cluster) -> None:
    # The Prolog refuses to write one; a tampered or foreign file must still not inject a line.
    cluster.grant_file().parent.mkdir(parents=True)
    cluster.grant_file().write_text("version=1\nstatus=granted\njob_id=12\nnode=n1\nexport.A=1\n"
                                    "export.B=x\rexport LD_PRELOAD=/tmp/x.so\n")
    code, lines = _run(cluster)
    assert code == 0
    assert len(lines) == 1 and lines[0].startswith("print gpuarb: warning: no usable grant")


def test_unleased_grant_warns_and_runs(cluster: Cluster) -> None:
    _write(cluster, grants.Grant(grants.UNLEASED, "12", "n1", reason="unleased: ledger unavailable (down)"))
    assert _run(cluster) == (0, ["print gpuarb: warning: unleased: ledger unavailable (down)"])


def test_grant_of_another_run_is_ignored(cluster: Cluster) -> None:
    _write(cluster, _granted())  # run 0's
    code, lines = _run(cluster, SLURM_RESTART_COUNT="1")
    assert code == 0
    assert lines == ["print gpuarb: warning: the grant is for run 0 of job 12, this is run 1; running without a lease"]


def test_matching_restart_count_is_used(cluster: Cluster) -> None:
    g = _granted()
    g.restart_count = 2
    _write(cluster, g)
    code, lines = _run(cluster, SLURM_RESTART_COUNT="2")
    assert code == 0 and lines[0].startswith("export ")


@pytest.mark.parametrize(("fail_mode", "code"), [("open", 0), ("closed", 1)])
def test_unreadable_grant_follows_fail_mode(cluster: Cluster, fail_mode: str, code: int) -> None:
    cluster.write_config(fail_mode=fail_mode)
    cluster.grant_file().parent.mkdir(parents=True)
    cluster.grant_file().write_text("garbage")
    got, lines = _run(cluster)
    assert got == code
    assert ("job refused" in lines[0]) is (code == 1)


def test_reason_with_newlines_is_one_print_line(cluster: Cluster) -> None:
    cluster.grant_file().parent.mkdir(parents=True)
    # A grant file cannot hold a newline in a value, but a reason can be long and full of spaces.
    _write(cluster, grants.Grant(grants.REFUSED, "12", "n1", reason="a   b\tc"))
    assert _run(cluster) == (1, ["print gpuarb: job refused: a b c"])


def test_writes_to_stdout_by_default(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    _write(cluster, _granted())
    assert task_prolog.main(_task_env(cluster)) == 0
    assert capsys.readouterr().out.startswith("export CUDA_VISIBLE_DEVICES=MIG-4f1c\n")


def test_a_bug_warns_and_lets_the_task_run(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(cluster, _granted())

    def broken(*a: object) -> None:
        raise KeyError("oops")

    monkeypatch.setattr(grants, "read_grant", broken)
    assert _run(cluster) == (0, ["print gpuarb: warning: the TaskProlog failed (KeyError); running without a lease"])
