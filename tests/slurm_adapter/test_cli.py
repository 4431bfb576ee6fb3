"""The cli adapter end to end through subproc.replay: the exact argv it runs, and every failure it maps."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from slurm_gpuarb import subproc
from slurm_gpuarb.slurm.base import SlurmError
from slurm_gpuarb.slurm.cli import CliSlurmAdapter

from .conftest import DATA, SCONTROL, SQUEUE

MIXED = DATA / "squeue-22.05-mixed.json"
NODE_N2 = DATA / "scontrol-node-n2.txt"
NODE_N4_DRAIN = DATA / "scontrol-node-n4-drain.txt"
# recorded on 22.05.8 (tests/data/slurm/README.md)
NO_CTLD_UPDATE = "slurm_update error: Unable to contact slurm controller (connect failure)\n"
NO_CTLD_NODE = "slurm_load_node error: Unable to contact slurm controller (connect failure)\n"
BAD_STATE = "slurm_update error: Invalid node state specified\n"
BAD_NODE = "slurm_update error: Invalid node name specified\n"


def update(node: str, *settings: str) -> tuple[str, ...]:
    return (SCONTROL, "update", f"NodeName={node}", *settings)


def show(node: str) -> tuple[str, ...]:
    return (SCONTROL, "show", "node", "-o", node)


# --------------------------------------------------------------------------- jobs


def test_jobs_runs_one_squeue_with_absolute_path() -> None:
    with subproc.replay({SQUEUE: MIXED}) as r:
        jobs = CliSlurmAdapter().jobs()
    assert r.calls == [SQUEUE]
    assert len(jobs) == 12


def test_jobs_filters_by_id_here_because_2205_ignores_squeue_filters() -> None:
    with subproc.replay({SQUEUE: MIXED}) as r:
        jobs = CliSlurmAdapter().jobs(["5", 7, "99999"])
    assert [j.job_id for j in jobs] == ["5", "7"]
    assert r.calls == [SQUEUE]  # no --jobs=: unknown ids would make newer squeue fail


def test_jobs_with_no_ids_wanted() -> None:
    with subproc.replay({SQUEUE: MIXED}):
        assert CliSlurmAdapter().jobs([]) == []


def test_running_on_counts_only_jobs_holding_the_node() -> None:
    with subproc.replay({SQUEUE: MIXED}):
        slurm = CliSlurmAdapter()
        assert [j.job_id for j in slurm.running_on("n1")] == ["7", "11"]  # 6 is pending again, 1-4 finished
        assert [j.job_id for j in slurm.running_on("n2")] == ["5", "11"]
        assert slurm.running_on("n9") == []


def test_running_on_includes_a_job_in_its_epilog() -> None:
    with subproc.replay({SQUEUE: DATA / "squeue-22.05-completing.json"}):
        assert [j.job_id for j in CliSlurmAdapter().running_on("n1")] == ["6"]


def test_bin_dir_and_timeout_are_used(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[tuple[str, ...], float]] = []

    def fake_run(argv: Sequence[str], *, timeout: float = 10.0, **_: object) -> subproc.Completed:
        seen.append((tuple(argv), timeout))
        return subproc.Completed(tuple(argv), 0, MIXED.read_text(encoding="utf-8"), "")

    monkeypatch.setattr(subproc, "run", fake_run)
    CliSlurmAdapter(bin_dir="/opt/slurm/bin/", timeout=3.5).jobs()
    assert seen == [(("/opt/slurm/bin/squeue", "--all", "--states=all", "--json"), 3.5)]


@pytest.mark.parametrize(("reply", "words"), [
    (subproc.Reply(raises=FileNotFoundError()), ["/usr/bin/squeue is missing", "slurm-client", "bin_dir"]),
    (subproc.Reply(raises=subprocess.TimeoutExpired(list(SQUEUE), 10)), ["no answer within 10s", "scontrol ping"]),
    (subproc.Reply(returncode=1, stderr="slurm_load_jobs error: Unable to contact slurm controller (connect failure)"),
     ["slurmctld does not answer", "connect failure"]),
    (subproc.Reply(returncode=1, stderr="squeue: fatal: Could not establish a configuration source"),
     ["could not list Slurm's jobs", "Could not establish a configuration source"]),
    (subproc.Reply(stdout="<html>502</html>"), ["not JSON", "<html>502</html>"]),
    (subproc.Reply(stdout=DATA / "squeue-22.05-ctld-down.json"), ["reported errors", "Failed while looking for jobs"]),
    (subproc.Reply(stdout='{"meta": {"plugin": {"data_parser": "data_parser/v0.0.45"}}, "jobs": []}'),
     ["format v0.0.45", "cannot read"]),
])
def test_jobs_failures_are_slurm_errors_that_say_what_to_do(reply: subproc.Reply, words: list[str]) -> None:
    with subproc.replay({SQUEUE: reply}), pytest.raises(SlurmError) as e:
        CliSlurmAdapter().jobs()
    for word in words:
        assert word in str(e.value)


def test_subprocess_error_is_chained() -> None:
    with subproc.replay({SQUEUE: subproc.Reply(raises=FileNotFoundError())}), pytest.raises(SlurmError) as e:
        CliSlurmAdapter().jobs()
    assert isinstance(e.value.__cause__, subproc.CommandNotFound)


# --------------------------------------------------------------------------- drain / resume


def test_drain_argv_is_exact() -> None:
    reason = "gpuarb: foreign pid 4242 holds 10800MiB on gpu0"
    with subproc.replay({update("n2", "State=DRAIN", f"Reason={reason}"): ""}) as r:
        CliSlurmAdapter().drain("n2", reason)
    assert r.calls == [(SCONTROL, "update", "NodeName=n2", "State=DRAIN",
                        "Reason=gpuarb: foreign pid 4242 holds 10800MiB on gpu0")]


@pytest.mark.parametrize("reason", [
    'it\'s "quoted" and \'single\'',
    "$(touch /tmp/pwned) `id` ${HOME}",
    "a; rm -rf / && echo | cat > /etc/passwd",
    "State=RESUME NodeName=n1",
    "--help",
])
def test_drain_reason_stays_one_argument(reason: str) -> None:
    expected = update("n2", "State=DRAIN", f"Reason={reason}")
    with subproc.replay({expected: ""}) as r:
        CliSlurmAdapter().drain("n2", reason)
    assert r.calls == [expected]
    assert len(r.calls[0]) == 5 and r.calls[0][-1] == f"Reason={reason}"


def test_drain_reason_control_characters_become_spaces() -> None:
    expected = update("n2", "State=DRAIN", "Reason=gpuarb: line one line two")
    with subproc.replay({expected: ""}) as r:
        CliSlurmAdapter().drain("n2", "gpuarb: line one\nline two\t\x00")
    assert r.calls == [expected]


@pytest.mark.parametrize("reason", ["", "   ", "\n\t"])
def test_drain_needs_a_reason(reason: str) -> None:
    with subproc.replay({}) as r, pytest.raises(SlurmError, match="needs a reason"):
        CliSlurmAdapter().drain("n2", reason)
    assert r.calls == []


@pytest.mark.parametrize("node", ["-d", "n2 State=DOWN", "n2;reboot", "", "../n2", "n2\n"])
def test_node_names_are_checked_before_anything_runs(node: str) -> None:
    slurm = CliSlurmAdapter()
    with subproc.replay({}) as r:
        for call in (lambda: slurm.drain(node, "x"), lambda: slurm.resume(node), lambda: slurm.node_state(node)):
            with pytest.raises(SlurmError, match="is not a Slurm node name"):
                call()
    assert r.calls == []


def test_drain_unknown_node() -> None:
    with subproc.replay({update("nosuch", "State=DRAIN", "Reason=x"): subproc.Reply(returncode=1, stderr=BAD_NODE)}), \
            pytest.raises(SlurmError, match="Slurm does not know that node"):
        CliSlurmAdapter().drain("nosuch", "x")


def test_drain_refused_for_a_normal_user() -> None:
    # Slurm's ESLURM_ACCESS_DENIED text (not recorded here: the recordings ran as root)
    denied = subproc.Reply(returncode=1, stderr="slurm_update error: Access/permission denied\n")
    with subproc.replay({update("n2", "State=DRAIN", "Reason=x"): denied}), \
            pytest.raises(SlurmError, match="only root or SlurmUser"):
        CliSlurmAdapter().drain("n2", "x")


def test_resume_argv_is_exact() -> None:
    with subproc.replay({update("n4", "State=RESUME"): ""}) as r:
        CliSlurmAdapter().resume("n4")
    assert r.calls == [(SCONTROL, "update", "NodeName=n4", "State=RESUME")]


def test_resume_of_a_node_that_is_not_drained_does_nothing() -> None:
    mapping: dict[tuple[str, ...], subproc.ReplyLike] = {
        update("n2", "State=RESUME"): subproc.Reply(returncode=1, stderr=BAD_STATE), show("n2"): NODE_N2}
    with subproc.replay(mapping) as r:
        CliSlurmAdapter().resume("n2")
    assert r.calls == [update("n2", "State=RESUME"), show("n2")]


def test_resume_refused_while_still_drained_is_an_error() -> None:
    mapping: dict[tuple[str, ...], subproc.ReplyLike] = {
        update("n4", "State=RESUME"): subproc.Reply(returncode=1, stderr=BAD_STATE), show("n4"): NODE_N4_DRAIN}
    with subproc.replay(mapping), pytest.raises(SlurmError, match="could not resume node n4"):
        CliSlurmAdapter().resume("n4")


def test_resume_with_controller_down() -> None:
    with subproc.replay({update("n2", "State=RESUME"): subproc.Reply(returncode=1, stderr=NO_CTLD_UPDATE)}), \
            pytest.raises(SlurmError, match="slurmctld does not answer"):
        CliSlurmAdapter().resume("n2")


def test_resume_timeout() -> None:
    hung = subproc.Reply(raises=subprocess.TimeoutExpired(list(update("n2", "State=RESUME")), 2))
    with subproc.replay({update("n2", "State=RESUME"): hung}), pytest.raises(SlurmError, match="no answer within 2s"):
        CliSlurmAdapter(timeout=2).resume("n2")


# --------------------------------------------------------------------------- node_state


def test_node_state() -> None:
    with subproc.replay({show("n2"): NODE_N2, show("n4"): NODE_N4_DRAIN}) as r:
        slurm = CliSlurmAdapter()
        assert (slurm.node_state("n2"), slurm.node_state("n4")) == ("MIXED", "MIXED+DRAIN")
    assert r.calls == [show("n2"), show("n4")]


def test_node_state_of_unknown_node() -> None:
    # recorded: the "not found" goes to stdout, exit status 1
    with subproc.replay({show("nosuch"): subproc.Reply(returncode=1, stdout="Node nosuch not found\n")}), \
            pytest.raises(SlurmError) as e:
        CliSlurmAdapter().node_state("nosuch")
    assert "Slurm does not know that node" in str(e.value) and "Node nosuch not found" in str(e.value)


def test_node_state_with_controller_down() -> None:
    with subproc.replay({show("n2"): subproc.Reply(returncode=1, stderr=NO_CTLD_NODE)}), \
            pytest.raises(SlurmError, match="slurmctld does not answer"):
        CliSlurmAdapter().node_state("n2")


def test_node_state_missing_scontrol() -> None:
    with subproc.replay({show("n2"): subproc.Reply(raises=FileNotFoundError())}), \
            pytest.raises(SlurmError, match="/usr/bin/scontrol is missing"):
        CliSlurmAdapter().node_state("n2")
