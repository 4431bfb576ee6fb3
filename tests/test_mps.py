"""MPS control daemons for share=mps leases, against a fake ``nvidia-cuda-mps-control`` (tests/mpsfake.py)."""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mpsfake import FakeControl

from slurm_gpuarb import mps

UUID = "GPU-fake-h100-80g-0"
ME = os.getuid()
NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="starting a daemon as another user needs root")


@pytest.fixture
def fake() -> Iterator[FakeControl]:
    f = FakeControl()
    try:
        yield f
    finally:
        f.close()


def _ensure(fake: FakeControl, job: str = "12", *, uid: int = ME, gid: int | None = None, gpu: int = 0,
            device: str = UUID, live: tuple[str, ...] = (), timeout: float = 5.0) -> mps.Outcome:
    return mps.ensure(str(fake.state), gpu, device, uid=uid, gid=gid, job_id=job, node="n1", binary=str(fake.path),
                      is_live=lambda j: j in live, timeout=timeout)


def _other_users_daemon(fake: FakeControl, uid: int = NOBODY) -> subprocess.Popen[bytes]:
    """A process of ``uid`` that looks like its control daemon for GPU 0 (argv[0] names the binary)."""
    base = Path(mps.gpu_dir(str(fake.state), 0))
    (base / "pipe").mkdir(parents=True)
    proc = subprocess.Popen(["nvidia-cuda-mps-control", "30"], executable="/bin/sleep", user=uid, group=uid)
    (base / "pipe" / mps.PID_FILE).write_text(f"{proc.pid}\n")
    (base / "owner").write_text(f"{uid} {uid} {UUID}\n")
    (base / "jobs").mkdir()
    (base / "jobs" / "7").write_text("n1\n")
    return proc


def _wait_gone(fake: FakeControl, gpu: int = 0) -> None:
    """Until a killed daemon is gone (a signal is delivered asynchronously)."""
    deadline = time.monotonic() + 5
    while mps.server_pid(str(fake.state), gpu) is not None:
        assert time.monotonic() < deadline, "the killed daemon is still there after 5s"
        time.sleep(0.01)


# --------------------------------------------------------------------------- finding the binary


def test_find_control_takes_only_a_root_owned_unwritable_executable(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    empty, bad, good = (tmp_path / n for n in ("empty", "bad", "good"))
    for d in (empty, bad, good):
        d.mkdir()
    (bad / mps.CONTROL).write_text("#!/bin/sh\n")
    (bad / mps.CONTROL).chmod(0o777)  # world-writable: anyone could make root run anything
    (good / mps.CONTROL).write_text("#!/bin/sh\n")
    (good / mps.CONTROL).chmod(0o755)
    assert mps.find_control([str(empty), str(bad)]) is None
    assert mps.find_control([str(empty), str(bad), str(good)]) == f"{good}/{mps.CONTROL}"
    (good / mps.CONTROL).chmod(0o644)  # not executable
    assert mps.find_control([str(good)]) is None
    monkeypatch.setattr(mps, "SEARCH_DIRS", (str(empty),))
    assert mps.find_control() is None


# --------------------------------------------------------------------------- starting


def test_starts_the_users_daemon_on_the_gpu_uuid(fake: FakeControl) -> None:
    out = _ensure(fake)
    base = Path(mps.gpu_dir(str(fake.state), 0))
    assert (out.state, out.serving, out.pipe_dir, out.log_dir) == (mps.STARTED, True, f"{base}/pipe", f"{base}/log")
    assert out.pid is not None and out.pid == mps.server_pid(str(fake.state), 0)
    (call,) = fake.calls()
    assert call == {"uid": str(ME), "gid": str(os.getgid() if ME != 0 else 0), "args": "-d", "pipe": f"{base}/pipe",
                    "log": f"{base}/log", "dev": UUID, "path": mps.SAFE_PATH, "stdin": ""}
    for d in ("pipe", "log"):
        st = os.stat(base / d)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == ME
    assert (base / "owner").read_text().split() == [str(ME), str(ME if ME == 0 else os.getgid()), UUID]
    assert sorted(os.listdir(base / "jobs")) == ["12"]


def test_a_running_daemon_of_the_same_user_is_reused(fake: FakeControl) -> None:
    first = _ensure(fake, "12")
    again = _ensure(fake, "13")
    assert (again.state, again.pid, again.pipe_dir) == (mps.RUNNING, first.pid, first.pipe_dir)
    assert len(fake.calls()) == 1  # no second -d
    assert sorted(os.listdir(Path(mps.gpu_dir(str(fake.state), 0)) / "jobs")) == ["12", "13"]


def test_each_gpu_has_its_own_daemon(fake: FakeControl) -> None:
    a, b = _ensure(fake, gpu=0), _ensure(fake, gpu=3, device="GPU-other")
    assert a.state == b.state == mps.STARTED and a.pid != b.pid and a.pipe_dir != b.pipe_dir
    assert [c["dev"] for c in fake.calls()] == [UUID, "GPU-other"]


def test_a_stale_pid_file_means_a_fresh_start(fake: FakeControl) -> None:
    first = _ensure(fake, "12")
    assert first.pid is not None
    os.kill(first.pid, 9)
    _wait_gone(fake)
    Path(first.pipe_dir or "", "stray").write_text("left by the old daemon")
    again = _ensure(fake, "13")
    assert again.state == mps.STARTED and again.pid != first.pid
    assert not Path(again.pipe_dir or "", "stray").exists()  # a fresh pipe directory
    assert sorted(os.listdir(Path(mps.gpu_dir(str(fake.state), 0)) / "jobs")) == ["13"]  # 12's claim is gone


def test_the_same_user_on_another_device_gets_a_new_daemon(fake: FakeControl) -> None:
    first = _ensure(fake, "12")
    again = _ensure(fake, "13", device="GPU-swapped")
    assert again.state == mps.STARTED and again.pid != first.pid
    assert [c["args"] for c in fake.calls()] == ["-d", "", "-d"]  # start, quit, start


def test_a_daemon_that_fails_says_why(fake: FakeControl) -> None:
    fake.mode("fail")
    out = _ensure(fake)
    assert out.state == mps.FAILED and not out.serving
    assert out.reason == f"{mps.CONTROL} -d exited 3: boom: no CUDA-capable device"
    jobs = Path(mps.gpu_dir(str(fake.state), 0)) / "jobs"
    assert not jobs.exists() or os.listdir(jobs) == []  # the job claims nothing it does not use


def test_a_daemon_that_writes_no_pid_file_times_out(fake: FakeControl) -> None:
    fake.mode("nopid")
    out = _ensure(fake, timeout=0.3)
    assert out.state == mps.FAILED and "wrote no live pid file" in out.reason


def test_unavailable_without_binary_uuid_or_privilege(fake: FakeControl, monkeypatch: pytest.MonkeyPatch) -> None:
    nothing = mps.ensure(str(fake.state), 0, UUID, uid=ME, gid=None, job_id="1", node="n1", binary=None,
                         is_live=lambda j: False)
    assert nothing.state == mps.UNAVAILABLE and mps.CONTROL in nothing.reason
    assert _ensure(fake, device="").state == mps.UNAVAILABLE
    monkeypatch.setattr(os, "geteuid", lambda: 4242)  # neither root nor the job's user
    out = _ensure(fake, uid=4343)
    assert out.state == mps.UNAVAILABLE and "cannot start a daemon as uid 4343" in out.reason
    assert fake.calls() == []


def test_a_held_lock_fails_within_the_timeout(fake: FakeControl) -> None:
    base = Path(mps.gpu_dir(str(fake.state), 0))
    base.mkdir(parents=True)
    fd = os.open(base / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = _ensure(fake, timeout=0.2)
    finally:
        os.close(fd)
    assert out.state == mps.FAILED and "held by another Prolog" in out.reason
    assert fake.calls() == []


def test_a_planted_pid_link_is_not_followed(fake: FakeControl) -> None:
    first = _ensure(fake)
    pipe = Path(first.pipe_dir or "")
    target = fake.root / "elsewhere.pid"
    target.write_text(f"{first.pid}\n")
    (pipe / mps.PID_FILE).unlink()
    (pipe / mps.PID_FILE).symlink_to(target)
    assert mps.server_pid(str(fake.state), 0) is None


# --------------------------------------------------------------------------- one user per GPU


@as_root
def test_another_users_daemon_with_running_jobs_refuses(fake: FakeControl) -> None:
    other = _other_users_daemon(fake)
    try:
        out = _ensure(fake, "12", live=("7",))
        assert out.state == mps.BUSY and not out.serving
        assert f"runs the MPS server of uid {NOBODY} for job(s) 7" in out.reason
        assert "resubmit without share=mps" in out.reason
        assert other.poll() is None  # left alone
        assert fake.calls() == []
    finally:
        other.kill()
        other.wait()


@as_root
def test_another_users_idle_daemon_is_stopped_and_replaced(fake: FakeControl) -> None:
    other = _other_users_daemon(fake)
    try:
        out = _ensure(fake, "12", live=())  # job 7 has ended: its grant file is gone
        assert other.wait(timeout=5) is not None  # stopped: quit, as its owner
        assert out.state == mps.STARTED and out.pid != other.pid
        assert sorted(os.listdir(Path(mps.gpu_dir(str(fake.state), 0)) / "jobs")) == ["12"]
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


@as_root
def test_the_daemon_runs_as_the_jobs_user(fake: FakeControl) -> None:
    out = _ensure(fake, uid=NOBODY, gid=NOBODY)
    assert out.state == mps.STARTED, out.reason
    (call,) = fake.calls()
    assert (call["uid"], call["gid"]) == (str(NOBODY), str(NOBODY))
    assert os.stat(out.pipe_dir or "").st_uid == NOBODY
    assert os.stat(f"/proc/{out.pid}").st_uid == NOBODY
    owner = os.stat(Path(mps.gpu_dir(str(fake.state), 0)) / "owner")
    assert owner.st_uid == 0 and not owner.st_mode & 0o022  # root's record, not the user's


# --------------------------------------------------------------------------- stopping


def test_release_stops_the_daemon_with_its_last_job(fake: FakeControl) -> None:
    first = _ensure(fake, "12")
    _ensure(fake, "13")
    assert mps.release(str(fake.state), "12", binary=str(fake.path)) == []  # 13 still uses it
    assert mps.server_pid(str(fake.state), 0) == first.pid
    assert mps.release(str(fake.state), "13", binary=str(fake.path)) == [0]
    assert mps.server_pid(str(fake.state), 0) is None
    assert fake.calls()[-1]["stdin"] == "quit"
    assert mps.release(str(fake.state), "13", binary=str(fake.path)) == []  # idempotent
    assert mps.release(str(fake.root / "nowhere"), "13") == []


def test_stop_falls_back_to_sigterm(fake: FakeControl) -> None:
    first = _ensure(fake, "12")
    fake.mode("stubborn")
    assert mps.stop(str(fake.state), 0, binary=str(fake.path), timeout=0.3)
    assert first.pid is not None and mps.server_pid(str(fake.state), 0) is None
    assert mps.stop(str(fake.state), 0, binary=str(fake.path))  # nothing left to stop
    assert mps.stop(str(fake.root / "nowhere"), 0, binary=str(fake.path))


def test_importing_mps_is_cheap() -> None:
    """Only share=mps jobs import this module, and they import no more than they need."""
    code = ("import slurm_gpuarb.mps, sys; print(*sorted(m for m in sys.modules if m in ('typing', 'dataclasses', "
            "'pathlib', 'subprocess', 'shutil', 'tempfile')))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    assert out.split() == []
