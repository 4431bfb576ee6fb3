"""The lease protocol: versioned request/response messages shared by the CLI, ``gpuarbd`` and clients.

On the wire a message is one compact UTF-8 JSON object followed by ``\\n``, and every message
carries ``"v": 1``. ``protocol.schema.json`` beside this module describes each message; a test keeps
it in sync with the rules below.

Requests (client → daemon) are validated strictly by :func:`parse_request`: an unknown op or field,
a wrong type, a missing field or another version is a :class:`~slurm_gpuarb.errors.ProtocolError`
that names the field and what was expected. ``null`` for an optional field means "not given".
Responses (daemon → client) are read tolerantly: unknown payload fields are ignored, so a v1 daemon
may add a field without breaking older clients; anything incompatible bumps :data:`PROTOCOL_VERSION`.

The framing, the limits, the response envelope and the error kinds live in :mod:`slurm_gpuarb.wire`
(re-exported here): the Slurm hooks' client imports only that, because this module's dataclasses
(and ``model``'s) cost a hook more than the rest of its run. This module is stdlib-only (plus ``model``,
``errors`` and ``wire``) for the daemon and the CLI.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, Final, TypeAlias

from slurm_gpuarb import model, wire
from slurm_gpuarb.errors import PermissionDeniedError as PermissionDeniedError  # re-export: it used to live here
from slurm_gpuarb.errors import ProtocolError

# The wire layer, re-exported ("X as X"), so that protocol stays the one module the daemon and CLI
# import; its private helpers, so that the request parser names a bad field as the response decoder does.
from slurm_gpuarb.wire import _MISSING, _bad_field, _check_version, _describe, _json_type, _load, _quote
from slurm_gpuarb.wire import INTERNAL_ERROR_MESSAGE as INTERNAL_ERROR_MESSAGE
from slurm_gpuarb.wire import MAX_ERROR_CHARS as MAX_ERROR_CHARS
from slurm_gpuarb.wire import MAX_MESSAGE_BYTES as MAX_MESSAGE_BYTES
from slurm_gpuarb.wire import MAX_RESPONSE_BYTES as MAX_RESPONSE_BYTES
from slurm_gpuarb.wire import PROTOCOL_VERSION as PROTOCOL_VERSION
from slurm_gpuarb.wire import REQUEST_OPS as REQUEST_OPS
from slurm_gpuarb.wire import decode_response as decode_response
from slurm_gpuarb.wire import error as error
from slurm_gpuarb.wire import read_line as read_line

MAX_TOKEN_CHARS: Final = 128
MAX_SPEC_CHARS: Final = 4096
MAX_REASON_CHARS: Final = 1024
MAX_COMMENT_CHARS: Final = 16 * 1024  # SLURM_JOB_COMMENT as the Prolog saw it; the hook cuts a longer one
MAX_GRES_CHARS: Final = 4096  # SLURM_JOB_GPUS: a comma list of GRES indices
MAX_INT: Final = 2**31 - 1  # fits every ledger integer column, on PostgreSQL too
# Ids and node names end up in syslog key=value lines: no spaces, quotes or control characters.
TOKEN_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@+-"
PLANES: Final = ("host", "submit", "prolog", "epilog", "agent", "cli", "health")
_ENV_NAME_RE: Final = re.compile(r"[A-Z_][A-Z0-9_]{0,127}", re.ASCII)


# --------------------------------------------------------------------------- field rules


@dataclass(frozen=True)
class FieldRule:
    """What one request field accepts; ``parse_request`` and the schema test both read these."""

    json_type: str  # "string" | "integer"
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None
    min_length: int = 0
    max_length: int | None = None
    token: bool = False  # only TOKEN_CHARS
    choices: tuple[str, ...] = ()
    hint: str = ""

    def expected(self) -> str:
        """The accepted values, in words, for error messages."""
        if self.choices:
            text = "one of " + ", ".join(self.choices)
        elif self.json_type == "integer":
            text = "an integer"
            if self.minimum is not None:
                text += f" >= {self.minimum}"
            if self.maximum is not None:
                text += f" and <= {self.maximum}" if self.minimum is not None else f" <= {self.maximum}"
        else:
            text = "a non-empty string" if self.min_length else "a string"
            if self.max_length is not None:
                text += f" of at most {self.max_length} characters"
            if self.token:
                text += " from [A-Za-z0-9._:@+-]"
        return f"{text} ({self.hint})" if self.hint else text

    def check(self, where: str, name: str, value: Any) -> Any:
        """``value`` if it is acceptable, else raise :class:`ProtocolError` naming the field."""
        if self.json_type == "integer":
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and (self.minimum is None or value >= self.minimum)
                and (self.maximum is None or value <= self.maximum)
            ):
                return value
        elif isinstance(value, str):
            if self.choices:
                if value in self.choices:
                    return value
            elif (
                len(value) >= self.min_length
                and (self.max_length is None or len(value) <= self.max_length)
                # strip() with a character set removes every allowed character from both ends:
                # anything left over is a character outside the set.
                and not (self.token and value.strip(TOKEN_CHARS))
            ):
                return value
        _bad_field(where, name, self.expected(), value)


_NODE = FieldRule("string", min_length=1, max_length=MAX_TOKEN_CHARS, token=True, hint="a Slurm node name")
_JOB_ID = FieldRule("string", min_length=1, max_length=MAX_TOKEN_CHARS, token=True, hint='a Slurm job id such as "123"')
_LEASE_ID = FieldRule("string", min_length=1, max_length=MAX_TOKEN_CHARS, token=True, hint="as a grant returned it")
_RESTART = FieldRule("integer", minimum=0, maximum=MAX_INT, hint="SLURM_JOB_RESTART_COUNT")
_TTL = FieldRule("integer", minimum=1, maximum=MAX_INT, hint="seconds")

REQUEST_FIELDS: Final[Mapping[str, Mapping[str, FieldRule]]] = {
    "request": {
        "spec": FieldRule(
            "string",
            required=True,
            min_length=1,
            max_length=MAX_SPEC_CHARS,
            hint="a lease spec such as 'vram=6GiB prio=batch'",
        ),
        "node": _NODE,
        "gpu": FieldRule("integer", minimum=0, maximum=MAX_INT, hint="the GPU index to pin the lease to"),
        "job_id": _JOB_ID,
        "restart_count": _RESTART,
        "pid": FieldRule("integer", minimum=1, maximum=MAX_INT, hint="the process that will use the lease"),
        "ttl_s": _TTL,
        "plane": FieldRule("string", choices=PLANES),
    },
    "renew": {"lease_id": replace(_LEASE_ID, required=True), "ttl_s": _TTL},
    "release": {
        "lease_id": _LEASE_ID,
        "job_id": _JOB_ID,
        "restart_count": _RESTART,
        "node": _NODE,
        "reason": FieldRule("string", max_length=MAX_REASON_CHARS),
    },
    "status": {"node": _NODE},
    "explain": {"job_id": _JOB_ID, "lease_id": _LEASE_ID},
    "ping": {},
    "job_start": {
        "job_id": replace(_JOB_ID, required=True),
        "restart_count": replace(_RESTART, required=True),
        "node": replace(_NODE, required=True),
        "comment": FieldRule("string", max_length=MAX_COMMENT_CHARS, hint="SLURM_JOB_COMMENT, raw"),
        "gres": FieldRule("string", max_length=MAX_GRES_CHARS, hint="SLURM_JOB_GPUS, raw: GRES indices such as 0,2"),
        "uid": FieldRule("integer", required=True, minimum=0, maximum=MAX_INT, hint="SLURM_JOB_UID"),
        "user": FieldRule("string", min_length=1, max_length=MAX_TOKEN_CHARS, token=True, hint="SLURM_JOB_USER"),
        "partition": FieldRule(
            "string", min_length=1, max_length=MAX_TOKEN_CHARS, token=True, hint="SLURM_JOB_PARTITION"
        ),
    },
    "job_end": {
        "job_id": replace(_JOB_ID, required=True),
        "restart_count": replace(_RESTART, required=True),
        "node": replace(_NODE, required=True),
        "exit_code": FieldRule("integer", minimum=-MAX_INT - 1, maximum=MAX_INT, hint="SLURM_JOB_EXIT_CODE"),
    },
    "health": {"node": replace(_NODE, required=True)},
}


# --------------------------------------------------------------------------- request messages


class _Message:
    """Shared behaviour of the request dataclasses (``op`` names the wire op)."""

    __slots__ = ()
    op: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        """The wire form: ``v``, ``op`` and every field that is not ``None``."""
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": self.op}
        for name in REQUEST_FIELDS[self.op]:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class LeaseRequestMsg(_Message):
    """Ask for a lease (op ``request``). ``node`` defaults to the daemon's own node."""

    op: ClassVar[str] = "request"
    spec: str
    node: str | None = None
    gpu: int | None = None
    job_id: str | None = None
    restart_count: int = 0
    pid: int | None = None
    ttl_s: int | None = None
    plane: str | None = None


@dataclass(frozen=True)
class RenewMsg(_Message):
    """Extend a lease's TTL (op ``renew``); without ``ttl_s`` the lease's own TTL starts again."""

    op: ClassVar[str] = "renew"
    lease_id: str
    ttl_s: int | None = None


@dataclass(frozen=True)
class ReleaseMsg(_Message):
    """Release a lease by id, or by its Slurm key (job_id, restart_count, node). Idempotent."""

    op: ClassVar[str] = "release"
    lease_id: str | None = None
    job_id: str | None = None
    restart_count: int | None = None
    node: str | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        by_key = (self.job_id, self.restart_count, self.node)
        if self.lease_id is not None:
            if any(v is not None for v in by_key):
                raise ProtocolError(
                    "a 'release' message names a lease by lease_id or by job_id + restart_count + node, not both"
                )
        elif any(v is None for v in by_key):
            # The restart count is part of the key so that a late Epilog of a requeued job's first
            # run cannot release the second run's lease.
            missing = ", ".join(
                n for n, v in zip(("job_id", "restart_count", "node"), by_key, strict=True) if v is None
            )
            raise ProtocolError(
                f"a 'release' message needs lease_id, or job_id + restart_count + node (missing: {missing})"
            )


@dataclass(frozen=True)
class StatusMsg(_Message):
    """Capacity of every GPU the daemon knows (op ``status``), or of one node's GPUs."""

    op: ClassVar[str] = "status"
    node: str | None = None


@dataclass(frozen=True)
class ExplainMsg(_Message):
    """Why a job or lease got what it got (op ``explain``): exactly one of ``job_id``, ``lease_id``."""

    op: ClassVar[str] = "explain"
    job_id: str | None = None
    lease_id: str | None = None

    def __post_init__(self) -> None:
        if (self.job_id is None) == (self.lease_id is None):
            raise ProtocolError("an 'explain' message needs exactly one of job_id or lease_id")


@dataclass(frozen=True)
class PingMsg(_Message):
    """Liveness check (op ``ping``)."""

    op: ClassVar[str] = "ping"


@dataclass(frozen=True)
class JobStartMsg(_Message):
    """The Prolog's record of a Slurm job starting on a node (op ``job_start``).

    ``comment`` and ``gres`` are passed through raw (SLURM_JOB_COMMENT, SLURM_JOB_GPUS; absent or
    empty when the job has none): the daemon parses them, so a malformed spec is answered, never
    a protocol error. The answer carries a ``grant`` for the TaskProlog (see the schema).
    """

    op: ClassVar[str] = "job_start"
    job_id: str
    restart_count: int
    node: str
    uid: int
    comment: str | None = None
    gres: str | None = None
    user: str | None = None
    partition: str | None = None


@dataclass(frozen=True)
class JobEndMsg(_Message):
    """The Epilog's idempotent release of a job's lease on a node (op ``job_end``)."""

    op: ClassVar[str] = "job_end"
    job_id: str
    restart_count: int
    node: str
    exit_code: int | None = None


@dataclass(frozen=True)
class HealthMsg(_Message):
    """The HealthCheckProgram's question (op ``health``): who holds VRAM on this node outside any
    lease or standing reservation."""

    op: ClassVar[str] = "health"
    node: str


Message: TypeAlias = (
    LeaseRequestMsg | RenewMsg | ReleaseMsg | StatusMsg | ExplainMsg | PingMsg | JobStartMsg | JobEndMsg | HealthMsg
)

REQUEST_TYPES: Final[Mapping[str, type[Message]]] = {
    cls.op: cls
    for cls in (
        LeaseRequestMsg, RenewMsg, ReleaseMsg, StatusMsg, ExplainMsg, PingMsg, JobStartMsg, JobEndMsg, HealthMsg
    )
}


def parse_request(data: bytes | bytearray | str | Mapping[str, Any]) -> Message:
    """Validate one request (a wire line, its text, or an already decoded object) into its dataclass.

    Raises :class:`ProtocolError` naming the offending field and what was expected: oversized or
    non-UTF-8 input, invalid JSON, a non-object, a missing or other ``v``, an unknown ``op``,
    unknown or missing fields, wrong types or out-of-range values.
    """
    obj = data if isinstance(data, Mapping) else _load(data, MAX_MESSAGE_BYTES, "request")
    if not isinstance(obj, Mapping):
        raise ProtocolError(f"a request must be a JSON object, not {_json_type(obj)}")
    _check_version(obj, "request")
    op = obj.get("op")
    if op is None:
        raise ProtocolError(f"the request has no 'op' field; expected one of {', '.join(REQUEST_OPS)}")
    if not isinstance(op, str) or op not in REQUEST_TYPES:
        if not isinstance(op, str):
            _bad_field("request", "op", "one of " + ", ".join(REQUEST_OPS), op)
        raise ProtocolError(
            f"unknown op {_quote(op)}; expected one of {', '.join(REQUEST_OPS)}{_suggest(op, REQUEST_OPS)}"
        )
    rules = REQUEST_FIELDS[op]
    where = f"'{op}' message"
    kwargs: dict[str, Any] = {}
    for name, value in obj.items():
        if name in ("v", "op"):
            continue
        rule = rules.get(name)
        if rule is None:
            allowed = ", ".join(rules) or "none besides v and op"
            raise ProtocolError(
                f"unknown field {_quote(name)} in the {where}; allowed: {allowed}{_suggest(name, tuple(rules))}"
            )
        if value is None and not rule.required:
            continue
        kwargs[name] = rule.check(where, name, value)
    for name, rule in rules.items():
        if rule.required and name not in kwargs:
            raise ProtocolError(f"the {where} needs field '{name}': {rule.expected()}")
    return REQUEST_TYPES[op](**kwargs)


# --------------------------------------------------------------------------- responses


def ok(op: str, /, **payload: Any) -> dict[str, Any]:
    """A success response for ``op`` carrying ``payload`` (see protocol.schema.json for each op's fields)."""
    if op not in REQUEST_TYPES:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(REQUEST_OPS)}")
    for reserved in ("v", "ok", "error"):
        if reserved in payload:
            raise ValueError(f"payload field {reserved!r} is reserved for the response envelope")
    return {"v": PROTOCOL_VERSION, "ok": True, "op": op, **payload}


def encode(msg: Mapping[str, Any] | Message) -> bytes:
    """One wire line: compact ASCII JSON and ``\\n``; :func:`wire.encode` that also takes a request dataclass.

    Raises :class:`ProtocolError` when the message holds something JSON cannot carry, or is longer
    than the limit its reader enforces (:data:`MAX_RESPONSE_BYTES` for responses, i.e. objects
    with ``ok``; :data:`MAX_MESSAGE_BYTES` otherwise).
    """
    return wire.encode(msg.to_json() if isinstance(msg, _Message) else msg)


# --------------------------------------------------------------------------- payload objects


def lease_to_json(lease: model.Lease) -> dict[str, Any]:
    """Every field of a :class:`model.Lease` (``gpus`` as a list, ``state`` as its string)."""
    return _plain(lease)


def lease_from_json(d: Any) -> model.Lease:
    """A :class:`model.Lease` from :func:`lease_to_json`'s form; unknown fields are ignored.

    Fields with a default in ``model.Lease`` may be absent. Raises :class:`ProtocolError`.
    """
    r = _Reader(d, "lease")
    state = r.text("state")
    try:
        lease_state = model.LeaseState(state)
    except ValueError as e:
        raise ProtocolError(
            f"lease: field 'state' must be one of {', '.join(s.value for s in model.LeaseState)}, got {state!r}"
        ) from e
    return model.Lease(
        id=r.text("id"),
        node=r.text("node"),
        gpus=r.integers("gpus"),
        vram_mib=r.integer("vram_mib"),
        prio=r.text("prio"),
        priority=r.integer("priority"),
        preemptible=r.boolean("preemptible"),
        state=lease_state,
        created_at=r.number("created_at"),
        spec=r.text("spec", ""),
        min_mib=r.opt_integer("min_mib"),
        mig_uuid=r.opt_text("mig_uuid"),
        job_id=r.opt_text("job_id"),
        restart_count=r.integer("restart_count", 0),
        owner_uid=r.opt_integer("owner_uid"),
        pid=r.opt_integer("pid"),
        expires_at=r.opt_number("expires_at"),
        ended_at=r.opt_number("ended_at"),
        end_reason=r.opt_text("end_reason"),
        holds=r.opt_text("holds"),
    )


def decision_to_json(decision: model.Decision, lease: model.Lease | None) -> dict[str, Any]:
    """The ``request`` op's payload: the decision and the lease it created (or ``None``).

    ``decision.inputs`` stays in the ledger (``explain`` returns it); it is too big for every answer.
    Use as ``ok("request", **decision_to_json(decision, lease))``.
    """
    return {
        "outcome": decision.outcome.value,
        "reason": decision.reason,
        "node": decision.node,
        "gpus": list(decision.gpus),
        "granted_mib": decision.granted_mib,
        "requested_mib": decision.requested_mib,
        "prio": decision.prio,
        "mig_uuid": decision.mig_uuid,
        "revoke": list(decision.revoke),
        "decision_id": decision.decision_id,
        "lease": None if lease is None else lease_to_json(lease),
    }


def decision_from_json(d: Any) -> tuple[model.Decision, model.Lease | None]:
    """The decision and lease from a ``request`` response (or :func:`decision_to_json`'s dict).

    The envelope fields and unknown fields are ignored; ``inputs`` is empty. Raises :class:`ProtocolError`.
    """
    r = _Reader(d, "decision")
    outcome = r.text("outcome")
    try:
        decision_outcome = model.Outcome(outcome)
    except ValueError as e:
        raise ProtocolError(
            f"decision: field 'outcome' must be one of {', '.join(o.value for o in model.Outcome)}, got {outcome!r}"
        ) from e
    decision = model.Decision(
        outcome=decision_outcome,
        node=r.text("node"),
        reason=r.text("reason"),
        prio=r.text("prio"),
        requested_mib=r.opt_integer("requested_mib"),
        granted_mib=r.integer("granted_mib", 0),
        gpus=r.integers("gpus", ()),
        mig_uuid=r.opt_text("mig_uuid"),
        revoke=r.texts("revoke", ()),
        decision_id=r.opt_integer("decision_id"),
    )
    raw_lease = r.get("lease", None)
    return decision, None if raw_lease is None else lease_from_json(raw_lease)


def tenant_to_json(tenant: model.Tenant) -> dict[str, Any]:
    """One tenant of a GPU for the ``status`` payload, ``held_mib`` included."""
    return {**_plain(tenant), "held_mib": tenant.held_mib}


def gpu_state_to_json(state: model.GpuState) -> dict[str, Any]:
    """One GPU for the ``status`` payload (``ok("status", gpus=[...])``), derived sizes included."""
    return {
        "node": state.node,
        "index": state.gpu.index,
        "uuid": state.gpu.uuid,
        "name": state.gpu.name,
        "total_mib": state.gpu.total_mib,
        "reserved_mib": state.gpu.reserved_mib,
        "margin_mib": state.margin_mib,
        "usable_mib": state.usable_mib,
        "held_mib": state.held_mib,
        "free_mib": state.free_mib,
        "tenants": [tenant_to_json(t) for t in state.tenants],
    }


def record_to_json(record: model.DecisionRecord) -> dict[str, Any]:
    """One decision-log row for the ``explain`` payload (``ok("explain", text=..., records=[...])``)."""
    return _plain(record)


def record_from_json(d: Any) -> model.DecisionRecord:
    """A :class:`model.DecisionRecord` from :func:`record_to_json`'s form. Raises :class:`ProtocolError`."""
    r = _Reader(d, "record")
    inputs = r.get("inputs", {})
    if not isinstance(inputs, dict):
        _bad_field("record", "inputs", "an object", inputs)
    return model.DecisionRecord(
        id=r.integer("id"),
        ts=r.number("ts"),
        plane=r.text("plane"),
        action=r.text("action"),
        outcome=r.text("outcome"),
        node=r.opt_text("node"),
        reason=r.text("reason"),
        lease_id=r.opt_text("lease_id"),
        job_id=r.opt_text("job_id"),
        restart_count=r.integer("restart_count", 0),
        prio=r.opt_text("prio"),
        requested_mib=r.opt_integer("requested_mib"),
        granted_mib=r.opt_integer("granted_mib"),
        inputs=inputs,
    )


@dataclass(frozen=True)
class Grant:
    """What the Prolog leaves for the TaskProlog: the lease (or why there is none) and the exports.

    ``refused`` is set when the job must not run: the TaskProlog prints it and exits 1 (a refusal
    never drains the node). A job without GPUs, or one whose lease could not be recorded while the
    site fails open, has neither a ``lease_id`` nor a refusal. ``exports`` are ``export K=V`` lines
    for every task: keys are environment variable names, values hold no newline.
    """

    job_id: str
    restart_count: int
    node: str
    lease_id: str | None = None
    vram_mib: int | None = None
    gpus: tuple[int, ...] = ()
    mig_uuid: str | None = None
    prio: str | None = None
    exports: Mapping[str, str] = field(default_factory=dict)
    refused: str | None = None

    def __post_init__(self) -> None:
        for key, value in self.exports.items():
            if not (isinstance(key, str) and _ENV_NAME_RE.fullmatch(key)):
                raise ProtocolError(f"grant: export name {_quote(key)} is not an environment variable name")
            if not isinstance(value, str) or any(c in value for c in "\n\r\0"):
                raise ProtocolError(f"grant: export {key} must be a one-line string, got {_describe(value)}")


def grant_to_json(grant: Grant) -> dict[str, Any]:
    """The ``grant`` object of a ``job_start`` answer."""
    out = _plain(grant)
    out["exports"] = dict(grant.exports)
    return out


def grant_from_json(d: Any) -> Grant:
    """A :class:`Grant` from :func:`grant_to_json`'s form (unknown fields ignored). Raises ProtocolError."""
    r = _Reader(d, "grant")
    exports = r.get("exports", {})
    if not isinstance(exports, Mapping):
        _bad_field("grant", "exports", "an object of strings", exports)
    return Grant(
        job_id=r.text("job_id"),
        restart_count=r.integer("restart_count", 0),
        node=r.text("node"),
        lease_id=r.opt_text("lease_id"),
        vram_mib=r.opt_integer("vram_mib"),
        gpus=r.integers("gpus", ()),
        mig_uuid=r.opt_text("mig_uuid"),
        prio=r.opt_text("prio"),
        exports=dict(exports),
        refused=r.opt_text("refused"),
    )


def job_start_to_json(grant: Grant, decision: model.Decision | None, lease: model.Lease | None) -> dict[str, Any]:
    """The ``job_start`` op's payload: the decision's fields (when the arbiter was asked), the lease
    and the grant. Use as ``ok("job_start", **job_start_to_json(grant, decision, lease))``."""
    out: dict[str, Any] = decision_to_json(decision, lease) if decision is not None else {
        "lease": None if lease is None else lease_to_json(lease)}
    out["grant"] = grant_to_json(grant)
    return out


# --------------------------------------------------------------------------- internals

class _Reader:
    """Typed field access on a decoded response object, with errors that name the field."""

    __slots__ = ("d", "where")

    def __init__(self, d: Any, where: str) -> None:
        if not isinstance(d, Mapping):
            raise ProtocolError(f"{where} must be a JSON object, not {_json_type(d)}")
        self.d: Mapping[str, Any] = d
        self.where = where

    def get(self, name: str, default: Any = _MISSING) -> Any:
        value = self.d.get(name, default)
        if value is _MISSING:
            raise ProtocolError(f"{self.where}: missing field '{name}'")
        return value

    def text(self, name: str, default: Any = _MISSING) -> str:
        value = self.get(name, default)
        if not isinstance(value, str):
            _bad_field(self.where, name, "a string", value)
        return value

    def opt_text(self, name: str) -> str | None:
        return None if self.d.get(name) is None else self.text(name)

    def integer(self, name: str, default: Any = _MISSING) -> int:
        value = self.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool):
            _bad_field(self.where, name, "an integer", value)
        return value

    def opt_integer(self, name: str) -> int | None:
        return None if self.d.get(name) is None else self.integer(name)

    def number(self, name: str) -> float:
        value = self.get(name)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            _bad_field(self.where, name, "a finite number", value)
        return float(value)

    def opt_number(self, name: str) -> float | None:
        return None if self.d.get(name) is None else self.number(name)

    def boolean(self, name: str) -> bool:
        value = self.get(name)
        if not isinstance(value, bool):
            _bad_field(self.where, name, "true or false", value)
        return value

    def integers(self, name: str, default: Any = _MISSING) -> tuple[int, ...]:
        value = self.get(name, default)
        if not isinstance(value, list | tuple) or any(not isinstance(x, int) or isinstance(x, bool) for x in value):
            _bad_field(self.where, name, "an array of integers", value)
        return tuple(value)

    def texts(self, name: str, default: Any = _MISSING) -> tuple[str, ...]:
        value = self.get(name, default)
        if not isinstance(value, list | tuple) or any(not isinstance(x, str) for x in value):
            _bad_field(self.where, name, "an array of strings", value)
        return tuple(value)


def _plain(obj: Any) -> dict[str, Any]:
    """A model dataclass's fields as JSON values (one level: tuples → lists, enums → values)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, enum.Enum):
            value = value.value
        elif isinstance(value, Mapping):
            value = dict(value)
        out[f.name] = value
    return out


def _suggest(word: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(word, str) or not choices:
        return ""
    import difflib  # only on the error path: keeps the hooks' import cheap

    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
