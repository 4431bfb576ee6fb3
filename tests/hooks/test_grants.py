"""The grant file: format, atomic root-owned writes, restart-count-aware removal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from slurm_gpuarb.hooks import grants
from slurm_gpuarb.hooks.common import SlurmEnvError


def _granted(**kw: object) -> grants.Grant:
    args: dict[str, object] = {"lease_id": "L1", "vram_mib": 6144, "quantum_mib": 512,
                               "exports": {"GPUARB_VRAM_MB": "6144", "CUDA_VISIBLE_DEVICES": "MIG-abc"}}
    args.update(kw)
    return grants.Grant(grants.GRANTED, "12", "n1", 0, **args)  # type: ignore[arg-type]


def test_round_trip() -> None:
    g = _granted(reason="granted 6144MiB on gpu0")
    back = grants.Grant.from_text(g.to_text())
    assert (back.status, back.job_id, back.node, back.restart_count, back.lease_id, back.vram_mib,
            back.quantum_mib, back.reason, back.exports) == (
        "granted", "12", "n1", 0, "L1", 6144, 512, "granted 6144MiB on gpu0",
        {"GPUARB_VRAM_MB": "6144", "CUDA_VISIBLE_DEVICES": "MIG-abc"})


def test_text_is_key_value_lines() -> None:
    text = grants.Grant(grants.REFUSED, "7", "n2", 1, reason="only 2048MiB free on gpu0").to_text()
    assert text.splitlines()[1:] == ["version=1", "status=refused", "job_id=7", "node=n2", "restart_count=1",
                                     "reason=only 2048MiB free on gpu0"]


@pytest.mark.parametrize("bad", ["a\nexport.LD_PRELOAD=/tmp/x.so", "a\rb", "a\x00b"])
def test_refuses_to_write_a_value_that_breaks_lines(bad: str) -> None:
    with pytest.raises(grants.GrantError, match="newline"):
        _granted(exports={"X": bad}).to_text()

def test_a_reason_is_kept_on_one_line() -> None:
    g = grants.Grant(grants.REFUSED, "7", "n2", reason="bad spec:\n  unknown key 'vrm'\r\x00" + "x" * 5000)
    assert g.reason is not None and g.reason.startswith("bad spec: unknown key 'vrm' x")
    assert len(g.reason) == grants.MAX_REASON_CHARS
    assert grants.Grant.from_text(g.to_text()).reason == g.reason


@pytest.mark.parametrize("text", [
    "status=granted\njob_id=1\nnode=n1\n",  # no version
    "version=2\nstatus=granted\njob_id=1\nnode=n1\n",
    "version=1\nstatus=maybe\njob_id=1\nnode=n1\n",
    "version=1\nstatus=granted\nnode=n1\n",
    "version=1\nstatus=granted\njob_id=1\nnode=n1\nexport.1BAD=x\n",
    "version=1\nstatus=granted\njob_id=1\nnode=n1\nno equals sign\n",
    "version=1\nstatus=granted\njob_id=1\nnode=n1\nvram_mib=lots\n",
])
def test_malformed_files_are_errors(text: str) -> None:
    with pytest.raises(grants.GrantError):
        grants.Grant.from_text(text)


def test_unknown_keys_are_ignored() -> None:
    g = grants.Grant.from_text("version=1\nstatus=unleased\njob_id=1\nnode=n1\nfuture=thing\n")
    assert g.status == grants.UNLEASED


def test_write_is_atomic_root_owned_and_group_readable(tmp_path: Path) -> None:
    path = grants.write_grant(str(tmp_path), _granted(), gid=os.getgid())
    assert path == f"{tmp_path}/jobs/n1/12.grant"
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == os.getgid()
    if os.geteuid() == 0:
        assert st.st_uid == 0
    assert os.listdir(tmp_path / "jobs" / "n1") == ["12.grant"]  # no temp file left
    assert stat.S_IMODE(os.stat(tmp_path / "jobs" / "n1").st_mode) == 0o755


def test_without_a_group_the_file_is_world_readable(tmp_path: Path) -> None:
    path = grants.write_grant(str(tmp_path), _granted(), gid=None)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_rewrite_replaces_the_file(tmp_path: Path) -> None:
    grants.write_grant(str(tmp_path), _granted(), gid=None)
    grants.write_grant(str(tmp_path), grants.Grant(grants.REFUSED, "12", "n1", 1, reason="no"), gid=None)
    g = grants.read_grant(str(tmp_path), "n1", "12")
    assert g is not None and (g.status, g.restart_count) == ("refused", 1)


def test_write_failure_is_a_grant_error(tmp_path: Path) -> None:
    (tmp_path / "jobs").write_text("a file where a directory should be")
    with pytest.raises(grants.GrantError, match="state_dir"):
        grants.write_grant(str(tmp_path), _granted(), gid=None)


def test_write_does_not_follow_a_planted_temp_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    folder = tmp_path / "jobs" / "n1"
    folder.mkdir(parents=True)
    (folder / f".12.grant.{os.getpid()}").symlink_to(target)
    grants.write_grant(str(tmp_path), _granted(), gid=None)
    assert target.read_text() == "keep"


def test_read_missing_is_none(tmp_path: Path) -> None:
    assert grants.read_grant(str(tmp_path), "n1", "12") is None


def test_read_checks_the_file_is_this_jobs(tmp_path: Path) -> None:
    folder = tmp_path / "jobs" / "n1"
    folder.mkdir(parents=True)
    (folder / "12.grant").write_text(_granted().to_text().replace("job_id=12", "job_id=13"))
    with pytest.raises(grants.GrantError, match="names job 13"):
        grants.read_grant(str(tmp_path), "n1", "12")


@pytest.mark.parametrize(("node", "job"), [("../etc", "12"), ("n1", "../../x"), ("n1", "12/../13"), ("", "1"),
                                           (".hidden", "1"), ("n1", "1e3")])
def test_paths_cannot_leave_the_state_dir(node: str, job: str) -> None:
    with pytest.raises(SlurmEnvError):
        grants.grant_path("/run/gpuarb", node, job)


def test_remove_only_this_runs_grant_and_is_idempotent(tmp_path: Path) -> None:
    state = str(tmp_path)
    grants.write_grant(state, grants.Grant(grants.GRANTED, "12", "n1", 1, lease_id="L2"), gid=None)
    assert grants.remove_grant(state, "n1", "12", 0) is False  # the first run's late Epilog
    assert grants.read_grant(state, "n1", "12") is not None
    assert grants.remove_grant(state, "n1", "12", 1) is True
    assert grants.remove_grant(state, "n1", "12", 1) is False
    assert grants.read_grant(state, "n1", "12") is None


def test_remove_drops_an_unreadable_grant(tmp_path: Path) -> None:
    folder = tmp_path / "jobs" / "n1"
    folder.mkdir(parents=True)
    (folder / "12.grant").write_text("garbage")
    assert grants.remove_grant(str(tmp_path), "n1", "12", 0) is True


@pytest.mark.parametrize(("name", "ok"), [("CUDA_VISIBLE_DEVICES", True), ("_X1", True), ("1X", False),
                                          ("A-B", False), ("", False), ("Ä", False), ("A B", False)])
def test_env_names(name: str, ok: bool) -> None:
    assert grants.is_env_name(name) is ok
