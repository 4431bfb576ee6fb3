"""A thin, stdlib-only client of ``gpuarbd``: one request, one answer, over its Unix socket.

    from slurm_gpuarb import client
    answer = client.call("/run/gpuarb/gpuarb.sock", {"v": 1, "op": "ping"}, timeout=2.0)

:func:`call` bounds the *whole* exchange by ``timeout``: connect, send and every read share one
deadline. That matters because the realistic failure is a hung daemon, not a dead one: a SIGSTOPped
``gpuarbd`` still completes connections at kernel level (the listen backlog) and takes our request
into its socket buffer, but never answers. Every way the daemon can fail to answer (no socket,
refused, timed out, closed early, a malformed or oversized answer) is a :class:`DaemonUnavailable`,
so a caller has one exception to fall back on. An answer that *is* an error response raises the
exception it names (:func:`wire.decode_response`): the daemon worked, and said no.

The Slurm hooks import this on their hot path: it imports only ``json``, ``socket``, ``time`` and
:mod:`slurm_gpuarb.wire` (not :mod:`slurm_gpuarb.protocol`, whose dataclasses cost more than the
hook's whole exchange with the daemon), and ``typing`` only for the type checker.
"""

from __future__ import annotations

import json
import socket
import time

from slurm_gpuarb import wire
from slurm_gpuarb.errors import GpuArbError, ProtocolError

# Only for the type checker: importing typing at run time costs a hook more than its daemon call.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

__all__ = ["DaemonUnavailable", "call"]



class DaemonUnavailable(GpuArbError):
    """gpuarbd did not answer: no socket, connection refused, timed out, or an answer that is not one."""


def call(socket_path: str, msg: Mapping[str, Any], *, timeout: float) -> dict[str, Any]:
    """Send ``msg`` (a request object with ``v`` and ``op``) to gpuarbd at ``socket_path``; return its answer.

    ``timeout`` (seconds) bounds connect, send and read together. Raises :class:`DaemonUnavailable`
    when the daemon does not answer properly, :class:`~slurm_gpuarb.errors.ProtocolError` when
    ``msg`` cannot be encoded, and the error class an error response names (``NodeFault``,
    ``LeaseSpecError``, ``PermissionDeniedError``, …) when the daemon answers with an error.
    """
    line = wire.encode(msg)  # a message we cannot encode is our mistake, not the daemon's
    op = msg.get("op")
    deadline = time.monotonic() + timeout
    where = f"gpuarbd at {socket_path}"
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:
        raise DaemonUnavailable(f"could not create a socket to reach {where}") from e
    try:
        try:
            sock.settimeout(max(timeout, 0.001))
            sock.connect(socket_path)
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(line)
            raw = wire.read_line(wire.SocketLineReader(sock, deadline, what="the answer"), wire.MAX_RESPONSE_BYTES)
        except FileNotFoundError as e:
            raise DaemonUnavailable(f"{where} is not running (no socket); start gpuarbd or check "
                                    "[daemon] socket in gpuarb.toml") from e
        except ConnectionRefusedError as e:
            raise DaemonUnavailable(f"{where} refused the connection (a stale socket: is gpuarbd running?)") from e
        except TimeoutError as e:
            raise DaemonUnavailable(f"{where} did not answer within {timeout:.1f}s (hung or overloaded)") from e
        except ProtocolError as e:
            raise DaemonUnavailable(f"{where} sent an answer over {wire.MAX_RESPONSE_BYTES} bytes") from e
        except OSError as e:
            raise DaemonUnavailable(f"could not talk to {where}") from e
    finally:
        sock.close()
    if not raw.endswith(b"\n"):
        raise DaemonUnavailable(f"{where} closed the connection without a complete answer")
    try:
        return wire.decode_response(raw, op=op if isinstance(op, str) else None)
    except ProtocolError as e:
        if _is_error_response(raw):
            raise  # the daemon answered: our request was malformed
        raise DaemonUnavailable(f"{where} sent a malformed answer") from e


def _is_error_response(raw: bytes) -> bool:
    # Only on the error path: tells "the daemon answered ProtocolError" from "the answer is garbage".
    try:
        obj = json.loads(raw)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("ok") is False and isinstance(obj.get("error"), dict)
