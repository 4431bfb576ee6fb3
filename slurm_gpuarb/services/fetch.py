"""A small, distrustful HTTP GET for probes: one deadline for connect and read, a size cap, no redirects.

Inference servers are probed from the controller's loop and from ``gpuarb services``; a server that
hangs, drips bytes, answers gigabytes or answers HTML must cost a bounded time and memory and end
as a one-line reason, never an exception that escapes the probe. Only the standard library
(``http.client``): the probe must not pull in a heavy client for three GETs.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

MAX_BODY_BYTES: Final = 1 << 20  # JSON answers: a few KiB in practice
MAX_METRICS_BYTES: Final = 4 << 20  # vLLM /metrics: histograms per model, ~100 KiB; room for many LoRAs
_CHUNK: Final = 64 << 10
_HEADERS: Final = {"User-Agent": "gpuarb-probe/1", "Accept": "application/json, text/plain", "Connection": "close"}


class ProbeFailure(Exception):
    """The backend did not give a usable answer; ``str()`` is the reason a person reads, ``state``
    what it makes the service: ``down``, or ``busy`` for an explicit "too many requests"."""

    def __init__(self, reason: str, *, state: str = "down") -> None:
        super().__init__(reason)
        self.state = state


@dataclass(frozen=True)
class Answer:
    """One HTTP answer, fully read (at most the cap)."""

    status: int
    body: bytes
    path: str


def clip(text: str, limit: int = 80) -> str:
    """Printable and short: backend text goes into status lines and JSON that people read."""
    clean = "".join(ch if ch.isprintable() else " " for ch in text[: limit + 1]).strip()
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def snippet(body: bytes, limit: int = 60) -> str:
    """The start of a body for a reason (``'<html><head>…'``), or ``'an empty body'``."""
    text = clip(body[: limit * 4].decode("utf-8", "replace"), limit)
    return repr(text) if text else "an empty body"


class Client:
    """GETs against one base URL (``http://HOST:PORT``) under one deadline shared by every request.

    ``timeout_s`` is the budget of the whole probe, so a vLLM probe's three requests together take at
    most that long (plus one socket wait while headers trickle in); a request started with no time
    left fails at once.
    """

    def __init__(self, base_url: str, timeout_s: float) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def get(self, path: str, max_bytes: int = MAX_BODY_BYTES) -> Answer:
        """GET ``path``; raises :class:`ProbeFailure` with a reason for anything but a complete answer."""
        left = self.remaining()
        if left <= 0:
            raise ProbeFailure(f"GET {path}: no time left of the probe's {self.timeout_s:g}s")
        conn: http.client.HTTPConnection
        if self.https:
            import ssl  # only for https services

            conn = http.client.HTTPSConnection(self.host, self.port, timeout=left,
                                               context=ssl.create_default_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=left)
        try:
            conn.connect()
            sock = conn.sock  # kept: getresponse() drops the connection's reference on Connection: close
            conn.request("GET", path, headers=_HEADERS)
            resp = conn.getresponse()
            return Answer(resp.status, self._body(resp, sock, path, max_bytes), path)
        except ProbeFailure:
            raise
        except ConnectionRefusedError as e:
            raise ProbeFailure(f"connection refused (nothing listens on {self.host}:{self.port})") from e
        except TimeoutError as e:  # socket.timeout is TimeoutError
            raise ProbeFailure(f"GET {path}: no answer within {self.timeout_s:g}s") from e
        except socket.gaierror as e:
            raise ProbeFailure(f"cannot resolve host {self.host!r} ({e.strerror or e})") from e
        except (http.client.HTTPException, ValueError) as e:  # BadStatusLine, RemoteDisconnected, IncompleteRead
            raise ProbeFailure(f"GET {path}: not an HTTP answer ({type(e).__name__}: {clip(str(e), 60)})") from e
        except OSError as e:
            raise ProbeFailure(f"cannot reach {self.host}:{self.port} ({clip(e.strerror or str(e), 60)})") from e
        finally:
            conn.close()

    def _body(self, resp: http.client.HTTPResponse, sock: socket.socket | None, path: str, max_bytes: int) -> bytes:
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise ProbeFailure(f"GET {path}: the answer is {int(length)} bytes, more than the {max_bytes} bytes "
                               "a probe reads; is this URL the service's API?")
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                left = self.remaining()
                if left <= 0:
                    raise TimeoutError
                if sock is not None:
                    sock.settimeout(left)  # the deadline bounds a body that trickles in, not only each read
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                if size > max_bytes:
                    raise ProbeFailure(f"GET {path}: the answer is larger than the {max_bytes} bytes a probe reads; "
                                       "is this URL the service's API?")
                chunks.append(chunk)
        finally:
            resp.close()


def expect_ok(answer: Answer, what: str) -> None:
    """Refuse anything but 200, with a reason that says what the status likely means."""
    status, path = answer.status, answer.path
    if status == 200:
        return
    if 300 <= status < 400:
        raise ProbeFailure(f"GET {path} answered HTTP {status} (a redirect); point url at {what} itself")
    if status == 429:
        raise ProbeFailure(f"GET {path} answered HTTP 429 Too Many Requests", state="busy")
    if status >= 500:
        raise ProbeFailure(f"GET {path} answered HTTP {status} ({snippet(answer.body)})")
    raise ProbeFailure(f"GET {path} answered HTTP {status} ({snippet(answer.body)}); is this {what}?")


def json_body(answer: Answer, what: str) -> Any:
    """The parsed JSON of a 200 answer; garbage becomes a :class:`ProbeFailure`."""
    expect_ok(answer, what)
    try:
        return json.loads(answer.body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ProbeFailure(f"GET {answer.path} answered 200 but not JSON ({snippet(answer.body)}); is this "
                           f"{what}?") from e


def shape_error(path: str, where: str, expected: str, found: object, what: str) -> ProbeFailure:
    """A JSON answer of the wrong shape: which field, what was expected, what came."""
    return ProbeFailure(f"GET {path}: {where} should be {expected} but is {_kind_of(found)}; is this {what}?")


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {clip(value, 30)!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
