"""squeue --json parsed by version, node lists, shard counts and scontrol's node line (pure functions)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from slurm_gpuarb.slurm.base import JobInfo, SlurmError
from slurm_gpuarb.slurm.cli import (
    expand_nodelist,
    parse_node_state,
    parse_squeue_json,
    shard_count,
    squeue_format,
)

from .conftest import DATA, SAME_JOBS, SQUEUE_FIXTURES


def jobs_of(name: str) -> dict[str, JobInfo]:
    return {j.job_id: j for j in parse_squeue_json((DATA / name).read_text(encoding="utf-8"))}


def doc(jobs: list[dict[str, Any]], *, fmt: str = "data_parser/v0.0.42") -> str:
    """A minimal squeue --json document of the given format around ``jobs``."""
    return json.dumps({"meta": {"plugin": {"type": "", "data_parser": fmt},
                                "slurm": {"release": "24.11.5"}}, "errors": [], "jobs": jobs})


# --------------------------------------------------------------------------- 22.05 (recorded)


def test_2205_running_shard_job() -> None:
    job = jobs_of("squeue-22.05-mixed.json")["5"]
    assert job == JobInfo(job_id="5", state="RUNNING", restart_count=0, nodes=("n2",), comment="gpuarb: vram=2GiB",
                          partition="shard", qos="", user="root", uid=0, tres_per_node="gres:shard:4", gres_shards=4,
                          submit_time=1795446986.0, start_time=1795446986.0, state_reason="", name="wrap")
    assert job.holds_allocation


def test_2205_every_recorded_job_is_read() -> None:
    jobs = jobs_of("squeue-22.05-mixed.json")
    assert list(jobs) == [str(i) for i in range(1, 13)]
    assert {j.state for j in jobs.values()} == {"COMPLETED", "RUNNING", "PENDING"}


def test_2205_requeued_pending_job_has_restart_count_and_no_nodes() -> None:
    job = jobs_of("squeue-22.05-mixed.json")["6"]
    assert (job.state, job.restart_count, job.nodes) == ("PENDING", 1, ())
    assert not job.holds_allocation


def test_2205_requeued_job_running_again() -> None:
    job = jobs_of("squeue-22.05-requeued.json")["6"]
    assert (job.state, job.restart_count, job.nodes) == ("RUNNING", 1, ("n1",))


def test_2205_multi_word_comment_is_kept_verbatim() -> None:
    job = jobs_of("squeue-22.05-mixed.json")["7"]
    assert job.comment == 'gpuarb: vram=40GiB prio=llm engine=vllm note="two words" $(rm -rf /)'
    assert (job.tres_per_node, job.gres_shards) == ("gres:gpu:h100:8", None)


def test_2205_gpus_per_job_is_not_shards() -> None:
    job = jobs_of("squeue-22.05-mixed.json")["9"]
    assert (job.tres_per_node, job.gres_shards, job.nodes) == ("", None, ())


def test_2205_multi_node_job_and_other_user() -> None:
    jobs = jobs_of("squeue-22.05-mixed.json")
    assert jobs["11"].nodes == ("n1", "n2")
    assert (jobs["12"].user, jobs["12"].uid) == ("nobody", 65534)


def test_2205_completing_job_still_holds_its_node() -> None:
    jobs = jobs_of("squeue-22.05-completing.json")
    assert (jobs["6"].state, jobs["6"].holds_allocation) == ("COMPLETING", True)
    assert (jobs["9"].state, jobs["9"].holds_allocation) == ("CANCELLED", False)
    assert (jobs["7"].state, jobs["7"].holds_allocation) == ("COMPLETED", False)


def test_2205_controller_down_is_an_error_not_an_empty_queue() -> None:
    # recorded: squeue exits 0 with "jobs": [] and an errors entry when slurmctld is down
    with pytest.raises(SlurmError, match="Failed while looking for jobs"):
        parse_squeue_json((DATA / "squeue-22.05-ctld-down.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- every version


@pytest.mark.parametrize("name", sorted(SQUEUE_FIXTURES))
def test_format_and_release_are_detected(name: str) -> None:
    assert squeue_format(json.loads((DATA / name).read_text(encoding="utf-8"))) == SQUEUE_FIXTURES[name]


@pytest.mark.parametrize("name", SAME_JOBS[1:])
def test_newer_shapes_read_like_2205(name: str) -> None:
    """The same six jobs read the same whatever the JSON shape (qos aside: 22.05 ran without slurmdbd)."""

    def key(j: JobInfo) -> tuple[object, ...]:
        return (j.job_id, j.restart_count, j.nodes, j.comment, j.partition, j.user, j.uid, j.gres_shards)

    old = jobs_of(SAME_JOBS[0])
    new = jobs_of(name)
    assert set(new) == {"5", "6", "7", "9", "11", "12"}
    assert [key(j) for j in new.values()] == [key(old[i]) for i in new]
    assert {j.qos for j in new.values()} == {"normal"}


def test_2302_wrapped_job_id_and_string_state() -> None:
    job = jobs_of("squeue-23.02-v0.0.39.json")["5"]
    assert (job.job_id, job.state, job.tres_per_node, job.gres_shards) == ("5", "RUNNING", "gres:shard:4", 4)


def test_2311_state_list_folds_to_the_flag_during_the_prolog() -> None:
    jobs = jobs_of("squeue-23.11-v0.0.40.json")
    assert (jobs["5"].state, jobs["5"].holds_allocation) == ("CONFIGURING", True)
    assert (jobs["5"].tres_per_node, jobs["5"].gres_shards) == ("gres/shard:4", 4)
    assert jobs["6"].state == "PENDING"


def test_2411_state_list_folds_to_completing_during_the_epilog() -> None:
    jobs = jobs_of("squeue-24.11-v0.0.42.json")
    assert (jobs["7"].state, jobs["7"].holds_allocation) == ("COMPLETING", True)
    assert jobs["11"].state == "RUNNING"


@pytest.mark.parametrize(("state", "expected"), [
    (["RUNNING"], "RUNNING"),
    (["RUNNING", "CONFIGURING"], "CONFIGURING"),
    (["COMPLETED", "COMPLETING"], "COMPLETING"),
    (["PENDING", "REQUEUED"], "REQUEUED"),
    (["CANCELLED", "LAUNCH_FAILED"], "CANCELLED"),
    (["NEW_STATE_OF_2030"], "NEW_STATE_OF_2030"),
    ("RUNNING", "RUNNING"),
])
def test_state_is_named_like_job_state_string(state: object, expected: str) -> None:
    [job] = parse_squeue_json(doc([{"job_id": 1, "job_state": state}]))
    assert job.state == expected


def test_unset_and_infinite_numbers() -> None:
    [a, b] = parse_squeue_json(doc([
        {"job_id": 1, "job_state": ["PENDING"], "user_id": {"set": False, "infinite": False, "number": 0}},
        {"job_id": {"set": True, "infinite": False, "number": 2}, "job_state": ["PENDING"],
         "restart_cnt": {"set": False, "infinite": True, "number": 0}},
    ]))
    assert (a.uid, b.job_id, b.restart_count) == (None, "2", 0)


# --------------------------------------------------------------------------- bad documents


def test_unknown_format_names_it_and_what_is_supported() -> None:
    text = json.dumps({"meta": {"plugin": {"data_parser": "data_parser/v0.0.45"}, "slurm": {"release": "26.05.1"}},
                       "errors": [], "jobs": []})
    with pytest.raises(SlurmError) as e:
        parse_squeue_json(text)
    msg = str(e.value)
    assert "v0.0.45" in msg and "26.05.1" in msg and "v0.0.38 (Slurm 22.05)" in msg and "v0.0.42 (Slurm 24.11)" in msg


def test_document_without_meta_is_an_unknown_format() -> None:
    with pytest.raises(SlurmError, match=r"\(none declared\)"):
        parse_squeue_json('{"jobs": []}')


@pytest.mark.parametrize("text", ["", "<html>502 Bad Gateway</html>", '{"meta": ', "squeue: error: x"])
def test_garbage_is_not_json(text: str) -> None:
    with pytest.raises(SlurmError, match="not JSON"):
        parse_squeue_json(text)


def test_json_that_is_not_an_object() -> None:
    with pytest.raises(SlurmError, match="list, not a JSON object"):
        parse_squeue_json("[1, 2]")


def test_missing_jobs_list() -> None:
    with pytest.raises(SlurmError, match="no 'jobs' list"):
        parse_squeue_json(json.dumps({"meta": {"plugin": {"data_parser": "v0.0.39"}}, "errors": []}))


@pytest.mark.parametrize(("job", "words"), [
    ({"job_state": ["RUNNING"]}, "has no job_id"),
    ({"job_id": 7, "job_state": 3}, "job 7 (format v0.0.42): job_state is 3"),
    ({"job_id": 7, "job_state": []}, "job_state is []"),
    ({"job_id": 7, "job_state": "RUNNING", "user_id": "root"}, "user_id is 'root', expected an integer"),
    ({"job_id": 7, "job_state": "RUNNING", "restart_cnt": True}, "restart_cnt is True"),
    ({"job_id": 7, "job_state": "RUNNING", "comment": ["a"]}, "comment is ['a'], expected text"),
    ({"job_id": 7, "job_state": "RUNNING", "nodes": "n[1-"}, "job 7: cannot read its node list 'n[1-'"),
    ("not a job", "a job entry is str"),
])
def test_malformed_job_names_job_and_field(job: object, words: str) -> None:
    with pytest.raises(SlurmError) as e:
        parse_squeue_json(doc([job]))  # type: ignore[list-item]
    assert words in str(e.value)


# --------------------------------------------------------------------------- node lists, shards


@pytest.mark.parametrize(("text", "names"), [
    ("", ()),
    ("n2", ("n2",)),
    ("n[1-2]", ("n1", "n2")),
    ("n[1-3,5]", ("n1", "n2", "n3", "n5")),
    ("gpu-a[01-04]", ("gpu-a01", "gpu-a02", "gpu-a03", "gpu-a04")),
    ("n[1-2],gpu-a[08-10],n4", ("n1", "n2", "gpu-a08", "gpu-a09", "gpu-a10", "n4")),
    ("dgx[1-2]-ib[0-1]", ("dgx1-ib0", "dgx1-ib1", "dgx2-ib0", "dgx2-ib1")),
])
def test_expand_nodelist(text: str, names: tuple[str, ...]) -> None:
    assert expand_nodelist(text) == names


@pytest.mark.parametrize("text", ["n[1-", "n1]", "n[3-1]", "n[a-b]"])
def test_expand_nodelist_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        expand_nodelist(text)


@pytest.mark.parametrize(("tres", "count"), [
    ("gres:shard:12", 12),
    ("gres/shard:12", 12),
    ("gres:shard:a100:12", 12),
    ("gres/shard:rtx3090ti:4", 4),
    ("gres:shard", 1),
    ("gres:shard:a100", 1),
    ("gres:gpu:1,gres:shard:4", 4),
    ("gres:shard:a100:2,gres:shard:v100:3", 5),
    ("gres:gpu:h100:8", None),
    ("gres/gpu:2", None),
    ("gres:shardx:4", None),
    ("", None),
])
def test_shard_count(tres: str, count: int | None) -> None:
    assert shard_count(tres) == count


def test_shards_from_tres_per_job_when_not_per_node() -> None:
    [job] = parse_squeue_json(doc([{"job_id": 3, "job_state": ["PENDING"], "tres_per_node": "",
                                    "tres_per_job": "gres/shard:6"}]))
    assert (job.tres_per_node, job.gres_shards) == ("", 6)


# --------------------------------------------------------------------------- scontrol show node -o


def test_node_state_recorded() -> None:
    assert parse_node_state((DATA / "scontrol-node-n2.txt").read_text(encoding="utf-8"), "n2") == "MIXED"


def test_node_state_drained_with_a_reason_full_of_syntax() -> None:
    text = (DATA / "scontrol-node-n4-drain.txt").read_text(encoding="utf-8")
    assert parse_node_state(text, "n4") == "MIXED+DRAIN"


def test_node_state_ignores_state_words_inside_the_reason() -> None:
    line = "NodeName=n9 Arch=x86_64 OS=Linux 6.1 #1 SMP State=IDLE+DRAIN Weight=1 Reason=was State=IDLE once [root@x]"
    assert parse_node_state(line, "n9") == "IDLE+DRAIN"


@pytest.mark.parametrize("text", ["", "NodeName=n22 State=IDLE", "Node n2 not found"])
def test_node_state_of_another_or_no_node(text: str) -> None:
    with pytest.raises(SlurmError, match="printed no line for node n2"):
        parse_node_state(text, "n2")


# --------------------------------------------------------------------------- times, reason and name


def test_2205_pending_job_times_reason_and_name() -> None:
    jobs = jobs_of("squeue-22.05-mixed.json")
    pending = jobs["9"]
    assert (pending.state, pending.state_reason, pending.name) == ("PENDING", "Resources", "wrap")
    assert pending.submit_time == 1795446986.0
    assert pending.start_time == 1826982995.0  # Slurm's expected start, a year ahead: not a fact
    assert jobs["6"].state_reason == "BeginTime"  # requeued: held for cred_expire first
    running = jobs["7"]
    assert (running.submit_time, running.start_time, running.state_reason) == (1795446986.0, 1795446994.0, "")


@pytest.mark.parametrize("name", SAME_JOBS[1:])
def test_newer_shapes_read_times_and_reasons_like_2205(name: str) -> None:
    old, new = jobs_of(SAME_JOBS[0]), jobs_of(name)
    for jid, job in new.items():
        assert (job.submit_time, job.start_time, job.state_reason, job.name) == \
            (old[jid].submit_time, old[jid].start_time, old[jid].state_reason, old[jid].name), jid


def test_unset_zero_and_infinite_times_are_none() -> None:
    [a, b, c] = parse_squeue_json(doc([
        {"job_id": 1, "job_state": ["PENDING"], "start_time": {"set": False, "infinite": False, "number": 0}},
        {"job_id": 2, "job_state": ["PENDING"], "start_time": {"set": True, "infinite": True, "number": 0},
         "submit_time": {"set": True, "infinite": False, "number": 0}},
        {"job_id": 3, "job_state": "PENDING", "submit_time": 1795446986, "state_reason": "Priority"},
    ]))
    assert (a.start_time, a.submit_time, a.state_reason, a.name) == (None, None, "", "")
    assert (b.start_time, b.submit_time) == (None, None)
    assert (c.submit_time, c.state_reason) == (1795446986.0, "Priority")


def test_a_time_that_is_not_a_number_names_job_and_field() -> None:
    with pytest.raises(SlurmError, match=r"job 4 .*submit_time"):
        parse_squeue_json(doc([{"job_id": 4, "job_state": "PENDING", "submit_time": "yesterday"}]))
