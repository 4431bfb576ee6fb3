"""gpuarbd end to end over a real Unix socket: in a thread, and as a process (SIGTERM, detaching)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from slurm_gpuarb import client, protocol
from slurm_gpuarb.config import Config
from slurm_gpuarb.daemon.server import Daemon, _parser, main, peer_credentials, peer_gone
from slurm_gpuarb.errors import ConfigError, GpuArbError, SchemaVersionError
from slurm_gpuarb.ledger import Ledger

from .conftest import INVENTORY, REPO, FakeSlurm, job

PING = {"v": 1, "op": "ping"}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A 0755 directory with a short path: AF_UNIX paths are limited to 107 bytes, and other users
    (the uid test) must be able to reach the socket."""
    path = Path(tempfile.mkdtemp(prefix="gpuarbd-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dcfg(cfg: Config, short_dir: Path) -> Config:
    return replace(cfg, socket_path=short_dir / "run" / "gpuarb.sock", state_dir=short_dir / "state")


@pytest.fixture
def daemon(dcfg: Config, slurm: FakeSlurm) -> Iterator[Daemon]:
    d = Daemon(dcfg, nodes=("n1", "n2", "n3"), slurm=slurm, reconcile_every=3600, sample_every=0,
               conn_timeout=2.0)
    d.start()
    yield d
    d.stop()


def call(d: Daemon | Config | Path, msg: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    path = d.socket_path if isinstance(d, Daemon | Config) else d
    return client.call(str(path), msg, timeout=timeout)


def raw_exchange(path: Path, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` as is and read until the daemon closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# --------------------------------------------------------------------------- in a thread


def test_serves_the_protocol_with_files_in_place(daemon: Daemon, dcfg: Config, slurm: FakeSlurm) -> None:
    # Slurm lists a job whose Prolog runs (as it does for real): the daemon's start-up reconcile, in its
    # own thread and possibly late on a slow machine, must find job 12 running, not expire its lease.
    slurm.add(job("12"))
    path = daemon.socket_path
    assert call(daemon, PING)["version"]
    assert oct(path.stat().st_mode & 0o777) == "0o666" and oct(path.parent.stat().st_mode & 0o777) == "0o755"
    assert (Path(dcfg.state_dir) / "gpuarbd.pid").read_text().strip() == str(os.getpid())
    start = {"v": 1, "op": "job_start", "job_id": "12", "restart_count": 0, "node": "n1", "uid": 1000, "gres": "2",
             "comment": "gpuarb: vram=6GiB"}
    grant = protocol.grant_from_json(call(daemon, start)["grant"])
    assert (grant.vram_mib, grant.gpus, grant.exports["GPUARB_VRAM_MB"]) == (6144, (2,), "6144")
    assert len(call(daemon, {"v": 1, "op": "status", "node": "n1"})["gpus"]) == 8
    end = {"v": 1, "op": "job_end", "job_id": "12", "restart_count": 0, "node": "n1"}
    assert call(daemon, end)["released"] == [grant.lease_id]
    assert call(daemon, end)["released"] == []


def test_errors_are_answers_and_a_connection_carries_several_requests(daemon: Daemon) -> None:
    lines = protocol.encode(protocol.PingMsg()) + b'{"v":1,"op":"reqest"}\n' + b"not json\n" + \
        protocol.encode(protocol.StatusMsg(node="n2"))
    answers = [json.loads(x) for x in raw_exchange(daemon.socket_path, lines).splitlines()]
    assert [a["ok"] for a in answers] == [True, False, False, True]
    assert "did you mean 'request'" in answers[1]["error"]["message"]
    assert answers[2]["error"]["kind"] == "ProtocolError"
    assert answers[3]["gpus"][0]["node"] == "n2"


def test_an_oversized_line_is_answered_then_the_connection_closed(daemon: Daemon) -> None:
    big = b'{"v":1,"op":"ping","x":"' + b"a" * protocol.MAX_MESSAGE_BYTES + b'"}\n' + protocol.encode(PING)
    out = raw_exchange(daemon.socket_path, big).splitlines()
    assert len(out) == 1 and b"longer than 65536 bytes" in out[0]


def test_a_silent_client_is_dropped(dcfg: Config) -> None:
    with Daemon(dcfg, nodes=("n1",), reconcile_every=0, sample_every=0, conn_timeout=0.2) as d, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(d.socket_path))
        s.sendall(b'{"v":1,"op":')  # half a request, then nothing
        assert s.recv(100) == b""  # the daemon hung up instead of waiting forever
        assert call(d, PING)["ok"]  # and still serves others


def test_a_stale_socket_is_replaced_but_a_live_daemon_is_not(daemon: Daemon, dcfg: Config) -> None:
    with pytest.raises(ConfigError, match=f"another gpuarbd answers on {daemon.socket_path} \\(pid {os.getpid()}\\)"):
        Daemon(dcfg, nodes=("n1",), reconcile_every=0, sample_every=0).start()
    assert call(daemon, PING)["ok"]  # the refused one left the running one alone
    daemon.stop()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(daemon.socket_path))  # bound, never listening: what a crashed daemon leaves
    stale.close()
    with Daemon(dcfg, nodes=("n1",), reconcile_every=0, sample_every=0) as again:
        assert call(again, PING)["ok"]
    assert not daemon.socket_path.exists() and not (Path(dcfg.state_dir) / "gpuarbd.pid").exists()


def test_a_file_where_the_socket_goes_is_refused(dcfg: Config) -> None:
    Path(dcfg.socket_path).parent.mkdir(parents=True)
    Path(dcfg.socket_path).write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        Daemon(dcfg, reconcile_every=0, sample_every=0).start()


def test_an_old_ledger_schema_stops_the_daemon_before_it_binds(dcfg: Config) -> None:
    with Ledger.open(dcfg.ledger_url, create=False, check=False) as ledger:
        ledger.upgrade("0002")
    d = Daemon(dcfg, reconcile_every=0, sample_every=0)
    with pytest.raises(SchemaVersionError, match="gpuarb db upgrade"):
        d.start()
    d.stop()
    assert not Path(dcfg.socket_path).exists()


def test_reconcile_runs_at_start(dcfg: Config, slurm: FakeSlurm) -> None:
    with Daemon(dcfg, nodes=("n1",), slurm=slurm, reconcile_every=3600, sample_every=0) as d:
        start = {"v": 1, "op": "job_start", "job_id": "5", "restart_count": 0, "node": "n1", "uid": 0, "gres": "0"}
        lease_id = call(d, start)["grant"]["lease_id"]
    slurm.add(job("5", state="COMPLETED"))
    with Daemon(dcfg, nodes=("n1",), slurm=slurm, reconcile_every=3600, sample_every=0) as d:
        deadline = time.monotonic() + 10
        while d.handlers.ledger.get(lease_id).state.value == "granted" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert d.handlers.ledger.get(lease_id).state.value == "expired"


SYSTEM_PYTHON = "/usr/bin/python3"  # the venv's interpreter may not be reachable by another user


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root and /usr/bin/python3 to connect as another user")
def test_peer_credentials_decide_what_a_caller_may_do(daemon: Daemon) -> None:
    code = (
        "import socket, sys\n"
        "for line in sys.argv[2:]:\n"
        "    s = socket.socket(socket.AF_UNIX); s.settimeout(10); s.connect(sys.argv[1])\n"
        "    s.sendall(line.encode() + b'\\n'); print(s.makefile('rb').readline().decode().strip()); s.close()\n"
    )
    msgs = [json.dumps(PING), json.dumps({"v": 1, "op": "job_start", "job_id": "1", "restart_count": 0, "node": "n1",
                                          "uid": 0, "gres": "0"})]
    out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", code, str(daemon.socket_path), *msgs], user=65534,
                         group=65534, env={}, cwd="/", capture_output=True, text=True, timeout=60,
                         check=True).stdout.splitlines()
    assert json.loads(out[0])["ok"] is True
    denied = json.loads(out[1])
    assert denied["error"]["kind"] == "PermissionError"
    assert "uid 65534 may not send 'job_start'" in denied["error"]["message"]
    assert daemon.handlers.ledger.decisions() == []


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_credentials(a) == peer_credentials(b)
        assert (peer_credentials(a).uid, peer_credentials(a).pid) == (os.getuid(), os.getpid())


def test_a_client_that_hung_up_is_told_from_one_that_only_stopped_writing() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.sendall(b'{"v":1,"op":"ping"}\n')
        assert not peer_gone(b)
        a.shutdown(socket.SHUT_WR)  # socat at the end of its input: still waiting for the answer
        assert not peer_gone(b)
        a.close()  # a hook whose deadline passed: it fell back in-process
        assert peer_gone(b)


# --------------------------------------------------------------------------- as a process


@pytest.fixture
def config_file(short_dir: Path, tmp_path: Path, fake_state: Path) -> Path:
    path = short_dir / "gpuarb.toml"
    path.write_text(INVENTORY.read_text() + f"""
[host]
node = "n1"

[ledger]
url = "sqlite:///{tmp_path / 'ledger.db'}"

[telemetry]
fake_state = "{fake_state}"

[daemon]
socket = "{short_dir / 'run' / 'gpuarb.sock'}"
state_dir = "{short_dir / 'state'}"
log_file = "{tmp_path / 'daemon.log'}"
""")
    return path


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUARB_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def _wait_for(path: Path, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call(path, PING, timeout=2.0)
        except GpuArbError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_sigterm_stops_the_daemon_cleanly(config_file: Path, short_dir: Path) -> None:
    sock = short_dir / "run" / "gpuarb.sock"
    proc = subprocess.Popen([sys.executable, "-m", "slurm_gpuarb.daemon.server", "--config", str(config_file),
                             "--foreground", "--nodes", "n1,n2,n3", "--slurm", "none"],
                            env=_env(), cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert _wait_for(sock)["ok"]
        assert (short_dir / "state" / "gpuarbd.pid").read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert not sock.exists() and not (short_dir / "state" / "gpuarbd.pid").exists()


def test_without_foreground_it_detaches_once_it_serves(config_file: Path, short_dir: Path) -> None:
    sock = short_dir / "run" / "gpuarb.sock"
    done = subprocess.run([sys.executable, "-m", "slurm_gpuarb.daemon.server", "--config", str(config_file),
                           "--slurm", "none", "--sample-every", "0"], env=_env(), cwd=str(REPO),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid = int((short_dir / "state" / "gpuarbd.pid").read_text())
    try:
        assert call(sock, PING)["ok"]  # serving when the command returned
        second = subprocess.run([sys.executable, "-m", "slurm_gpuarb.daemon.server", "--config", str(config_file),
                                 "--slurm", "none"], env=_env(), cwd=str(REPO), capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 1 and "another gpuarbd answers" in second.stderr
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert _gone(pid)
    assert not sock.exists()


def test_main_reports_a_bad_config_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(tmp_path / "missing.toml"), "--foreground"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpuarbd: error: ") and "cannot read the config file" in err and "Traceback" not in err


def test_main_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--reconcile-every", "-5"])
    assert info.value.code == 2
    assert "expected 0 (off) or more seconds, got -5" in capsys.readouterr().err


def test_the_systemd_unit_runs_gpuarbd_in_the_foreground_with_valid_options() -> None:
    unit = (REPO / "templates" / "etc" / "systemd" / "system" / "gpuarbd.service").read_text()
    [exec_start] = [ln.split("=", 1)[1] for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    program, *args = exec_start.split()
    assert program.endswith("/gpuarbd")
    assert _parser().parse_args(args).foreground
