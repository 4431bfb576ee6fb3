"""Key=value log lines for the hooks and ``gpuarbd``: to syslog when ``/dev/log`` exists, else to a file.

One line per event, in the pyxis / ``logger -t`` style the house style asks for::

    gpuarb[4711]: prolog: job=12 node=n1 lease=L7f3 granted 6144MiB gpu=0

``log("prolog", "granted 6144MiB", job="12", node="n1")`` writes ``prolog: granted 6144MiB job=12 node=n1``
(the free-text message first, then the fields in the order given). Values that are not plain tokens are
double-quoted with backslash escapes, and every control or non-printable character is escaped, so a
user-controlled value (a job's ``--comment``) can neither break a line in two nor forge ``key=value``
pairs: ``comment="x\\nnode=n9 granted"`` stays one field.

Where lines go (:func:`configure`): syslog (facility ``daemon``, ident ``gpuarb``, with the PID) when
``/dev/log`` exists, else appended to the configured file (test machines have no syslog daemon, and
tests assert on that file). A file line starts with an ISO timestamp. Each line is one ``write()`` on an
``O_APPEND`` descriptor, so concurrent hooks never interleave partial lines. Logging never raises: a
hook must not fail because its log is unwritable (the TaskProlog runs as the job's user and usually
cannot write the root-owned file; it then logs nothing).

Hot path: only ``os`` and ``time`` (``syslog``, a builtin module, is loaded on first use); no
``typing`` or ``contextlib`` at run time, which a CPU job's Prolog would pay for nothing.
"""

from __future__ import annotations

import os
import time

# Only for the type checker: importing typing at run time costs a CPU job's Prolog more than it runs.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

__all__ = ["LEVELS", "configure", "error", "format_fields", "format_line", "log", "log_at", "quote", "warning"]

IDENT: Final = "gpuarb"
DEV_LOG: Final = "/dev/log"
MAX_VALUE_CHARS: Final = 512  # a field longer than this is cut (with "…"): one comment must not flood the log
MAX_LINE_CHARS: Final = 4096
LEVELS: Final = ("debug", "info", "notice", "warning", "error")

# Characters a value may carry unquoted. No space, quote, backslash, "=" or control character: those
# are what a reader splits on, so a value holding one is quoted.
_BARE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+-/,%[]()#")
_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class _Sink:
    __slots__ = ("fd", "file", "ident", "syslog")

    def __init__(self) -> None:
        self.file: str | None = None
        self.syslog: bool | None = None  # None: decide on first use (/dev/log present?)
        self.ident = IDENT
        self.fd: int | None = None


_sink = _Sink()


def configure(*, log_file: str | os.PathLike[str] | None = None, syslog: bool | None = None,
              ident: str = IDENT) -> None:
    """Choose where lines go. ``syslog=None`` uses syslog when ``/dev/log`` exists, else ``log_file``;
    ``syslog=False`` always uses the file (``None`` file: nothing is written). Safe to call again."""
    if _sink.fd is not None:
        try:  # noqa: SIM105 - contextlib would be one more import on every hook's path
            os.close(_sink.fd)
        except OSError:
            pass
    _sink.fd = None
    _sink.file = None if log_file is None else os.fspath(log_file)
    _sink.syslog = syslog
    _sink.ident = ident
    if syslog is not False:
        import syslog as _syslog

        _syslog.closelog()


def quote(value: object) -> str:
    """``value`` as one log token: bare when it is made of safe characters, else double-quoted with
    backslash escapes (``\\n``, ``\\"``, ``\\xNN``, ``\\uNNNN`` for anything not printable)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[:MAX_VALUE_CHARS] + "…"
    if text and all(c in _BARE for c in text):
        return text
    return '"' + _escape(text) + '"'


def _escape(text: str) -> str:
    out = []
    for c in text:
        esc = _ESCAPES.get(c)
        if esc is not None:
            out.append(esc)
        elif c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return "".join(out)


def _key(name: str) -> str:
    # Keys come from our own code, but a bad one must still not split a line: keep [A-Za-z0-9_.-].
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "_" for c in name)
    return cleaned or "_"


def format_fields(fields: dict[str, object]) -> str:
    """``k=v`` pairs, space-separated, in order; ``None`` values are left out."""
    return " ".join(f"{_key(k)}={quote(v)}" for k, v in fields.items() if v is not None)


def format_line(event: str, message: str = "", fields: dict[str, object] | None = None) -> str:
    """The line :func:`log` writes, without the timestamp and ident: ``event: message k=v …``.

    The message is our own text but may quote a daemon's reason: control characters are escaped."""
    parts = [_key(event) + ":"]
    if message:
        parts.append(_escape(message))
    if fields:
        kv = format_fields(fields)
        if kv:
            parts.append(kv)
    line = " ".join(parts)
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…"


def log(event: str, message: str = "", /, **fields: object) -> None:
    """Write one line for ``event`` (``prolog``, ``epilog``, ``daemon``, …). Never raises.

    ``message`` must be our own fixed text: anything from outside (a reason, a comment, an error)
    goes into a field, where it is quoted. The field name ``level`` is reserved: ``level="warning"``
    (one of :data:`LEVELS`, default ``info``) sets the line's level instead of being written."""
    level = fields.pop("level", "info")
    log_at(level if isinstance(level, str) and level in LEVELS else "info", event, message, **fields)


def warning(event: str, message: str = "", /, **fields: object) -> None:
    """:func:`log` at level warning."""
    log_at("warning", event, message, **fields)


def error(event: str, message: str = "", /, **fields: object) -> None:
    """:func:`log` at level error."""
    log_at("error", event, message, **fields)


def log_at(level: str, event: str, message: str = "", /, **fields: object) -> None:
    """:func:`log` at ``level`` (one of :data:`LEVELS`)."""
    try:  # noqa: SIM105 - as above
        _write(level, format_line(event, message, fields))
    except Exception:  # logging must never take a hook down with it
        pass


def _write(level: str, line: str) -> None:
    use_syslog = _sink.syslog
    if use_syslog is None:
        use_syslog = os.path.exists(DEV_LOG)
    if use_syslog:
        import syslog

        syslog.openlog(_sink.ident, syslog.LOG_PID, syslog.LOG_DAEMON)
        prio = {"debug": syslog.LOG_DEBUG, "notice": syslog.LOG_NOTICE, "warning": syslog.LOG_WARNING,
                "error": syslog.LOG_ERR}.get(level, syslog.LOG_INFO)
        syslog.syslog(prio, line)
        return
    if _sink.file is None:
        return
    if _sink.fd is None:
        _sink.fd = _open(_sink.file)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    tag = "" if level == "info" else f"{level}: "
    os.write(_sink.fd, f"{stamp} {_sink.ident}[{os.getpid()}]: {tag}{line}\n".encode("utf-8", "backslashreplace"))


def _open(path: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, flags, 0o640)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        return os.open(path, flags, 0o640)
