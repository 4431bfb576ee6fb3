"""The Prolog: job_start to the daemon (or the fallback), the grant file, and exit codes that never drain
a node over anything but a node fault."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from typing import Any

import pytest

from slurm_gpuarb import protocol
from slurm_gpuarb.errors import LeaseSpecError, LedgerError, NodeFault
from slurm_gpuarb.hooks import common, grants, prolog

from .conftest import HANG, Cluster, FakeDaemon, Respond, err, grant_answer, ok

Factory = Callable[[Respond], FakeDaemon]


def _grant(cluster: Cluster) -> grants.Grant:
    g = grants.read_grant(str(cluster.state_dir), "n1", "12")
    assert g is not None
    return g


def test_granted_job_gets_its_grant_file(cluster: Cluster, daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: grant_answer())
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert (g.status, g.lease_id, g.vram_mib, g.quantum_mib, g.restart_count) == ("granted", "L1", 6144, 512, 0)
    assert g.exports == {"GPUARB_VRAM_MB": "6144", "GPUARB_LEASE_ID": "L1"}
    st = os.stat(cluster.grant_file())
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
    assert cluster.fallback_calls == []
    assert "prolog: granted 6144MiB job=12 node=n1 restart=0 lease=L1 gpus=0" in cluster.log()
    assert len(d.requests) == 1


def test_job_start_message(cluster: Cluster, daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: grant_answer())
    prolog.main(cluster.env(SLURM_JOB_RESTART_COUNT="3", SLURM_JOB_GPUS="0,2"))
    assert d.requests == [{"v": 1, "op": "job_start", "job_id": "12", "restart_count": 3, "node": "n1",
                           "comment": "gpuarb: vram=6GiB prio=batch", "gres": "0,2", "uid": os.getuid(),
                           "user": "alice", "partition": "batch"}]
    protocol.parse_request(d.requests[0])  # what the daemon will accept


def test_absent_comment_and_odd_user_are_left_out(cluster: Cluster, daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: grant_answer())
    prolog.main(cluster.env(SLURM_JOB_COMMENT="", SLURM_JOB_USER="DOMAIN\\bob smith"))
    assert "comment" not in d.requests[0] and "user" not in d.requests[0]
    protocol.parse_request(d.requests[0])


def test_a_hostile_comment_is_data(cluster: Cluster, daemon_factory: Factory, tmp_path: Any) -> None:
    canary = tmp_path / "pwned"
    comment = f"gpuarb: vram=1GiB $(touch {canary}) `touch {canary}`; touch {canary}\n" + "y" * 20_000
    d = daemon_factory(lambda req: grant_answer())
    assert prolog.main(cluster.env(SLURM_JOB_COMMENT=comment)) == 0
    assert not canary.exists()
    sent = d.requests[0]["comment"]
    assert len(sent) == common.MAX_COMMENT_CHARS and sent == comment[: common.MAX_COMMENT_CHARS]


def test_cpu_job_exits_at_once_without_contacting_anything(cluster: Cluster, daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: grant_answer())
    assert prolog.main(cluster.env(SLURM_JOB_GPUS="")) == 0
    assert d.requests == [] and cluster.fallback_calls == []
    assert not cluster.state_dir.exists() and cluster.log() == ""


def test_refusal_is_written_and_exits_zero(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: grant_answer(lease_id=None, vram=None,
                                            refused="only 2048MiB free on gpu0 of n1 (asked 6144MiB)"))
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert (g.status, g.reason, g.exports) == ("refused", "only 2048MiB free on gpu0 of n1 (asked 6144MiB)", {})
    assert "job refused job=12" in cluster.log()


def test_bad_spec_error_answer_becomes_a_refusal(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: err("LeaseSpecError", "unknown key 'vrm'; did you mean 'vram'?"))
    assert prolog.main(cluster.env(SLURM_JOB_COMMENT="gpuarb: vrm=6GiB")) == 0
    g = _grant(cluster)
    assert g.status == "refused" and "did you mean 'vram'" in (g.reason or "")


def test_a_multi_line_error_is_still_a_refusal_not_a_node_fault(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: err("LeaseSpecError", "bad spec\n  vram=lots\n       ^ expected a size"))
    assert prolog.main(cluster.env()) == 0
    assert _grant(cluster).reason == "bad spec vram=lots ^ expected a size"


def test_unleased_answer(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: grant_answer(lease_id=None, vram=None, reason="no GPU in SLURM_JOB_GPUS"))
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert (g.status, g.reason) == ("unleased", "no GPU in SLURM_JOB_GPUS")


def test_exports_that_could_inject_lines_are_dropped(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: grant_answer(exports={"GOOD": "1", "BAD": "x\nexport LD_PRELOAD=/x.so",
                                                     "1NAME": "y", "N": 5}))  # type: ignore[dict-item]
    assert prolog.main(cluster.env()) == 0
    assert _grant(cluster).exports == {"GOOD": "1", "N": "5"}
    assert "dropped an export" in cluster.log()


def test_daemon_down_falls_back_in_process(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fallback(msg: dict[str, Any], env: Any) -> dict[str, Any]:
        calls.append(msg)
        return grant_answer(lease_id="L9")

    monkeypatch.setattr(common, "in_process", fallback)
    assert prolog.main(cluster.env()) == 0
    assert calls[0]["op"] == "job_start"
    assert _grant(cluster).lease_id == "L9"
    assert "gpuarbd unavailable; deciding in-process" in cluster.log()


def test_daemon_hung_times_out_then_falls_back(cluster: Cluster, daemon_factory: Factory,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.fast_deadline(monkeypatch, 0.5)  # the daemon gets 40 %: 0.2 s
    daemon_factory(lambda req: HANG)
    monkeypatch.setattr(common, "in_process", lambda msg, env: grant_answer(lease_id="L9"))
    assert prolog.main(cluster.env()) == 0
    assert _grant(cluster).lease_id == "L9"
    assert "did not answer within 0.2s" in cluster.log()


def test_daemon_hung_and_fallback_hung_ends_at_the_deadline(cluster: Cluster, daemon_factory: Factory,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.fast_deadline(monkeypatch, 0.4)
    daemon_factory(lambda req: HANG)

    def stuck(msg: dict[str, Any], env: Any) -> dict[str, Any]:
        while True:
            time.sleep(0.05)

    monkeypatch.setattr(common, "in_process", stuck)
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert g.status == "unleased" and "deadline" in (g.reason or "")


def test_outage_fail_open_runs_unleased(cluster: Cluster) -> None:
    assert prolog.main(cluster.env()) == 0  # no daemon, the fallback fails
    g = _grant(cluster)
    assert g.status == "unleased" and (g.reason or "").startswith("unleased: ledger unavailable")
    assert len(cluster.fallback_calls) == 1
    assert "job runs unleased" in cluster.log()


def test_outage_fail_closed_refuses_but_exits_zero(cluster: Cluster) -> None:
    cluster.write_config(fail_mode="closed")
    assert prolog.main(cluster.env()) == 0
    g = _grant(cluster)
    assert g.status == "refused" and "fail_mode is closed" in (g.reason or "")


@pytest.mark.parametrize("answer", [err("LedgerError", "database is locked"), err("InternalError", "boom"),
                                    ok("job_start", lease=None), ok("job_start", grant={"exports": []})])
def test_ledger_errors_and_malformed_answers_are_outages(cluster: Cluster, daemon_factory: Factory,
                                                         answer: dict[str, Any]) -> None:
    daemon_factory(lambda req: answer)
    assert prolog.main(cluster.env()) == 0
    assert _grant(cluster).status == "unleased"


def test_node_fault_exits_non_zero(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: err("NodeFault", "Slurm gave gpu 7, telemetry of n1 has gpus 0-3"))
    assert prolog.main(cluster.env()) == 1
    assert _grant(cluster).status == "refused"
    assert "node fault" in cluster.log()


def test_fallback_node_fault_exits_non_zero(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "in_process", lambda msg, env: protocol.error(NodeFault("gpu 7 missing")))
    assert prolog.main(cluster.env()) == 1


def test_unwritable_state_dir_is_a_node_fault(cluster: Cluster, daemon_factory: Factory) -> None:
    cluster.state_dir.write_text("not a directory")
    daemon_factory(lambda req: grant_answer())
    assert prolog.main(cluster.env()) == 1
    assert "cannot write the grant file" in cluster.log()


def test_a_bug_does_not_drain(cluster: Cluster, daemon_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_factory(lambda req: grant_answer())

    def broken(*a: Any) -> Any:
        raise KeyError("oops")

    monkeypatch.setattr(prolog, "grant_from_answer", broken)
    assert prolog.main(cluster.env()) == 0
    assert _grant(cluster).status == "unleased"
    assert "internal error" in cluster.log() and "KeyError" in cluster.log()


def test_missing_job_id_logs_and_exits_zero(cluster: Cluster) -> None:
    assert prolog.main(cluster.env(SLURM_JOB_ID="")) == 0
    assert "cannot identify the job" in cluster.log()


def test_broken_config_still_exits_zero(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster.config.write_text("version = 1\n[hooks]\nfail_mode = 'maybe'\n")
    monkeypatch.setattr(common, "in_process", lambda msg, env: (_ for _ in ()).throw(LedgerError("no config")))
    written: list[grants.Grant] = []

    def write(state: str, grant: grants.Grant, gid: int | None) -> str:
        written.append(grant)
        return "x"

    monkeypatch.setattr(grants, "write_grant", write)
    assert prolog.main(cluster.env()) == 0  # defaults: fail open
    assert written[0].status == "unleased"
    assert "config unreadable; using defaults" in (cluster.root / "default.log").read_text()


def test_requeued_run_writes_its_own_restart_count(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: grant_answer(restart=req["restart_count"], lease_id=f"L{req['restart_count']}"))
    prolog.main(cluster.env())
    prolog.main(cluster.env(SLURM_JOB_RESTART_COUNT="1"))
    g = _grant(cluster)
    assert (g.restart_count, g.lease_id) == (1, "L1")


def test_exit_code_table_matches() -> None:
    # A lease-spec error, like every non-node-fault, maps to 0 for the Prolog.
    assert isinstance(LeaseSpecError("x"), Exception)
    from slurm_gpuarb.hooks import exitcodes

    assert [o for o in exitcodes.OUTCOMES if exitcodes.exit_code("prolog", o)] == [exitcodes.NODE_FAULT]
