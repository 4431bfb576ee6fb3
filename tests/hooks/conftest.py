"""Fixtures for the hook tests: a fake gpuarbd on a Unix socket, a hook config, and the hooks' environment.

The fake daemon is a real ``AF_UNIX`` server in a thread. Each connection reads one request line and
answers with what ``daemon.respond`` returns for it: a response dict, or one of the misbehaviours
``HANG`` (accept, read, never answer: a SIGSTOPped daemon), ``CLOSE`` (hang up without a word) or
raw ``bytes`` (sent as they are). Every request it got is kept in ``daemon.requests``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from slurm_gpuarb import logsink
from slurm_gpuarb.hooks import common

HANG = "hang"
CLOSE = "close"
Respond = Callable[[dict[str, Any]], Any]


def ok(op: str, **payload: Any) -> dict[str, Any]:
    return {"v": 1, "ok": True, "op": op, **payload}


def err(kind: str, message: str) -> dict[str, Any]:
    return {"v": 1, "ok": False, "error": {"kind": kind, "message": message}}


def grant_answer(job_id: str = "12", node: str = "n1", *, restart: int = 0, lease_id: str | None = "L1",
                 vram: int | None = 6144, refused: str | None = None, exports: dict[str, str] | None = None,
                 reason: str = "granted 6144MiB on gpu0") -> dict[str, Any]:
    """A job_start answer shaped like protocol.schema.json's JobStartResponse."""
    if exports is None:
        exports = {} if lease_id is None else {"GPUARB_VRAM_MB": str(vram), "GPUARB_LEASE_ID": lease_id}
    return ok("job_start", outcome="grant", reason=reason, node=node, lease=None, grant={
        "job_id": job_id, "restart_count": restart, "node": node, "lease_id": lease_id, "vram_mib": vram,
        "gpus": [0], "mig_uuid": None, "prio": "batch", "exports": exports, "refused": refused})


class FakeDaemon:
    """A gpuarbd stand-in: answers each request with ``respond(request)``."""

    def __init__(self, path: str, respond: Respond) -> None:
        self.path = path
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(path)
        self._server.listen(16)
        self._server.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            data = b""
            try:
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
            except OSError:
                return
            request = json.loads(data)
            self.requests.append(request)
            answer = self.respond(request)
            if answer == HANG:
                self._stop.wait(10)  # a frozen daemon; bounded so a broken client cannot hang the suite
                return
            if answer == CLOSE:
                return
            raw = answer if isinstance(answer, bytes) else json.dumps(answer).encode() + b"\n"
            conn.sendall(raw)

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self._thread.join(2)


@pytest.fixture(autouse=True)
def _no_system_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hooks run in-process here must never read the machine's own /etc/slurm/gpuarb.toml, nor read or
    write its settings cache in /run/gpuarb (the tests run as root)."""
    system = tmp_path_factory.mktemp("system")
    monkeypatch.setattr(common, "DEFAULT_CONFIG_PATH", str(system / "gpuarb.toml"))
    monkeypatch.setattr(common, "SETTINGS_CACHE", str(system / "run" / "hook-settings.cache"))


@pytest.fixture
def short_dir() -> Iterator[str]:
    """A directory with a short path: AF_UNIX socket paths must fit in 108 bytes."""
    path = tempfile.mkdtemp(prefix="ga-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon_factory(short_dir: str) -> Iterator[Callable[[Respond], FakeDaemon]]:
    made: list[FakeDaemon] = []

    def make(respond: Respond) -> FakeDaemon:
        d = FakeDaemon(os.path.join(short_dir, "gpuarb.sock"), respond)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


class Cluster:
    """One node's hook setup: a config file, its state dir and log, and the environment Slurm gives."""

    def __init__(self, root: Path, socket_path: str) -> None:
        self.root = root
        self.socket_path = socket_path
        self.state_dir = root / "state"
        self.log_file = root / "gpuarb.log"
        self.config = root / "gpuarb.toml"
        self.fallback_calls: list[dict[str, Any]] = []
        self.write_config()

    def write_config(self, *, fail_mode: str = "open", deadline: str = "3s", quantum: str | None = "512MiB",
                     extra: str = "") -> None:
        policy = "" if quantum is None else f'[policy]\nquantum = "{quantum}"\n'
        self.config.write_text(
            "version = 1\n"
            f'[daemon]\nsocket = "{self.socket_path}"\nstate_dir = "{self.state_dir}"\nlog_file = "{self.log_file}"\n'
            f'[hooks]\nfail_mode = "{fail_mode}"\ndeadline = "{deadline}"\n{policy}{extra}')
        self.config.chmod(0o644)

    def fast_deadline(self, monkeypatch: pytest.MonkeyPatch, seconds: float = 0.5) -> None:
        """Hooks get a deadline below the config's whole seconds, so that timeout tests stay quick."""
        real = common.read_settings

        def read(env: Any) -> common.Settings:
            s = real(env)
            s.deadline_s = seconds
            return s

        monkeypatch.setattr(common, "read_settings", read)

    def env(self, **extra: str) -> dict[str, str]:
        """The Prolog's environment for job 12 on n1 (a GPU job), plus ``extra``."""
        env = {"GPUARB_CONFIG": str(self.config), "SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1",
               "SLURM_JOB_GPUS": "0", "SLURM_JOB_UID": str(os.getuid()), "SLURM_JOB_GID": str(os.getgid()),
               "SLURM_JOB_USER": "alice", "SLURM_JOB_PARTITION": "batch",
               "SLURM_JOB_COMMENT": "gpuarb: vram=6GiB prio=batch"}
        env.update(extra)
        return {k: v for k, v in env.items() if v != ""}

    def grant_file(self, job_id: str = "12", node: str = "n1") -> Path:
        return self.state_dir / "jobs" / node / f"{job_id}.grant"

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


@pytest.fixture
def cluster(tmp_path: Path, short_dir: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A hook setup whose in-process fallback is replaced by one that fails (and counts its calls);
    a test that wants a working fallback sets ``common.in_process`` itself."""
    for key in list(os.environ):
        if key.startswith("GPUARB_") and key != "GPUARB_TEST_PG_URL":
            monkeypatch.delenv(key)
    c = Cluster(tmp_path, os.path.join(short_dir, "gpuarb.sock"))
    # A hook whose config is broken falls back to the defaults: keep those inside tmp_path too.
    monkeypatch.setitem(common.DEFAULTS, "state_dir", str(tmp_path / "default-state"))
    monkeypatch.setitem(common.DEFAULTS, "log_file", str(tmp_path / "default.log"))
    monkeypatch.setitem(common.DEFAULTS, "socket_path", str(tmp_path / "default.sock"))

    def no_fallback(msg: dict[str, Any], env: Any) -> dict[str, Any]:
        c.fallback_calls.append(msg)
        raise RuntimeError("the ledger is down too (test)")

    monkeypatch.setattr(common, "in_process", no_fallback)
    yield c
    logsink.configure()  # close the log file the hook opened
