"""client.call against a fake gpuarbd: answers, error answers, and every way of not answering."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pytest

from slurm_gpuarb import client, wire
from slurm_gpuarb.errors import LeaseSpecError, NodeFault, ProtocolError

from .conftest import CLOSE, HANG, FakeDaemon, Respond, err, ok

PING = {"v": 1, "op": "ping"}
Factory = Callable[[Respond], FakeDaemon]


def test_answer_is_returned_and_request_sent_as_one_line(daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: ok("ping", version="0.1.0"))
    assert client.call(d.path, PING, timeout=2) == {"v": 1, "ok": True, "op": "ping", "version": "0.1.0"}
    assert d.requests == [PING]


def test_error_answer_raises_the_class_it_names(daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: err("NodeFault", "gpu 3 is not in telemetry"))
    with pytest.raises(NodeFault, match="gpu 3"):
        client.call(d.path, PING, timeout=2)
    d.respond = lambda req: err("LeaseSpecError", "unknown key 'vrm'")
    with pytest.raises(LeaseSpecError):
        client.call(d.path, PING, timeout=2)


def test_protocol_error_answer_is_not_daemon_unavailable(daemon_factory: Factory) -> None:
    # The daemon answered: our request was wrong. Falling back would only repeat the mistake.
    d = daemon_factory(lambda req: err("ProtocolError", "unknown field 'x'"))
    with pytest.raises(ProtocolError) as info:
        client.call(d.path, PING, timeout=2)
    assert not isinstance(info.value, client.DaemonUnavailable)


def test_missing_socket(short_dir: str) -> None:
    with pytest.raises(client.DaemonUnavailable, match="not running"):
        client.call(os.path.join(short_dir, "none.sock"), PING, timeout=1)


def test_refused_connection_on_a_stale_socket(short_dir: str) -> None:
    path = os.path.join(short_dir, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: what a killed daemon leaves behind
    with pytest.raises(client.DaemonUnavailable, match="refused"):
        client.call(path, PING, timeout=1)


def test_hung_daemon_times_out(daemon_factory: Factory) -> None:
    # Accepts and reads (a SIGSTOPped daemon's kernel does as much), never answers.
    d = daemon_factory(lambda req: HANG)
    with pytest.raises(client.DaemonUnavailable, match=r"did not answer within 0\.3s"):
        client.call(d.path, PING, timeout=0.3)


def test_listen_backlog_without_accept_times_out(short_dir: str) -> None:
    # The closest thing to SIGSTOP without a second process: listening, never accepting.
    path = os.path.join(short_dir, "frozen.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    try:
        with pytest.raises(client.DaemonUnavailable, match="did not answer"):
            client.call(path, PING, timeout=0.3)
    finally:
        s.close()


def test_trickling_daemon_is_bound_by_the_total_timeout(short_dir: str) -> None:
    path = os.path.join(short_dir, "slow.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(1024)
            while not stop.wait(0.05):  # one byte every 50 ms: each recv alone would never time out
                try:
                    conn.sendall(b" ")
                except OSError:
                    return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        with pytest.raises(client.DaemonUnavailable, match="did not answer"):
            client.call(path, PING, timeout=0.4)
    finally:
        stop.set()
        server.close()
        t.join(2)


@pytest.mark.parametrize("answer", [CLOSE, b'{"v": 1, "ok": tr', b"not json\n", b'{"v": 2, "ok": true, "op": "ping"}\n',
                                    b'{"v": 1, "ok": true, "op": "status"}\n', b"[1]\n"])
def test_no_proper_answer_is_daemon_unavailable(daemon_factory: Factory, answer: Any) -> None:
    d = daemon_factory(lambda req: answer)
    with pytest.raises(client.DaemonUnavailable):
        client.call(d.path, PING, timeout=2)


def test_oversized_answer_is_daemon_unavailable(daemon_factory: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "MAX_RESPONSE_BYTES", 64)
    d = daemon_factory(lambda req: ok("ping", pad="x" * 200))
    with pytest.raises(client.DaemonUnavailable, match="over 64 bytes"):
        client.call(d.path, PING, timeout=2)


def test_unencodable_message_is_our_error_not_the_daemons(short_dir: str) -> None:
    with pytest.raises(ProtocolError) as info:
        client.call(os.path.join(short_dir, "x.sock"), {"v": 1, "op": "ping", "x": float("nan")}, timeout=1)
    assert not isinstance(info.value, client.DaemonUnavailable)


def test_daemon_unavailable_message_names_the_socket(short_dir: str) -> None:
    path = os.path.join(short_dir, "none.sock")
    with pytest.raises(client.DaemonUnavailable) as info:
        client.call(path, PING, timeout=1)
    assert path in str(info.value)
