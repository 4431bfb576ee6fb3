"""The lease protocol's wire layer: framing, size limits, the response envelope and the error kinds.

On the wire a message is one compact UTF-8 JSON object followed by ``\\n`` (:func:`encode` writes
ASCII), and every message carries ``"v": 1``::

    from slurm_gpuarb import wire
    line = wire.encode({"v": 1, "op": "ping"})  # b'{"v":1,"op":"ping"}\\n'
    answer = wire.decode_response(reply, op="ping")  # or raises the exception an error answer names

This is the part of :mod:`slurm_gpuarb.protocol` a client needs, kept apart for the Slurm hooks:
they start a fresh interpreter for every job, and ``protocol`` (its request dataclasses and
``model``'s, ``dataclasses``, ``typing``) costs a Prolog more than the rest of its run
(hooks/common.py has the measurements). So this module imports only :mod:`json` and
:mod:`slurm_gpuarb.errors`, works on plain dicts, and builds two small tables at import.
``protocol`` re-exports every public name here and adds the typed requests and payloads.

An error response names its exception by ``kind``: the class name in :mod:`slurm_gpuarb.errors`
(a subclass defined elsewhere travels as its errors.py parent), ``PermissionError`` for
:class:`~slurm_gpuarb.errors.PermissionDeniedError`, or ``InternalError``. :func:`error` builds
one and :func:`decode_response` raises it again, so an exception crosses the socket intact.
"""

from __future__ import annotations

import json

from slurm_gpuarb import errors
from slurm_gpuarb.errors import GpuArbError, PermissionDeniedError, ProtocolError

# Only for the type checker: typing costs a hook more than the JSON it exchanges.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Mapping
    from typing import Any, Final, NoReturn, Protocol

    class LineReader(Protocol):
        """What :func:`read_line` reads from: a binary file, or the client's socket reader."""

        def readline(self, size: int = -1, /) -> bytes: ...


__all__ = ["INTERNAL_ERROR_MESSAGE", "MAX_ERROR_CHARS", "MAX_MESSAGE_BYTES", "MAX_RESPONSE_BYTES",
           "PROTOCOL_VERSION", "REQUEST_OPS", "decode_response", "encode", "error", "read_line"]

PROTOCOL_VERSION: Final = 1
MAX_MESSAGE_BYTES: Final = 64 * 1024  # one request line, newline included: a daemon never buffers more
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024  # explain answers carry decision inputs; still bounded
MAX_ERROR_CHARS: Final = 2048
REQUEST_OPS: Final = ("request", "renew", "release", "status", "explain", "ping", "job_start", "job_end", "health")
INTERNAL_ERROR_MESSAGE: Final = "internal error in gpuarbd; its log has the details"

_MISSING: Final[Any] = object()


# --------------------------------------------------------------------------- framing


def encode(msg: Mapping[str, Any]) -> bytes:
    """One wire line from a plain message object: compact ASCII JSON and ``\\n``.

    Raises :class:`~slurm_gpuarb.errors.ProtocolError` when the message holds something JSON
    cannot carry (NaN and infinities included), or is longer than the limit its reader enforces
    (:data:`MAX_RESPONSE_BYTES` for responses, i.e. objects with ``ok``; :data:`MAX_MESSAGE_BYTES`
    otherwise). ``protocol.encode`` also takes the request dataclasses.
    """
    try:
        line = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"
    except (TypeError, ValueError) as e:
        raise ProtocolError("the message holds a value JSON cannot carry") from e
    limit = MAX_RESPONSE_BYTES if "ok" in msg else MAX_MESSAGE_BYTES
    if len(line) > limit:
        raise ProtocolError(f"the encoded message is {len(line)} bytes, over the {limit}-byte limit; ask for less")
    return line


class SocketLineReader:
    """``readline(size)`` over a socket that never blocks past ``deadline`` (a ``time.monotonic()``
    value) in total, not per ``recv``: a peer that trickles one byte at a time cannot stretch a hook's
    deadline nor pin a daemon thread. The daemon moves ``deadline`` forward for each request line."""

    __slots__ = ("buf", "deadline", "sock", "what")

    def __init__(self, sock: socket.socket, deadline: float = 0.0, *, what: str = "a complete line") -> None:
        self.sock = sock
        self.deadline = deadline
        self.what = what
        self.buf = b""

    def readline(self, size: int = -1, /) -> bytes:
        import time  # only readers need it: importing wire alone stays at json + errors

        while b"\n" not in self.buf and (size < 0 or len(self.buf) < size):
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out waiting for {self.what}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.buf += chunk
        end = self.buf.find(b"\n") + 1 or len(self.buf)
        if size >= 0:
            end = min(end, size)
        line, self.buf = self.buf[:end], self.buf[end:]
        return line


def read_line(stream: LineReader, limit: int = MAX_MESSAGE_BYTES) -> bytes:
    """Read one message line from a binary stream, never more than ``limit`` bytes; ``b""`` at end.

    A longer line is a :class:`~slurm_gpuarb.errors.ProtocolError`; the stream is then mid-line,
    so close the connection.
    """
    line = stream.readline(limit + 1)
    if len(line) > limit:
        raise ProtocolError(f"message longer than {limit} bytes (MAX_MESSAGE_BYTES); send one JSON object per line")
    return line


# --------------------------------------------------------------------------- responses


def decode_response(line: bytes | bytearray | str, *, op: str | None = None) -> dict[str, Any]:
    """Validate a response's envelope and return it; an error response raises its exception.

    ``ok: false`` raises the :mod:`slurm_gpuarb.errors` class its ``kind`` names (``PermissionError``:
    :class:`~slurm_gpuarb.errors.PermissionDeniedError`; an unknown kind: :class:`GpuArbError`
    prefixed with the kind). With ``op``, a success response for another op is a
    :class:`~slurm_gpuarb.errors.ProtocolError`, and so is anything that is not a v1 response.
    Payload fields are not checked: unknown ones are ignored (a v1 daemon may add some).
    """
    obj = _load(line, MAX_RESPONSE_BYTES, "response")
    if not isinstance(obj, dict):
        raise ProtocolError(f"a response must be a JSON object, not {_json_type(obj)}")
    _check_version(obj, "response")
    status = obj.get("ok")
    if status is True:
        got = obj.get("op")
        if not isinstance(got, str) or got not in REQUEST_OPS:
            _bad_field("response", "op", "one of " + ", ".join(REQUEST_OPS), got)
        if op is not None and got != op:
            raise ProtocolError(f"asked gpuarbd for '{op}' but it answered '{got}'")
        return obj
    if status is not False:
        _bad_field("response", "ok", "true or false", status)
    err = obj.get("error")
    if not isinstance(err, dict):
        _bad_field("error response", "error", 'an object {"kind": ..., "message": ...}', err)
    kind, message = err.get("kind"), err.get("message")
    if not isinstance(kind, str) or not kind:
        _bad_field("error response", "error.kind", "a non-empty string", kind)
    if not isinstance(message, str):
        _bad_field("error response", "error.message", "a string", message)
    cls = _CLASS_BY_KIND.get(kind)
    if cls is None:
        raise GpuArbError(f"{kind}: {message}")
    raise cls(message)


def error(exc: BaseException) -> dict[str, Any]:
    """An error response for ``exc``; never carries a traceback.

    A :class:`GpuArbError` keeps its message, under the name of its nearest class in ``errors.py``
    (a subclass defined elsewhere travels as its errors.py parent).
    :class:`~slurm_gpuarb.errors.PermissionDeniedError`, and a builtin :class:`PermissionError`
    raised on purpose (no ``errno``), travel as ``PermissionError``. Anything else is an
    ``InternalError`` with a generic message: the daemon logs the details, the client must not see them.
    """
    kind = _kind_of(exc)
    if kind is None:
        kind, message = "InternalError", INTERNAL_ERROR_MESSAGE
    else:
        message = _public_message(exc)
    return {"v": PROTOCOL_VERSION, "ok": False, "error": {"kind": kind, "message": message}}


# --------------------------------------------------------------------------- error kinds

_KIND_BY_CLASS: Final[Mapping[type, str]] = {
    **{obj: name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, GpuArbError)},
    # The builtin's name, not ours: a client may catch it as PermissionError without knowing gpuarb.
    PermissionDeniedError: "PermissionError",
}
_CLASS_BY_KIND: Final[Mapping[str, type[GpuArbError]]] = {kind: cls for cls, kind in _KIND_BY_CLASS.items()}


def _kind_of(exc: BaseException) -> str | None:
    if isinstance(exc, GpuArbError):
        for cls in type(exc).__mro__:
            kind = _KIND_BY_CLASS.get(cls)
            if kind is not None:
                return kind
    # An errno means the OS refused a file or socket operation inside the daemon: internal detail.
    if isinstance(exc, PermissionError) and exc.errno is None:
        return "PermissionError"
    return None


def _public_message(exc: BaseException) -> str:
    """``str(exc)`` as GpuArbError builds it, but with only the first line of the cause.

    A driver's exception (SQLAlchemy's, psycopg's) carries the SQL and its parameters on later
    lines; those stay in the daemon's log.
    """
    try:
        msg = BaseException.__str__(exc)
        cause = exc.__cause__
        if cause is not None:
            lines = (str(cause) or type(cause).__name__).splitlines()
            detail = lines[0] if lines else type(cause).__name__
            if detail not in msg:
                msg = f"{msg}: {detail}"
    except Exception:  # a broken __str__ must not turn an error answer into no answer
        msg = type(exc).__name__
    msg = msg or type(exc).__name__
    return msg if len(msg) <= MAX_ERROR_CHARS else msg[: MAX_ERROR_CHARS - 1] + "…"


# --------------------------------------------------------------------------- decoding helpers
# protocol.py's request parser shares these, so both ends name a bad field the same way.


def _load(data: bytes | bytearray | str, limit: int, what: str) -> Any:
    """Size-check, UTF-8-decode and JSON-parse one message (duplicate keys and NaN refused)."""
    if isinstance(data, str):
        text = data
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError as e:
            raise ProtocolError(f"the {what} is not valid UTF-8") from e
    elif isinstance(data, bytes | bytearray):
        size = len(data)
        if size > limit:  # before decoding: never spend work on an oversized line
            raise ProtocolError(f"the {what} is {size} bytes, over the {limit}-byte limit")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProtocolError(f"the {what} is not valid UTF-8") from e
    else:
        raise ProtocolError(f"a {what} must be bytes or text holding one JSON object, not {type(data).__name__}")
    if size > limit:
        raise ProtocolError(f"the {what} is {size} bytes, over the {limit}-byte limit")
    if not text.strip():
        raise ProtocolError(f"empty {what}; expected one JSON object per line")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except ProtocolError:
        raise
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is an over-long integer
        raise ProtocolError(f"the {what} is not valid JSON") from e


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys; two readers could then disagree on what was asked.
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ProtocolError(f"duplicate field {_quote(key)} in a JSON object; give each field once")
            seen.add(key)
    return out


def _no_constant(name: str) -> NoReturn:
    raise ProtocolError(f"{name} is not valid JSON; numbers must be finite")


def _check_version(obj: Mapping[str, Any], what: str) -> None:
    v = obj.get("v", _MISSING)
    if v is _MISSING:
        raise ProtocolError(f'the {what} has no "v" field; every message carries "v": {PROTOCOL_VERSION}')
    if v != PROTOCOL_VERSION or isinstance(v, bool) or not isinstance(v, int):
        shown = json.dumps(v) if isinstance(v, int | str | bool) or v is None else _json_type(v)
        raise ProtocolError(
            f"this gpuarb speaks protocol v{PROTOCOL_VERSION}, but the {what} has v={shown}; "
            "run the same slurm-gpuarb version on both ends"
        )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    from collections.abc import Mapping  # only on the error path, for a request given as another Mapping

    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _describe(value: Any) -> str:
    if isinstance(value, str | int | float) or value is None:
        text = json.dumps(value)
        if len(text) > 60:
            text = text[:57] + "..."
        return f"{_json_type(value)} {text}" if value is not None else "null"
    return _json_type(value)


def _quote(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else _describe(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad_field(where: str, name: str, expected: str, value: Any) -> NoReturn:
    raise ProtocolError(f"{where}: field '{name}' must be {expected}, got {_describe(value)}")
