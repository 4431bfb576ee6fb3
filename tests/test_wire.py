"""The wire layer: framing and its limits, the response envelope, error kinds across the socket, import cost."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slurm_gpuarb import errors, wire
from slurm_gpuarb.errors import GpuArbError, LeaseSpecError, LedgerError, PermissionDeniedError, ProtocolError
from slurm_gpuarb.wire import MAX_MESSAGE_BYTES, MAX_RESPONSE_BYTES, REQUEST_OPS

ROOT = Path(__file__).resolve().parents[1]


def ok(op: str, **payload: Any) -> dict[str, Any]:
    return {"v": 1, "ok": True, "op": op, **payload}


# --------------------------------------------------------------------------- encode / read_line


def test_encode_is_compact_ascii_json_and_one_line() -> None:
    line = wire.encode({"v": 1, "op": "request", "spec": "vram=6GiB\nprio=llm", "node": "n1"})
    assert line == b'{"v":1,"op":"request","spec":"vram=6GiB\\nprio=llm","node":"n1"}\n'
    assert wire.encode(ok("explain", text="é")) == b'{"v":1,"ok":true,"op":"explain","text":"\\u00e9"}\n'


@pytest.mark.parametrize("value", [float("nan"), float("inf"), {1, 2}, b"bytes", object()], ids=repr)
def test_encode_refuses_what_json_cannot_carry(value: Any) -> None:
    with pytest.raises(ProtocolError, match="JSON cannot carry") as info:
        wire.encode(ok("ping", version=value))
    assert info.value.__cause__ is not None


def test_encode_enforces_the_limit_its_reader_enforces() -> None:
    body = {"v": 1, "op": "request", "spec": ""}
    room = MAX_MESSAGE_BYTES - len(wire.encode(body))
    assert len(wire.encode({**body, "spec": "x" * room})) == MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError, match=f"over the {MAX_MESSAGE_BYTES}-byte limit"):
        wire.encode({**body, "spec": "x" * (room + 1)})
    # A response (an object with "ok") may be bigger: explain carries decision inputs.
    big = wire.encode(ok("explain", text="x" * (4 * MAX_MESSAGE_BYTES)))
    assert wire.decode_response(big)["text"] == "x" * (4 * MAX_MESSAGE_BYTES)
    with pytest.raises(ProtocolError, match=f"over the {MAX_RESPONSE_BYTES}-byte limit"):
        wire.encode(ok("explain", text="x" * MAX_RESPONSE_BYTES))


def test_read_line_is_bounded() -> None:
    ping = wire.encode({"v": 1, "op": "ping"})
    exact = b'{"v":1,"op":"ping"' + b" " * (MAX_MESSAGE_BYTES - len(ping)) + b"}\n"
    stream = io.BytesIO(ping + exact + b"x" * (MAX_MESSAGE_BYTES + 10) + b"\n")
    assert wire.read_line(stream) == ping
    assert wire.read_line(stream) == exact and len(exact) == MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError, match="longer than 65536 bytes"):
        wire.read_line(stream)
    assert wire.read_line(io.BytesIO(b"")) == b""
    assert wire.read_line(io.BytesIO(b'{"v":1,"op":"ping"}'), limit=20) == b'{"v":1,"op":"ping"}'


# --------------------------------------------------------------------------- decode_response


@pytest.mark.parametrize("op", REQUEST_OPS)
def test_success_responses_round_trip(op: str) -> None:
    response = ok(op, node="n1", gpus=[{"index": 0, "free_mib": 6144}], released=["L1"], text=None, ratio=0.5)
    line = wire.encode(response)
    assert wire.decode_response(line, op=op) == response
    assert wire.decode_response(line.decode("ascii")) == response
    assert wire.decode_response(bytearray(line)) == response


def test_unknown_payload_fields_are_kept_for_the_caller() -> None:
    assert wire.decode_response(b'{"v":1,"ok":true,"op":"ping","added_in_v1_1":[1]}\n')["added_in_v1_1"] == [1]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"ok":true,"op":"ping"}', 'the response has no "v" field'),
        (b'{"v":2,"ok":true,"op":"ping"}', "this gpuarb speaks protocol v1, but the response has v=2"),
        (b'{"v":true,"ok":true,"op":"ping"}', "but the response has v=true"),
        (b'{"v":1,"op":"ping"}', "field 'ok' must be true or false, got null"),
        (b'{"v":1,"ok":"yes","op":"ping"}', "field 'ok' must be true or false"),
        (b'{"v":1,"ok":true,"op":"pong"}', "field 'op' must be one of request"),
        (b'{"v":1,"ok":true,"op":"status","gpus":[]}', "asked gpuarbd for 'ping' but it answered 'status'"),
        (b'{"v":1,"ok":false}', "field 'error' must be an object"),
        (b'{"v":1,"ok":false,"error":{"message":"m"}}', "field 'error.kind' must be a non-empty string"),
        (b'{"v":1,"ok":false,"error":{"kind":"LedgerError"}}', "field 'error.message' must be a string"),
        (b'{"v":1,"ok":true,"op":"ping","op":"status"}', "duplicate field 'op'"),
        (b'{"v":1,"ok":true,"op":"ping","x":NaN}', "NaN is not valid JSON"),
        (b'{"v":1,"ok":true,', "not valid JSON"),
        (b"[]", "a response must be a JSON object"),
        (b"\xff\n", "not valid UTF-8"),
        (b"  \n", "empty response"),
    ],
)
def test_malformed_responses(raw: bytes, expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        wire.decode_response(raw, op="ping")
    assert expected in str(info.value)


def test_an_oversized_response_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(ProtocolError, match=f"over the {MAX_RESPONSE_BYTES}-byte limit") as info:
        wire.decode_response(b"{" * (MAX_RESPONSE_BYTES + 1))  # would be a RecursionError if parsed
    assert info.value.__cause__ is None


@given(st.binary(max_size=200))
def test_arbitrary_responses_only_raise_gpuarb_errors(raw: bytes) -> None:
    with contextlib.suppress(GpuArbError):
        wire.decode_response(raw)


# --------------------------------------------------------------------------- error kinds


def _error_classes() -> list[type[GpuArbError]]:
    return [c for c in vars(errors).values() if isinstance(c, type) and issubclass(c, GpuArbError)]


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_error_class_crosses_the_wire(cls: type[GpuArbError]) -> None:
    response = wire.error(cls("what went wrong; how to fix it"))
    kind = "PermissionError" if cls is PermissionDeniedError else cls.__name__
    assert response == {"v": 1, "ok": False, "error": {"kind": kind, "message": "what went wrong; how to fix it"}}
    with pytest.raises(cls) as info:
        wire.decode_response(wire.encode(response))
    assert type(info.value) is cls
    assert str(info.value) == "what went wrong; how to fix it"


def test_a_subclass_from_elsewhere_travels_as_its_errors_parent() -> None:
    class SpecTooLong(LeaseSpecError):
        pass

    assert wire.error(SpecTooLong("spec is 5000 characters"))["error"]["kind"] == "LeaseSpecError"


def test_other_exceptions_become_a_generic_internal_error() -> None:
    for exc in (ValueError("password=hunter2"), KeyError("secret"), KeyboardInterrupt()):
        response = wire.error(exc)
        assert response["error"] == {"kind": "InternalError", "message": wire.INTERNAL_ERROR_MESSAGE}
    with pytest.raises(GpuArbError, match=r"^InternalError: internal error in gpuarbd") as info:
        wire.decode_response(wire.encode(wire.error(ValueError("x"))))
    assert type(info.value) is GpuArbError


def test_permission_errors() -> None:
    denied = wire.error(PermissionDeniedError("uid 1000 may not create leases; only root or SlurmUser may"))
    assert denied["error"]["kind"] == "PermissionError"
    deliberate = wire.error(PermissionError("uid 1000 may only release its own leases"))
    assert deliberate["error"] == {"kind": "PermissionError", "message": "uid 1000 may only release its own leases"}
    # An errno means the OS refused the daemon itself: the path is an internal detail.
    from_os = wire.error(PermissionError(13, "Permission denied", "/var/lib/gpuarb/ledger.db"))
    assert from_os["error"]["kind"] == "InternalError"
    with pytest.raises(PermissionDeniedError) as info:
        wire.decode_response(wire.encode(deliberate))
    assert isinstance(info.value, GpuArbError) and isinstance(info.value, PermissionError)


def test_error_message_keeps_only_the_first_line_of_the_cause() -> None:
    first = "(sqlite3.OperationalError) database is locked"
    cause = Exception(f"{first}\n[SQL: INSERT INTO leases]\n[parameters: ('s3cret',)]")
    try:
        raise LedgerError("could not record lease L-1; retry or check the ledger") from cause
    except LedgerError as e:
        response = wire.error(e)
    message = response["error"]["message"]
    assert message == f"could not record lease L-1; retry or check the ledger: {first}"
    assert "s3cret" not in json.dumps(response)


def test_error_message_is_capped() -> None:
    message = wire.error(LedgerError("x" * 10_000))["error"]["message"]
    assert len(message) == wire.MAX_ERROR_CHARS and message.endswith("…")


def test_unknown_error_kind_becomes_gpuarb_error() -> None:
    with pytest.raises(GpuArbError, match=r"^QuotaError: over quota$") as info:
        wire.decode_response(b'{"v":1,"ok":false,"error":{"kind":"QuotaError","message":"over quota"}}\n')
    assert type(info.value) is GpuArbError


# --------------------------------------------------------------------------- import cost
# Every GPU job's Prolog and Epilog import the client in a fresh interpreter. ``json`` itself imports
# ``re`` (and ``re`` imports ``enum``), and ``socket`` imports ``enum``: those come with the standard
# library the client needs. What these tests pin is that wire and the client add nothing on top of
# it: no ``protocol``, no ``model``, no ``dataclasses``, no ``typing``.

_NEW_MODULES = (
    "import sys; import {stdlib}; before = set(sys.modules); import {module}; "
    "print(*sorted(set(sys.modules) - before)); print(*sorted(sys.modules))"
)
_NEVER = {"slurm_gpuarb.protocol", "slurm_gpuarb.model", "dataclasses", "typing", "inspect"}


def _imports(stdlib: str, module: str) -> tuple[set[str], set[str]]:
    code = _NEW_MODULES.format(stdlib=stdlib, module=module)
    # -S: no site-packages, so an editable install's path finder (which imports __future__, pathlib,
    # … at start-up) cannot hide or add modules: what is measured is the module's own imports.
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {code}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    new, everything = proc.stdout.splitlines()
    return set(new.split()), set(everything.split())


def test_importing_wire_adds_only_its_own_modules_to_json() -> None:
    new, everything = _imports("json", "slurm_gpuarb.wire")
    assert new == {"__future__", "slurm_gpuarb", "slurm_gpuarb.errors", "slurm_gpuarb.wire"}
    assert not everything & _NEVER


def test_importing_the_client_adds_only_its_own_modules_to_json_and_socket() -> None:
    new, everything = _imports("json, socket, time", "slurm_gpuarb.client")
    assert new == {"__future__", "slurm_gpuarb", "slurm_gpuarb.errors", "slurm_gpuarb.wire", "slurm_gpuarb.client"}
    assert not everything & _NEVER
