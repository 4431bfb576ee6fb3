"""The cli adapter's job-changing calls (scontrol update JobId=, sbatch, scancel): exact argv, failures mapped."""

from __future__ import annotations

import subprocess

import pytest

from slurm_gpuarb import subproc
from slurm_gpuarb.slurm.base import JobNotPending, SlurmAdapter, SlurmError
from slurm_gpuarb.slurm.cli import CliSlurmAdapter

from .conftest import SCONTROL

SBATCH = "/usr/bin/sbatch"
SCANCEL = "/usr/bin/scancel"
# SLURM-LAB.md (recorded on 22.05.8): scontrol update of a job that started
NOT_PENDING = "slurm_update error: Job is no longer pending execution\n"
NO_CTLD = "sbatch: error: Batch job submission failed: Unable to contact slurm controller (connect failure)\n"


def update(job: str, *settings: str) -> tuple[str, ...]:
    return (SCONTROL, "update", f"JobId={job}", *settings)


# --------------------------------------------------------------------------- update_job


def test_update_job_is_one_scontrol_call_with_one_argument_per_field() -> None:
    comment = "run 7 gpuarb/1: vram=4096MiB prio=batch shards=8"
    expected = update("42", f"Comment={comment}", "TresPerNode=gres:shard:8")
    with subproc.replay({expected: ""}) as r:
        CliSlurmAdapter().update_job("42", Comment=comment, TresPerNode="gres:shard:8")
    assert r.calls == [expected]


def test_update_job_of_a_started_job_is_job_not_pending() -> None:
    argv = update("42", "TresPerNode=gres:shard:8")
    with subproc.replay({argv: subproc.Reply(returncode=1, stderr=NOT_PENDING)}), \
            pytest.raises(JobNotPending, match="no longer pending") as e:
        CliSlurmAdapter().update_job("42", TresPerNode="gres:shard:8")
    assert isinstance(e.value, SlurmError)


@pytest.mark.parametrize(("stderr", "words"), [
    ("slurm_update error: Invalid job id specified\n", "does not know job 42"),
    ("slurm_update error: Access/permission denied for job 42\n", "privileged uids"),
    ("slurm_update error: Unable to contact slurm controller (connect failure)\n", "slurmctld does not answer"),
])
def test_update_job_failures_say_what_to_do(stderr: str, words: str) -> None:
    argv = update("42", "Gres=shard:8")
    with subproc.replay({argv: subproc.Reply(returncode=1, stderr=stderr)}), pytest.raises(SlurmError) as e:
        CliSlurmAdapter().update_job("42", Gres="shard:8")
    assert words in str(e.value)
    assert not isinstance(e.value, JobNotPending)


@pytest.mark.parametrize("key", ["UserId", "TimeLimit", "comment", "Comment=x Gres"])
def test_update_job_keys_are_a_fixed_table(key: str) -> None:
    with subproc.replay({}) as r, pytest.raises(ValueError, match="cannot change"):
        CliSlurmAdapter().update_job("42", **{key: "1"})
    assert r.calls == []


@pytest.mark.parametrize("job", ["42 UserId=0", "-h", "", "x", "42;ls"])
def test_update_job_checks_the_job_id(job: str) -> None:
    with subproc.replay({}) as r, pytest.raises(SlurmError, match="not a Slurm job id"):
        CliSlurmAdapter().update_job(job, Comment="x")
    assert r.calls == []


def test_update_job_refuses_control_characters() -> None:
    with subproc.replay({}) as r, pytest.raises(SlurmError, match="control characters"):
        CliSlurmAdapter().update_job("42", Comment="gpuarb/1: vram=1GiB\nshards=2")
    assert r.calls == []


def test_update_job_keeps_shell_syntax_as_data() -> None:
    comment = "$(touch /tmp/pwned) 'x' gpuarb/1: vram=4096MiB shards=8"
    expected = update("42_3", f"Comment={comment}")
    with subproc.replay({expected: ""}) as r:
        CliSlurmAdapter().update_job("42_3", Comment=comment)
    assert r.calls == [expected]


# --------------------------------------------------------------------------- submit


def test_submit_passes_the_script_on_stdin_and_returns_the_id() -> None:
    args = ("--job-name", "gpuarb-hold-ollama", "--comment", "gpuarb-holder=ollama gpuarb/1: vram=12288MiB")
    argv = (SBATCH, "--parsable", *args)
    with subproc.replay({argv: "57\n"}) as r:
        assert CliSlurmAdapter().submit(args, "#!/bin/sh\nexec sleep infinity\n") == "57"
    assert r.calls == [argv]
    assert r.inputs == ["#!/bin/sh\nexec sleep infinity\n"]


def test_submit_reads_the_federated_form() -> None:
    with subproc.replay({(SBATCH, "--parsable"): "58;gpuarb\n"}):
        assert CliSlurmAdapter().submit((), "#!/bin/sh\n") == "58"


def test_submit_refusal_carries_slurms_words() -> None:
    said = ("sbatch: error: gpuarb: invalid lease spec in --comment: bad prio\n"
            "sbatch: error: Batch job submission failed: Access/permission denied\n")
    refused = subproc.Reply(returncode=1, stderr=said)
    with subproc.replay({(SBATCH, "--parsable"): refused}), pytest.raises(SlurmError) as e:
        CliSlurmAdapter().submit((), "#!/bin/sh\n")
    assert "Slurm refused the job" in str(e.value) and "invalid lease spec" in str(e.value)


@pytest.mark.parametrize(("reply", "words"), [
    (subproc.Reply(returncode=1, stderr=NO_CTLD), "slurmctld does not answer"),
    (subproc.Reply(raises=FileNotFoundError()), "/usr/bin/sbatch is missing"),
    (subproc.Reply(raises=subprocess.TimeoutExpired([SBATCH], 10)), "no answer within 10s"),
    (subproc.Reply(stdout="Submitted batch job 12\n"), "not a job id"),
])
def test_submit_failures(reply: subproc.Reply, words: str) -> None:
    with subproc.replay({(SBATCH, "--parsable"): reply}), pytest.raises(SlurmError, match=words):
        CliSlurmAdapter().submit((), "#!/bin/sh\n")


# --------------------------------------------------------------------------- cancel


def test_cancel_argv() -> None:
    with subproc.replay({(SCANCEL, "57"): ""}) as r:
        CliSlurmAdapter().cancel("57")
    assert r.calls == [(SCANCEL, "57")]


@pytest.mark.parametrize("stderr", [
    "scancel: error: Kill job error on job id 57: Invalid job id specified\n",
    "scancel: error: Kill job error on job id 57: Job/step already completing or completed\n",
])
def test_cancel_of_a_job_already_gone_is_not_an_error(stderr: str) -> None:
    with subproc.replay({(SCANCEL, "57"): subproc.Reply(returncode=1, stderr=stderr)}):
        CliSlurmAdapter().cancel("57")


def test_cancel_refused() -> None:
    said = "scancel: error: Kill job error on job id 57: Access/permission denied\n"
    denied = subproc.Reply(returncode=1, stderr=said)
    with subproc.replay({(SCANCEL, "57"): denied}), pytest.raises(SlurmError, match="only root or SlurmUser"):
        CliSlurmAdapter().cancel("57")


# --------------------------------------------------------------------------- read-only adapters


def test_an_adapter_that_only_reads_refuses_writes_clearly() -> None:
    class ReadOnly(SlurmAdapter):
        name = "readonly"

        def jobs(self, job_ids: object = None) -> list[object]:  # type: ignore[override]
            return []

        def drain(self, node: str, reason: str) -> None:
            pass

        def resume(self, node: str) -> None:
            pass

        def node_state(self, node: str) -> str:
            return "IDLE"

    slurm = ReadOnly()
    for call in (lambda: slurm.update_job("1", Comment="x"), lambda: slurm.submit((), ""), lambda: slurm.cancel("1")):
        with pytest.raises(SlurmError, match=r"readonly Slurm adapter cannot .* use the cli adapter"):
            call()
