"""The lease protocol: request parsing, response envelopes, payload round trips, and the JSON schema."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_gpuarb import errors, model, protocol, wire
from slurm_gpuarb.errors import NotFoundError, ProtocolError
from slurm_gpuarb.protocol import (
    MAX_INT,
    MAX_MESSAGE_BYTES,
    REQUEST_FIELDS,
    REQUEST_OPS,
    REQUEST_TYPES,
    TOKEN_CHARS,
    ExplainMsg,
    Grant,
    HealthMsg,
    JobEndMsg,
    JobStartMsg,
    LeaseRequestMsg,
    PingMsg,
    ReleaseMsg,
    RenewMsg,
    StatusMsg,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA: dict[str, Any] = json.loads((ROOT / "slurm_gpuarb" / "protocol.schema.json").read_text())
DEFS: dict[str, Any] = SCHEMA["$defs"]


# --------------------------------------------------------------------------- a tiny JSON Schema checker
# jsonschema is not a dependency (and is not installed), so the test carries the subset the schema uses.
# Unknown keywords fail loudly: a keyword this checker ignored would make the sync tests vacuous.

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description", "examples"}
_TYPES = {
    "null": lambda x: x is None,
    "boolean": lambda x: isinstance(x, bool),
    # Stricter than the spec (which counts 1.0 as an integer), like parse_request: the corpora hold no such floats.
    "integer": lambda x: isinstance(x, int) and not isinstance(x, bool),
    "number": lambda x: isinstance(x, int | float) and not isinstance(x, bool),
    "string": lambda x: isinstance(x, str),
    "array": lambda x: isinstance(x, list),
    "object": lambda x: isinstance(x, dict),
}


def _json_eq(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):  # Python's True == 1; JSON's true != 1
        return type(a) is type(b) and a == b
    return bool(a == b)


def schema_errors(inst: Any, schema: Any, path: str = "$") -> list[str]:
    """Every violation of ``schema`` (a subset of draft 2020-12) by ``inst``."""
    if schema is True:
        return []
    if schema is False:
        return [f"{path}: not allowed"]
    out: list[str] = []
    for kw, val in schema.items():
        if kw in _ANNOTATIONS:
            continue
        if kw == "$ref":
            assert val.startswith("#/$defs/"), val
            out += schema_errors(inst, DEFS[val.removeprefix("#/$defs/")], path)
        elif kw == "type":
            if not any(_TYPES[t](inst) for t in ([val] if isinstance(val, str) else val)):
                out.append(f"{path}: not of type {val}")
        elif kw == "const":
            if not _json_eq(inst, val):
                out.append(f"{path}: not {val!r}")
        elif kw == "enum":
            if not any(_json_eq(inst, v) for v in val):
                out.append(f"{path}: not in {val}")
        elif kw in ("minimum", "maximum"):
            if _TYPES["number"](inst) and (inst < val if kw == "minimum" else inst > val):
                out.append(f"{path}: {kw} {val}")
        elif kw in ("minLength", "maxLength"):
            if isinstance(inst, str) and (len(inst) < val if kw == "minLength" else len(inst) > val):
                out.append(f"{path}: {kw} {val}")
        elif kw == "pattern":
            # ECMA-262's $ does not match before a trailing newline; Python's does.
            if isinstance(inst, str) and not re.search(re.sub(r"\$$", r"\\Z", val), inst):
                out.append(f"{path}: does not match {val}")
        elif kw == "required":
            if isinstance(inst, dict):
                out += [f"{path}: missing {name}" for name in val if name not in inst]
        elif kw == "properties":
            if isinstance(inst, dict):
                for name, sub in val.items():
                    if name in inst:
                        out += schema_errors(inst[name], sub, f"{path}.{name}")
        elif kw == "additionalProperties":
            if isinstance(inst, dict):
                for name in inst:
                    if name not in schema.get("properties", {}):
                        out += schema_errors(inst[name], val, f"{path}.{name}")
        elif kw == "items":
            if isinstance(inst, list):
                for i, item in enumerate(inst):
                    out += schema_errors(item, val, f"{path}[{i}]")
        elif kw in ("oneOf", "anyOf", "allOf"):
            passed = sum(not schema_errors(inst, sub, path) for sub in val)
            need = {"oneOf": passed == 1, "anyOf": passed >= 1, "allOf": passed == len(val)}[kw]
            if not need:
                out.append(f"{path}: {kw} matched {passed} of {len(val)}")
        elif kw == "not":
            if not schema_errors(inst, val, path):
                out.append(f"{path}: matches a 'not' schema")
        else:
            raise AssertionError(f"the test's schema checker does not know keyword {kw!r}")
    return out


def is_valid(inst: Any, definition: str | None = None) -> bool:
    return not schema_errors(inst, SCHEMA if definition is None else DEFS[definition])


def accepts(msg: Any) -> bool:
    try:
        protocol.parse_request(msg)
    except ProtocolError:
        return False
    return True


def test_checker_is_not_vacuous() -> None:
    assert is_valid({"v": 1, "op": "ping"}, "Request")
    assert not is_valid({"v": 1, "op": "ping", "x": 1}, "Request")
    assert not is_valid({"v": True, "op": "ping"}, "Request")
    assert not is_valid({"v": 1, "op": "renew", "lease_id": "a\n"}, "Request")
    assert not is_valid({"v": 1, "op": "request", "spec": "x", "gpu": -1}, "Request")


# --------------------------------------------------------------------------- fixtures

LEASE_FULL = model.Lease(
    id="L-7f3a",
    node="n1",
    gpus=(0, 3),
    vram_mib=6144,
    prio="batch",
    priority=10,
    preemptible=True,
    state=model.LeaseState.GRANTED,
    created_at=1_700_000_000.25,
    spec="gpuarb/1: vram=6144MiB prio=batch",
    min_mib=4096,
    mig_uuid="MIG-4b8e-11ee",
    job_id="123",
    restart_count=2,
    owner_uid=1000,
    pid=4242,
    expires_at=1_700_007_200.0,
    ended_at=None,
    end_reason=None,
)
LEASE_MIN = model.Lease(
    id="L-1", node="ws", gpus=(0,), vram_mib=512, prio="llm", priority=100, preemptible=False,
    state=model.LeaseState.RELEASED, created_at=5.0, ended_at=9.5, end_reason="epilog",
)  # fmt: skip

REQUEST_EXAMPLES: list[protocol.Message] = [
    LeaseRequestMsg(spec="vram=6GiB prio=batch"),
    LeaseRequestMsg(
        spec="gpuarb/1: vram=6144MiB prio=batch shards=12",
        node="gpu-n01.cluster",
        gpu=1,
        job_id="123_4",
        restart_count=3,
        pid=77,
        ttl_s=7200,
        plane="prolog",
    ),
    RenewMsg(lease_id="L-7f3a"),
    RenewMsg(lease_id="L-7f3a", ttl_s=60),
    ReleaseMsg(lease_id="L-7f3a"),
    ReleaseMsg(lease_id="L-7f3a", reason="done early"),
    ReleaseMsg(job_id="123", restart_count=0, node="n1", reason="epilog"),
    StatusMsg(),
    StatusMsg(node="n1"),
    ExplainMsg(job_id="123"),
    ExplainMsg(lease_id="L-7f3a"),
    PingMsg(),
    JobStartMsg(job_id="12", restart_count=0, node="n1", uid=1000),
    JobStartMsg(
        job_id="12_3",
        restart_count=1,
        node="n2",
        uid=0,
        comment="run 7 gpuarb: vram=6GiB prio=batch; héllo",
        gres="0,3",
        user="alice",
        partition="shard",
    ),
    JobStartMsg(job_id="13", restart_count=0, node="n4", uid=1000, comment="", gres=""),
    JobEndMsg(job_id="12", restart_count=0, node="n1"),
    JobEndMsg(job_id="12", restart_count=2, node="n1", exit_code=-1),
    HealthMsg(node="n1"),
]


# --------------------------------------------------------------------------- requests


@pytest.mark.parametrize("msg", REQUEST_EXAMPLES, ids=repr)
def test_request_round_trips(msg: protocol.Message) -> None:
    line = protocol.encode(msg)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.parse_request(line) == msg
    assert protocol.parse_request(line.decode()) == msg
    assert protocol.parse_request(msg.to_json()) == msg
    assert is_valid(msg.to_json(), "Request"), schema_errors(msg.to_json(), DEFS["Request"])


def test_every_op_has_an_example_and_a_type() -> None:
    assert set(REQUEST_TYPES) == set(REQUEST_OPS) == {m.op for m in REQUEST_EXAMPLES}


def test_to_json_omits_absent_fields() -> None:
    assert RenewMsg(lease_id="a").to_json() == {"v": 1, "op": "renew", "lease_id": "a"}
    assert PingMsg().to_json() == {"v": 1, "op": "ping"}


def test_null_means_not_given() -> None:
    msg = {"v": 1, "op": "request", "spec": "vram=1GiB", "gpu": None, "node": None, "restart_count": None}
    assert protocol.parse_request(msg) == LeaseRequestMsg(spec="vram=1GiB")


MALFORMED: list[tuple[Any, str]] = [
    (b'{"v":2,"op":"ping"}', "this gpuarb speaks protocol v1, but the request has v=2"),
    (b'{"v":"1","op":"ping"}', 'v="1"'),
    (b'{"v":true,"op":"ping"}', "v=true"),
    (b'{"op":"ping"}', 'no "v" field'),
    (b'{"v":1}', "no 'op' field; expected one of request, renew"),
    (
        b'{"v":1,"op":"reqest","spec":"x"}',
        "unknown op 'reqest'; expected one of request, renew, release, status, explain, ping, job_start, job_end, "
        "health (did you mean",
    ),
    (b'{"v":1,"op":7}', "field 'op' must be one of request"),
    (
        b'{"v":1,"op":"renew","lease_id":"a","ttl":5}',
        "unknown field 'ttl' in the 'renew' message; allowed: lease_id, ttl_s (did you mean 'ttl_s'?)",
    ),
    (b'{"v":1,"op":"ping","x":1}', "unknown field 'x' in the 'ping' message; allowed: none"),
    (b'{"v":1,"op":"renew"}', "the 'renew' message needs field 'lease_id'"),
    (b'{"v":1,"op":"request"}', "needs field 'spec': a non-empty string"),
    (b'{"v":1,"op":"request","spec":""}', "field 'spec' must be a non-empty string"),
    (
        b'{"v":1,"op":"request","spec":5}',
        "field 'spec' must be a non-empty string of at most 4096 characters (a lease spec such as",
    ),
    (b'{"v":1,"op":"request","spec":5}', "got an integer 5"),
    (b'{"v":1,"op":"request","spec":"x","gpu":true}', "field 'gpu' must be an integer >= 0 and <= 2147483647"),
    (b'{"v":1,"op":"request","spec":"x","gpu":1.5}', "field 'gpu' must be an integer"),
    (b'{"v":1,"op":"request","spec":"x","gpu":-1}', "field 'gpu' must be an integer >= 0"),
    (b'{"v":1,"op":"request","spec":"x","pid":2147483648}', "field 'pid' must be an integer >= 1 and <= 2147483647"),
    (b'{"v":1,"op":"request","spec":"x","ttl_s":0}', "field 'ttl_s' must be an integer >= 1"),
    (b'{"v":1,"op":"request","spec":"x","job_id":123}', "field 'job_id' must be a non-empty string"),
    (b'{"v":1,"op":"request","spec":"x","plane":"slurmd"}', "field 'plane' must be one of host, submit, prolog"),
    (b'{"v":1,"op":"status","node":"n1; rm -rf /"}', "from [A-Za-z0-9._:@+-]"),
    (b'{"v":1,"op":"status","node":["n1"]}', "field 'node' must be a non-empty string"),
    (b'{"v":1,"op":"renew","lease_id":"' + b"a" * 129 + b'"}', "at most 128 characters"),
    (
        b'{"v":1,"op":"release","reason":"x"}',
        "needs lease_id, or job_id + restart_count + node (missing: job_id, restart_count, node)",
    ),
    (b'{"v":1,"op":"release","job_id":"1","node":"n1"}', "(missing: restart_count)"),
    (b'{"v":1,"op":"release","lease_id":"a","job_id":"1"}', "not both"),
    (b'{"v":1,"op":"explain"}', "exactly one of job_id or lease_id"),
    (b'{"v":1,"op":"explain","job_id":"1","lease_id":"a"}', "exactly one of job_id or lease_id"),
    (b'{"v":1,"op":"job_start","job_id":"1","node":"n1","uid":0}', "needs field 'restart_count'"),
    (b'{"v":1,"op":"job_start","job_id":"1","restart_count":0,"node":"n1"}', "needs field 'uid': an integer >= 0"),
    (b'{"v":1,"op":"job_start","job_id":"1","restart_count":0,"node":"n1","uid":0,"gres":[0]}', "field 'gres'"),
    (
        b'{"v":1,"op":"job_start","job_id":"1","restart_count":0,"node":"n1","uid":0,"comment":"'
        + b"x" * (protocol.MAX_COMMENT_CHARS + 1)
        + b'"}',
        f"field 'comment' must be a string of at most {protocol.MAX_COMMENT_CHARS} characters",
    ),
    (b'{"v":1,"op":"job_end","job_id":"1","node":"n1"}', "the 'job_end' message needs field 'restart_count'"),
    (b'{"v":1,"op":"job_end","job_id":"1","restart_count":0,"node":"n1","exit_code":"0"}', "field 'exit_code'"),
    (b'{"v":1,"op":"health"}', "the 'health' message needs field 'node'"),
    (b"[1, 2]", "a request must be a JSON object, not an array"),
    (b'"ping"', "not a string"),
    (b"null", "not null"),
    (b"", "empty request"),
    (b"  \n", "empty request"),
    (b'{"v":1,"op":"ping"', "not valid JSON"),
    (b'{"v":1,"op":"ping"} {"v":1,"op":"ping"}', "not valid JSON"),
    (b"\xef\xbb\xbf" + b'{"v":1,"op":"ping"}', "not valid JSON"),  # a UTF-8 BOM
    (b'{"v":1,"op":"p\xffing"}', "not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 14"),
    ('{"v":1,"op":"ping","x":"\ud800"}', "not valid UTF-8: 'utf-8' codec can't encode character '\\ud800'"),
    (b'{"v":1,"v":1,"op":"ping"}', "duplicate field 'v'"),
    (b'{"v":1,"op":"request","spec":"x","ttl_s":NaN}', "NaN is not valid JSON"),
    (b'{"v":1,"op":"request","spec":"x","ttl_s":Infinity}', "Infinity is not valid JSON"),
    (b'{"v":1,"op":"request","spec":"x","ttl_s":' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"[" * 30000 + b"]" * 30000, "not valid JSON"),
    (b'{"v":1,"op":"ping","x":"' + b"a" * MAX_MESSAGE_BYTES + b'"}', f"over the {MAX_MESSAGE_BYTES}-byte limit"),
    ('{"v":1,"op":"ping","x":"' + "é" * (MAX_MESSAGE_BYTES // 2) + '"}', f"over the {MAX_MESSAGE_BYTES}-byte limit"),
    (42, "must be bytes or text"),
]


@pytest.mark.parametrize(("raw", "expected"), MALFORMED, ids=lambda x: repr(x)[:50] if not isinstance(x, str) else None)
def test_malformed_requests_name_the_problem(raw: Any, expected: str) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(raw)
    assert expected in str(info.value)
    assert "Traceback" not in str(info.value)


def test_a_message_of_exactly_the_limit_is_accepted() -> None:
    body = b'{"v":1,"op":"ping"}'
    line = body + b" " * (MAX_MESSAGE_BYTES - len(body) - 1) + b"\n"
    assert len(line) == MAX_MESSAGE_BYTES
    assert protocol.parse_request(line) == PingMsg()
    with pytest.raises(ProtocolError, match="over the"):
        protocol.parse_request(b" " + line)


def test_cross_field_rules_hold_for_direct_construction() -> None:
    with pytest.raises(ProtocolError, match="missing: job_id, restart_count, node"):
        ReleaseMsg()
    with pytest.raises(ProtocolError, match="not both"):
        ReleaseMsg(lease_id="a", node="n1")
    with pytest.raises(ProtocolError, match="exactly one"):
        ExplainMsg()


@given(st.binary(max_size=300))
def test_arbitrary_bytes_only_ever_raise_protocol_error(raw: bytes) -> None:
    accepts(raw)  # any other exception fails the test


# --------------------------------------------------------------------------- schema ↔ parse_request


def _request_defs() -> dict[str, dict[str, Any]]:
    refs = [r["$ref"].removeprefix("#/$defs/") for r in DEFS["Request"]["oneOf"]]
    return {name: DEFS[name] for name in refs}


def test_schema_request_definitions_match_the_dataclasses() -> None:
    defs = _request_defs()
    assert set(defs) == {cls.__name__ for cls in REQUEST_TYPES.values()}
    for name, d in defs.items():
        cls = getattr(protocol, name)
        op = d["properties"]["op"]["const"]
        assert cls.op == op
        assert d["additionalProperties"] is False
        rules = REQUEST_FIELDS[op]
        fields = {f.name for f in dataclasses.fields(cls)}
        assert set(d["properties"]) - {"v", "op"} == set(rules) == fields, name
        assert set(d["required"]) == {"v", "op"} | {n for n, r in rules.items() if r.required}, name


def _rule_as_schema(rule: protocol.FieldRule) -> dict[str, Any]:
    """The keywords a property's schema must carry for ``rule`` (annotations aside)."""
    out: dict[str, Any] = {}
    if rule.choices:
        out["enum"] = [*rule.choices] if rule.required else [*rule.choices, None]
        return out
    out["type"] = rule.json_type if rule.required else [rule.json_type, "null"]
    if rule.minimum is not None:
        out["minimum"] = rule.minimum
    if rule.maximum is not None:
        out["maximum"] = rule.maximum
    if rule.min_length:
        out["minLength"] = rule.min_length
    if rule.max_length is not None:
        out["maxLength"] = rule.max_length
    if rule.token:
        out["pattern"] = "^[A-Za-z0-9._:@+-]+$"
    return out


def test_schema_request_properties_match_the_field_rules() -> None:
    for d in _request_defs().values():
        op = d["properties"]["op"]["const"]
        for name, rule in REQUEST_FIELDS[op].items():
            prop = {k: v for k, v in d["properties"][name].items() if k not in ("description", "examples")}
            assert prop == _rule_as_schema(rule), f"{op}.{name}"


def test_token_pattern_is_exactly_token_chars() -> None:
    pattern = DEFS["StatusMsg"]["properties"]["node"]["pattern"]
    for code in [*range(0x250), 0x2028, 0xFF0E]:
        ch = chr(code)
        schema_ok = bool(re.search(re.sub(r"\$$", r"\\Z", pattern), ch))
        assert schema_ok == (ch in TOKEN_CHARS) == accepts({"v": 1, "op": "status", "node": ch}), repr(ch)


# Values chosen to sit on every rule's boundaries; no float equal to an integer (see _TYPES).
_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-1, 0, 1, 2, 3600, MAX_INT, MAX_INT + 1]),
    st.integers(),
    st.sampled_from(["", "a", "n1", "123", "L-7f3a", "a b", "x" * 128, "x" * 129, "é", "n1\n", "prolog", "host"]),
    st.sampled_from(["vram=6GiB", "x" * 4096, "x" * 4097, "r" * 1024, "r" * 1025]),
    st.text(max_size=4),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


def _valid_values(rule: protocol.FieldRule) -> st.SearchStrategy[Any]:
    """Mostly values ``rule`` accepts, on and inside its boundaries, so random messages are often valid."""
    if rule.choices:
        return st.sampled_from(rule.choices)
    if rule.json_type == "integer":
        lo, hi = rule.minimum or 0, rule.maximum or MAX_INT
        return st.one_of(st.sampled_from([lo, hi]), st.integers(lo, hi))
    alphabet = TOKEN_CHARS if rule.token else st.characters(codec="utf-8")
    hi = rule.max_length or 50
    return st.one_of(
        st.sampled_from(["x" * max(rule.min_length, 1), "x" * hi]),
        st.text(alphabet, min_size=rule.min_length, max_size=8),
    )


def _mostly(p_in_10: int) -> st.SearchStrategy[bool]:
    # Hypothesis favours the first element of sampled_from: put the common case first.
    return st.sampled_from([True] * p_in_10 + [False] * (10 - p_in_10))


@st.composite
def _request_dicts(draw: st.DrawFn) -> dict[str, Any]:
    op = draw(st.sampled_from([*REQUEST_OPS, "bogus"]))
    msg: dict[str, Any] = {}
    for name, rule in REQUEST_FIELDS.get(op, {}).items():
        if draw(_mostly(9 if rule.required else 5)):
            msg[name] = draw(_valid_values(rule) if draw(_mostly(8)) else _VALUES)
    if not draw(_mostly(9)):
        msg[draw(st.sampled_from(["bogus", "spec", "node", "lease_id", "ttl_s"]))] = draw(_VALUES)
    if draw(_mostly(9)):
        msg["op"] = op
    if draw(_mostly(9)):
        msg["v"] = 1
    elif draw(st.booleans()):
        msg["v"] = draw(st.sampled_from([2, 0, "1", True, None]))
    return msg


@settings(max_examples=150)
@given(_request_dicts())
def test_schema_and_parser_agree_on_random_messages(msg: dict[str, Any]) -> None:
    assert is_valid(msg, "Request") == accepts(msg), schema_errors(msg, DEFS["Request"])


@pytest.mark.parametrize("msg", REQUEST_EXAMPLES, ids=repr)
def test_schema_and_parser_agree_on_mutations_of_each_example(msg: protocol.Message) -> None:
    base = msg.to_json()
    mutations: list[dict[str, Any]] = [{**base, "extra": 1}, {**base, "v": 2}]
    mutations += [{k: v for k, v in base.items() if k != name} for name in base]
    for name in REQUEST_FIELDS[msg.op]:
        bad_values: tuple[Any, ...] = (None, True, 1.5, "", "a b", -1, MAX_INT + 1, [], {})
        mutations += [{**base, name: bad} for bad in bad_values]
    for m in mutations:
        assert is_valid(m, "Request") == accepts(m), (m, schema_errors(m, DEFS["Request"]))


# --------------------------------------------------------------------------- responses and payloads


def test_lease_json_round_trips() -> None:
    for lease in (LEASE_FULL, LEASE_MIN):
        d = protocol.lease_to_json(lease)
        assert is_valid(d, "Lease"), schema_errors(d, DEFS["Lease"])
        assert json.loads(json.dumps(d)) == d
        assert protocol.lease_from_json(json.loads(json.dumps(d))) == lease
    assert protocol.lease_to_json(LEASE_FULL)["state"] == "granted"
    assert protocol.lease_to_json(LEASE_FULL)["gpus"] == [0, 3]


def test_schema_payload_objects_cover_every_model_field() -> None:
    assert set(DEFS["Lease"]["properties"]) == {f.name for f in dataclasses.fields(model.Lease)}
    assert set(DEFS["Tenant"]["properties"]) == {f.name for f in dataclasses.fields(model.Tenant)} | {"held_mib"}
    assert set(DEFS["DecisionRecord"]["properties"]) == {f.name for f in dataclasses.fields(model.DecisionRecord)}


def test_lease_from_json_tolerates_unknown_and_defaulted_fields() -> None:
    d = {k: v for k, v in protocol.lease_to_json(LEASE_MIN).items() if k not in ("spec", "min_mib", "restart_count")}
    d["added_in_a_later_v1"] = "ignored"
    assert protocol.lease_from_json(d) == dataclasses.replace(LEASE_MIN, spec="", min_mib=None, restart_count=0)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"state": "granted!"}, "field 'state' must be one of granted, released, expired, revoked"),
        ({"vram_mib": "6144"}, "field 'vram_mib' must be an integer"),
        ({"priority": True}, "field 'priority' must be an integer"),
        ({"preemptible": 1}, "field 'preemptible' must be true or false"),
        ({"gpus": [0, True]}, "field 'gpus' must be an array of integers"),
        ({"created_at": float("nan")}, "field 'created_at' must be a finite number"),
        ({"expires_at": "soon"}, "field 'expires_at' must be a finite number"),
        ({"id": None}, "field 'id' must be a string"),
    ],
)
def test_lease_from_json_rejects_bad_fields(change: dict[str, Any], expected: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        protocol.lease_from_json({**protocol.lease_to_json(LEASE_FULL), **change})


def test_lease_from_json_needs_an_object_and_required_fields() -> None:
    with pytest.raises(ProtocolError, match="lease must be a JSON object, not an array"):
        protocol.lease_from_json([])
    d = protocol.lease_to_json(LEASE_FULL)
    del d["node"]
    with pytest.raises(ProtocolError, match="lease: missing field 'node'"):
        protocol.lease_from_json(d)


@pytest.mark.parametrize("lease", [LEASE_FULL, None])
def test_decision_json_round_trips_through_a_response(lease: model.Lease | None) -> None:
    decision = model.Decision(
        outcome=model.Outcome.DEGRADE if lease else model.Outcome.WAIT,
        node="n1",
        reason="degraded to min=4096MiB: 4608MiB free on gpu0",
        prio="batch",
        requested_mib=6144,
        granted_mib=4096 if lease else 0,
        gpus=(0,) if lease else (),
        revoke=("L-old",) if lease else (),
        inputs={"free_mib": 4608},
    )
    response = protocol.ok("request", **protocol.decision_to_json(decision, lease))
    assert is_valid(response, "Response"), schema_errors(response, DEFS["Response"])
    decoded = protocol.decode_response(protocol.encode(response), op="request")
    got, got_lease = protocol.decision_from_json(decoded)
    assert got == dataclasses.replace(decision, inputs={})  # inputs stay in the ledger
    assert got_lease == lease


def test_decision_from_json_rejects_unknown_outcome() -> None:
    d = protocol.decision_to_json(model.Decision(model.Outcome.DENY, "n1", "too big", "batch", 99), None)
    with pytest.raises(ProtocolError, match="field 'outcome' must be one of grant, degrade"):
        protocol.decision_from_json({**d, "outcome": "maybe"})


def _gpu_state() -> model.GpuState:
    gpu = model.GpuInfo(
        index=0, uuid="GPU-1", name="NVIDIA H100 80GB HBM3", total_mib=81559, reserved_mib=512, used_mib=0
    )
    tenants = (
        model.Tenant(model.TenantKind.LEASE, "L-1", 6144, observed_mib=7000, pids=(10, 11), prio="batch", priority=10),
        model.Tenant(model.TenantKind.FOREIGN, "pid:99", 0, observed_mib=300, label="python3 (alice)"),
    )
    return model.GpuState(node="n1", gpu=gpu, margin_mib=1024, tenants=tenants)


def test_status_payload_carries_derived_sizes_and_matches_the_schema() -> None:
    state = _gpu_state()
    g = protocol.gpu_state_to_json(state)
    assert (g["usable_mib"], g["held_mib"], g["free_mib"]) == (80023, 7300, 72723)
    assert g["tenants"][0]["held_mib"] == 7000 and g["tenants"][0]["kind"] == "lease"
    response = protocol.ok("status", gpus=[g])
    assert is_valid(response, "Response"), schema_errors(response, DEFS["Response"])
    assert not is_valid({**response, "gpus": [{**g, "extra": 1}]}, "Response")


def test_explain_records_round_trip() -> None:
    record = model.DecisionRecord(
        id=7, ts=12.5, plane="prolog", action="request", outcome="grant", node="n1", reason="fits",
        lease_id="L-1", job_id="123", restart_count=1, prio="batch", requested_mib=6144, granted_mib=6144,
        inputs={"gpus": [{"index": 0, "free_mib": 9000}]},
    )  # fmt: skip
    d = protocol.record_to_json(record)
    response = protocol.ok("explain", text="job 123: granted", records=[d])
    assert is_valid(response, "Response"), schema_errors(response, DEFS["Response"])
    back = protocol.decode_response(protocol.encode(response))
    assert protocol.record_from_json(back["records"][0]) == record
    with pytest.raises(ProtocolError, match="field 'inputs' must be an object"):
        protocol.record_from_json({**d, "inputs": []})


@pytest.mark.parametrize(
    "response",
    [
        protocol.ok("ping"),
        protocol.ok("ping", version="0.1.0"),
        protocol.ok("renew", lease=protocol.lease_to_json(LEASE_FULL)),
        protocol.ok("release", lease=protocol.lease_to_json(LEASE_MIN), released=True),
        protocol.ok("release", lease=None, released=False),
        protocol.error(NotFoundError("no lease L-9; see 'gpuarb leases'")),
        protocol.error(RuntimeError("boom")),
    ],
    ids=lambda r: r.get("op", "error"),
)
def test_responses_match_the_schema(response: dict[str, Any]) -> None:
    assert is_valid(response, "Response"), schema_errors(response, DEFS["Response"])
    assert is_valid(response)
    assert not is_valid(response, "Request")


GRANT = Grant(
    job_id="12", restart_count=1, node="n3", lease_id="L-7f3a", vram_mib=9984, gpus=(0,), mig_uuid="MIG-1",
    prio="batch", exports={"CUDA_VISIBLE_DEVICES": "MIG-1", "GPUARB_VRAM_MB": "9984", "GPUARB_LEASE_ID": "L-7f3a"},
)  # fmt: skip


def test_job_start_answers_match_the_schema_and_round_trip() -> None:
    decision = model.Decision(model.Outcome.GRANT, "n3", "fits", "batch", 9984, 9984, (0,), "MIG-1")
    full = protocol.ok("job_start", **protocol.job_start_to_json(GRANT, decision, LEASE_FULL))
    refused_grant = Grant(job_id="13", restart_count=0, node="n1", refused="gpuarb: invalid lease spec: 'vrm'")
    bare = protocol.ok("job_start", **protocol.job_start_to_json(refused_grant, None, None))
    assert set(bare) == {"v", "ok", "op", "lease", "grant"}
    for response in (full, bare):
        assert is_valid(response, "Response"), schema_errors(response, DEFS["Response"])
        decoded = protocol.decode_response(protocol.encode(response), op="job_start")
        assert protocol.grant_from_json(decoded["grant"]) in (GRANT, refused_grant)
    assert protocol.decision_from_json(full)[0] == decision
    # a grant with a newline in an export could inject a line into the TaskProlog's output
    assert not is_valid({**protocol.grant_to_json(GRANT), "exports": {"A": "x\nexport LD_PRELOAD=/tmp/x"}}, "Grant")


@pytest.mark.parametrize(
    ("exports", "expected"),
    [
        ({"A": "1\nexport B=2"}, "export A must be a one-line string"),
        ({"A": "\r"}, "export A must be a one-line string"),
        ({"A": 5}, "export A must be a one-line string, got an integer 5"),
        ({"lower": "1"}, "export name 'lower' is not an environment variable name"),
        ({"A B": "1"}, "is not an environment variable name"),
        ({"": "1"}, "is not an environment variable name"),
    ],
)
def test_grant_refuses_exports_a_shell_line_could_not_carry(exports: dict[str, Any], expected: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(expected)):
        protocol.grant_from_json({**protocol.grant_to_json(GRANT), "exports": exports})
    with pytest.raises(ProtocolError, match="exports' must be an object"):
        protocol.grant_from_json({**protocol.grant_to_json(GRANT), "exports": ["A=1"]})


def test_grant_from_json_needs_its_key_fields() -> None:
    d = protocol.grant_to_json(GRANT)
    del d["node"]
    with pytest.raises(ProtocolError, match="grant: missing field 'node'"):
        protocol.grant_from_json(d)
    minimal = protocol.grant_from_json({"job_id": "1", "node": "n1", "later_field": True})
    assert minimal == Grant(job_id="1", restart_count=0, node="n1")


@pytest.mark.parametrize(
    "response",
    [
        protocol.ok("job_end", released=["L-1"]),
        protocol.ok("job_end", released=[]),
        protocol.ok("health", node="n1", foreign=[]),
        protocol.ok("health", node="n1", foreign=[{"pid": 77, "gpu": 0, "mib": 2048, "name": "python3 (bob)"}]),
    ],
    ids=lambda r: r["op"],
)
def test_job_end_and_health_answers_match_the_schema(response: dict[str, Any]) -> None:
    assert is_valid(response, "Response"), schema_errors(response, DEFS["Response"])
    assert not is_valid({**response, "extra": 1}, "Response")


def test_ok_builds_the_envelope_and_guards_it() -> None:
    assert protocol.ok("ping", version="1") == {"v": 1, "ok": True, "op": "ping", "version": "1"}
    with pytest.raises(ValueError, match="unknown op 'pong'"):
        protocol.ok("pong")
    with pytest.raises(ValueError, match="reserved"):
        protocol.ok("ping", v=2)
    with pytest.raises(ValueError, match="reserved"):
        protocol.ok("ping", error="x")


# --------------------------------------------------------------------------- the wire layer
# Framing, the response envelope and the error kinds are wire.py's: tests/test_wire.py tests them.


def test_the_wire_layer_is_re_exported_unchanged() -> None:
    for name in set(wire.__all__) - {"encode"}:
        assert getattr(protocol, name) is getattr(wire, name), name
    assert protocol.PermissionDeniedError is errors.PermissionDeniedError
    # protocol.encode also takes the request dataclasses; for plain objects it is wire.encode.
    assert protocol.encode(PingMsg()) == wire.encode({"v": 1, "op": "ping"})
    assert protocol.encode({"v": 1, "ok": True, "op": "ping"}) == wire.encode({"v": 1, "ok": True, "op": "ping"})
    assert tuple(REQUEST_TYPES) == wire.REQUEST_OPS


def test_encode_is_compact_ascii_json_and_one_line() -> None:
    line = protocol.encode(LeaseRequestMsg(spec="vram=6GiB\nprio=llm", node="n1", plane="host"))
    assert (
        line == b'{"v":1,"op":"request","spec":"vram=6GiB\\nprio=llm","node":"n1","restart_count":0,"plane":"host"}\n'
    )
    assert protocol.encode({"v": 1, "ok": True, "op": "explain", "text": "é"}) == (
        b'{"v":1,"ok":true,"op":"explain","text":"\\u00e9"}\n'
    )


# --------------------------------------------------------------------------- import cost


def test_import_stays_stdlib_only() -> None:
    """A hook's in-process fallback imports this (the hot path imports only wire): nothing heavy, only stdlib."""
    code = (
        "import sys; before = set(sys.modules); import slurm_gpuarb.protocol; "
        "print(' '.join(sorted(set(sys.modules) - before)))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    loaded = set(proc.stdout.split())
    assert "slurm_gpuarb.protocol" in loaded
    tops = {name.split(".")[0] for name in loaded}
    assert not tops & {"sqlalchemy", "click", "jinja2", "jsonschema", "alembic", "pynvml", "psycopg", "difflib"}
    ours = {name for name in loaded if name.split(".")[0] == "slurm_gpuarb"}
    assert ours <= {"slurm_gpuarb", "slurm_gpuarb.protocol", "slurm_gpuarb.model", "slurm_gpuarb.errors",
                    "slurm_gpuarb.wire"}
    assert tops - {"slurm_gpuarb"} <= set(sys.stdlib_module_names), tops - set(sys.stdlib_module_names)
