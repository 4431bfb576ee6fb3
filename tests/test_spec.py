"""Tests for slurm_gpuarb.spec: the lease spec grammar, parser and formatter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slurm_gpuarb import spec as S
from slurm_gpuarb.errors import LeaseSpecError
from slurm_gpuarb.model import Engine, LeaseSpec, Share, Vram
from slurm_gpuarb.units import MAX_DURATION_S, MAX_SIZE_MIB, format_duration

CORPUS = Path(__file__).parent / "data" / "spec_corpus.txt"
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _corpus(kind: str) -> list[tuple[str, ...]]:
    rows = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        fields = line.split("\t")
        if fields[0] == kind:
            rows.append(tuple(fields[1:]))
    return rows


def _error(comment: str) -> str:
    with pytest.raises(LeaseSpecError) as info:
        S.parse(comment)
    return str(info.value)


def _assert_safe(message: str) -> None:
    """A message is one printable line, short, and escapes everything outside ASCII (but '…')."""
    assert len(message) < 400, message
    assert all(" " <= ch <= "~" or ch == "…" for ch in message), ascii(message)


def _outcome(comment: str) -> LeaseSpec | None:
    """parse() must return None or a LeaseSpec, or raise LeaseSpecError with a safe message."""
    try:
        result = S.parse(comment)
    except LeaseSpecError as e:
        _assert_safe(str(e))
        return None
    assert result is None or isinstance(result, LeaseSpec)
    if result is not None:
        assert S.parse(S.format_spec(result)) == result
    return result


# ---------------------------------------------------------------------------------------- marker


@pytest.mark.parametrize(
    "comment",
    [None, "", "nightly run", "see /opt/gpuarb: for docs", "xgpuarb: vram=6GiB", "gpuarb vram=6GiB", "gpuarb-1: x"],
)
def test_comment_without_marker_is_not_a_lease(comment: str | None) -> None:
    assert S.parse(comment) is None


@pytest.mark.parametrize(
    "comment",
    [
        "gpuarb: vram=6GiB",
        "gpuarb:vram=6GiB",
        "run 42 gpuarb: vram=6GiB",
        "run 42;gpuarb: vram=6GiB",
        "first line\ngpuarb: vram=6GiB",
        "tab\tgpuarb: vram=6GiB",
    ],
)
def test_marker_starts_comment_or_follows_whitespace_or_semicolon(comment: str) -> None:
    assert S.parse(comment) == LeaseSpec(vram=Vram(mib=6144))


def test_first_valid_marker_wins_and_the_spec_runs_to_the_end() -> None:
    assert S.parse("x/gpuarb: junk; gpuarb: vram=1GiB") == LeaseSpec(vram=Vram(mib=1024))
    assert "'gpuarb:' is not a key=value token" in _error("gpuarb: vram=1GiB gpuarb: vram=2GiB")


def test_wrongly_cased_marker_is_an_error_not_silence() -> None:
    msg = _error("Nightly GPUARB: vram=6GiB")
    assert "'GPUARB:'" in msg and "write gpuarb:" in msg


@pytest.mark.parametrize("marker", ["gpuarb/2:", "gpuarb/0:", "gpuarb/v1:", "gpuarb/\uff11:", "gpuarb/:"])
def test_unsupported_versions_name_what_this_code_reads(marker: str) -> None:
    msg = _error(f"{marker} vram=6GiB")
    assert "unsupported lease spec version" in msg and "gpuarb:" in msg and "gpuarb/1:" in msg
    _assert_safe(msg)


def test_canonical_form_carries_shards() -> None:
    got = S.parse("gpuarb/1: vram=6144MiB prio=batch shards=12")
    assert got == LeaseSpec(vram=Vram(mib=6144), prio="batch", shards=12)


def test_user_form_may_not_carry_shards() -> None:
    assert "'shards=12': shards= is set by job_submit; ask for vram= instead" in _error("gpuarb: vram=6GiB shards=12")


# ---------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("vram=6GiB", LeaseSpec(vram=Vram(mib=6144))),
        ("vram=6gib", LeaseSpec(vram=Vram(mib=6144))),
        ("vram=512MiB", LeaseSpec(vram=Vram(mib=512))),
        ("vram=1.5GiB", LeaseSpec(vram=Vram(mib=1536))),
        ("vram=6GB", LeaseSpec(vram=Vram(mib=5723))),
        ("vram=2TiB", LeaseSpec(vram=Vram(mib=2 * 1024 * 1024))),
        ("vram=25%", LeaseSpec(vram=Vram(percent=25))),
        ("vram=100%", LeaseSpec(vram=Vram(percent=100))),
        ("vram=1GiB gpus=1", LeaseSpec(vram=Vram(mib=1024), gpus=1)),
        ("vram=1GiB gpus=64", LeaseSpec(vram=Vram(mib=1024), gpus=64)),
        ("vram=1GiB prio=llm", LeaseSpec(vram=Vram(mib=1024), prio="llm")),
        ("vram=1GiB prio=b-2_x", LeaseSpec(vram=Vram(mib=1024), prio="b-2_x")),
        ("vram=8GiB min=4GiB", LeaseSpec(vram=Vram(mib=8192), min=Vram(mib=4096))),
        ("vram=8GiB min=8GiB", LeaseSpec(vram=Vram(mib=8192), min=Vram(mib=8192))),
        ("vram=50% min=10%", LeaseSpec(vram=Vram(percent=50), min=Vram(percent=10))),
        ("vram=10% min=40GiB", LeaseSpec(vram=Vram(percent=10), min=Vram(mib=40960))),
        ("mig=1g.10gb", LeaseSpec(mig="1g.10gb")),
        ("mig=1g.12gb", LeaseSpec(mig="1g.12gb")),
        ("mig=any", LeaseSpec(mig="any")),
        ("mig=3g.40gb gpus=1", LeaseSpec(mig="3g.40gb", gpus=1)),
        ("vram=1GiB share=shard", LeaseSpec(vram=Vram(mib=1024), share=Share.SHARD)),
        ("vram=1GiB share=mps", LeaseSpec(vram=Vram(mib=1024), share=Share.MPS)),
        ("vram=1GiB share=exclusive", LeaseSpec(vram=Vram(mib=1024), share=Share.EXCLUSIVE)),
        ("vram=1GiB ttl=90s", LeaseSpec(vram=Vram(mib=1024), ttl_s=90)),
        ("vram=1GiB ttl=1h30m", LeaseSpec(vram=Vram(mib=1024), ttl_s=5400)),
        ("vram=1GiB wait=10m", LeaseSpec(vram=Vram(mib=1024), wait_s=600)),
        ("vram=1GiB engine=vllm", LeaseSpec(vram=Vram(mib=1024), engine=Engine.VLLM)),
        ("vram=1GiB engine=ollama", LeaseSpec(vram=Vram(mib=1024), engine=Engine.OLLAMA)),
        ("vram=1GiB engine=tf", LeaseSpec(vram=Vram(mib=1024), engine=Engine.TF)),
        ("vram=1GiB engine=torch", LeaseSpec(vram=Vram(mib=1024), engine=Engine.TORCH)),
        ("vram=1GiB,prio=llm", LeaseSpec(vram=Vram(mib=1024), prio="llm")),
        (" , vram=1GiB ,, prio=llm , ", LeaseSpec(vram=Vram(mib=1024), prio="llm")),
    ],
)
def test_each_key(body: str, expected: LeaseSpec) -> None:
    assert S.parse(f"gpuarb: {body}") == expected
    assert S.parse_body(body, canonical=False) == expected


def test_full_spec() -> None:
    got = S.parse("gpuarb: vram=6GiB gpus=2 prio=batch min=4GiB share=mps ttl=2h wait=10m engine=torch")
    assert got == LeaseSpec(
        vram=Vram(mib=6144),
        gpus=2,
        prio="batch",
        min=Vram(mib=4096),
        share=Share.MPS,
        ttl_s=7200,
        wait_s=600,
        engine=Engine.TORCH,
    )


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("comment", "fragment"), _corpus("error"))
def test_corpus_errors(comment: str, fragment: str) -> None:
    msg = _error(comment)
    assert fragment in msg
    _assert_safe(msg)


@pytest.mark.parametrize(("comment", "canonical"), _corpus("ok"))
def test_corpus_valid(comment: str, canonical: str) -> None:
    got = S.parse(comment)
    assert got is not None
    assert S.format_spec(got) == canonical
    assert S.parse(canonical) == got


@pytest.mark.parametrize(("comment",), _corpus("none"))
def test_corpus_none(comment: str) -> None:
    assert S.parse(comment) is None


def test_unknown_key_suggests_the_nearest() -> None:
    assert _error("gpuarb: vrm=6GiB") == "unknown key 'vrm'; did you mean 'vram'?"
    assert "did you mean 'engine'?" in _error("gpuarb: vram=1GiB engin=vllm")
    assert "did you mean 'prio'?" in _error("gpuarb: vram=1GiB priority=llm")


def test_unknown_key_without_a_near_one_lists_the_user_keys() -> None:
    msg = _error("gpuarb: color=blue")
    assert msg == "unknown key 'color'; valid keys are vram, gpus, prio, min, mig, share, ttl, wait, engine"


def test_unknown_key_in_canonical_form_lists_shards_too() -> None:
    assert _error("gpuarb/1: color=blue").endswith("engine, shards")


MALFORMED = [
    # (comment, fragments the message must contain)
    ("gpuarb: vrm=6GiB", ["'vrm'", "did you mean 'vram'?"]),
    ("gpuarb: vram=6XB", ["'vram=6XB'", "unknown unit 'XB'", "MiB, GiB"]),
    ("gpuarb: vram=6", ["'vram=6'", "expected a size such as 6GiB"]),
    ("gpuarb: vram=-6GiB", ["'vram=-6GiB'", "expected a size"]),
    ("gpuarb: vram=0MiB", ["'vram=0MiB'", "zero"]),
    ("gpuarb: vram=999999999TiB", ["'vram=999999999TiB'", "absurdly large"]),
    ("gpuarb: vram=1e9GiB", ["'vram=1e9GiB'", "expected a size"]),
    ("gpuarb: vram=６GiB", ["'vram=\\uff16GiB'", "'\\uff16'", "only ASCII"]),
    ("gpuarb: gpus=٢ vram=1GiB", ["'gpus=\\u0662'", "only ASCII"]),
    ("gpuarb: vram=6GiB\u202e", ["'\\u202e'", "only ASCII"]),
    ("gpuarb: vram=6GiB\x00", ["'vram=6GiB\\x00'", "control character '\\x00'"]),
    ("gpuarb: vram=\x1b[31m6GiB", ["'\\x1b'", "control character"]),
    ("gpuarb: vram=6GiB\r\nprio=llm", ["control character '\\r'"]),
    ("gpuarb: vram=$(reboot)", ["'vram=$(reboot)'", "expected a size"]),
    ("gpuarb: vram=6GiB prio=$USER", ["'prio=$USER'", "expected a priority class"]),
    ("gpuarb: vram=6GiB;reboot", ["'vram=6GiB;reboot'"]),
    ("gpuarb: vram=6GiB && reboot", ["'&&' is not a key=value token"]),
    ("gpuarb: vram=`id`", ["'vram=`id`'"]),
    ("gpuarb: vram={{7*7}}", ["'vram={{7*7}}'"]),
    ("gpuarb: vram=6GiB {% raw %}", ["'{%' is not a key=value token"]),
    ("gpuarb: ", ["empty lease spec", "e.g. gpuarb: vram=6GiB"]),
    ("gpuarb:,,,", ["empty lease spec"]),
    ("gpuarb: vram=1GiB vram=1GiB", ["'vram=1GiB' repeats vram=", "give each key once"]),
    ("gpuarb: vram=1GiB gpus=", ["'gpus=' has an empty value", "a whole number of GPUs"]),
    ("gpuarb: =", ["'=' has no key"]),
    ("gpuarb: share=MPS vram=1GiB", ["'share=MPS'", "did you mean 'mps'?"]),
    ("gpuarb: engine=pytorch vram=1GiB", ["'engine=pytorch'", "did you mean 'torch'?"]),
    ("gpuarb: mig=1g.10gb gpus=2", ["'mig=1g.10gb'", "'gpus=2'", "one MIG slice"]),
    ("gpuarb: mig=1g.1000gb", ["'mig=1g.1000gb'", "MIG profile"]),
    ("gpuarb: vram=4GiB min=5GiB", ["'min=5GiB' is larger than 'vram=4GiB'"]),
    ("gpuarb: min=4GiB", ["missing vram="]),
    ("gpuarb: mig=any min=4GiB", ["'min=4GiB' needs vram="]),
    ("gpuarb: vram=1GiB ttl=1h1h", ["'ttl=1h1h'", "largest first"]),
    ("gpuarb: vram=1GiB ttl=2", ["'ttl=2'", "a duration such as"]),
]


@pytest.mark.parametrize(("comment", "fragments"), MALFORMED)
def test_malformed_input(comment: str, fragments: list[str]) -> None:
    msg = _error(comment)
    for fragment in fragments:
        assert fragment in msg
    _assert_safe(msg)


def test_long_token_is_truncated_in_the_message() -> None:
    msg = _error("gpuarb: vram=" + "9" * 1000)
    assert "'vram=" + "9" * 35 + "…'" in msg
    assert "9" * 41 not in msg
    assert "at most 16" in msg
    _assert_safe(msg)


def test_long_unknown_key_is_truncated_in_the_message() -> None:
    msg = _error("gpuarb: " + "k" * 900 + "=1")
    assert "k" * 41 not in msg and "…" in msg
    _assert_safe(msg)


def test_body_length_cap_counts_characters_after_the_marker() -> None:
    at_cap = "vram=1GiB" + " " * (S.MAX_BODY_CHARS - len("vram=1GiB"))
    assert S.parse("prefix " * 1000 + "gpuarb:" + at_cap) == LeaseSpec(vram=Vram(mib=1024))
    assert _error("gpuarb:" + at_cap + " ") == "lease spec too long (1025 characters; at most 1024)"


def test_token_count_is_capped() -> None:
    msg = _error("gpuarb: " + " ".join(["x"] * (S.MAX_TOKENS + 1)))
    assert f"too many tokens ({S.MAX_TOKENS + 1}; at most {S.MAX_TOKENS})" in msg


HUNDRED_KB = 100_000


@pytest.mark.parametrize(
    "comment",
    [
        "x" * HUNDRED_KB,
        "gpuarb: vram=" + "9" * HUNDRED_KB,
        "gpuarb: " + "vram=1GiB " * (HUNDRED_KB // 10),
        "gpuarb:" + "\x00" * HUNDRED_KB,
        "gpuarb: " + "６" * HUNDRED_KB,
        "xgpuarb:" * (HUNDRED_KB // 8),
        "xGPUARB:" * (HUNDRED_KB // 8),
        ";" * HUNDRED_KB,
        "x" * HUNDRED_KB + " gpuarb: vram=1GiB",
    ],
    ids=[
        "plain",
        "long-value",
        "many-tokens",
        "nul",
        "fullwidth",
        "near-markers",
        "near-markers-upper",
        "semis",
        "tail",
    ],
)
def test_hundred_kilobyte_comments(comment: str) -> None:
    result = _outcome(comment)
    assert (result is not None) == comment.endswith(" gpuarb: vram=1GiB")


# ---------------------------------------------------------------------------------------- quote


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("vram=6GiB", "'vram=6GiB'"),
        ("a\x00b", "'a\\x00b'"),
        ("\x1b[2J", "'\\x1b[2J'"),
        ("６", "'\\uff16'"),
        ("x" * 40, "'" + "x" * 40 + "'"),
        ("x" * 41, "'" + "x" * 40 + "…'"),
        ("\u202e" * 10, "'" + "\\u202e" * 6 + "…'"),
    ],
)
def test_quote(text: str, quoted: str) -> None:
    assert S.quote(text) == quoted


# ---------------------------------------------------------------------------------------- format


def test_format_uses_fixed_key_order_mib_and_canonical_marker() -> None:
    spec = LeaseSpec(
        shards=12,
        engine=Engine.VLLM,
        wait_s=90,
        ttl_s=5400,
        share=Share.MPS,
        min=Vram(percent=10),
        prio="llm",
        gpus=1,
        vram=Vram(mib=6144),
    )
    assert S.format_spec(spec) == (
        "gpuarb/1: vram=6144MiB gpus=1 prio=llm min=10% share=mps ttl=1h30m wait=1m30s engine=vllm shards=12"
    )


def test_format_user_form_drops_shards() -> None:
    spec = LeaseSpec(vram=Vram(percent=25), mig="any", shards=3)
    assert S.format_spec(spec, canonical=False) == "gpuarb: vram=25% mig=any"
    assert S.parse(S.format_spec(spec, canonical=False)) == dataclasses.replace(spec, shards=None)


def test_format_key_order_is_the_keys_table_order() -> None:
    assert list(S.KEYS) == ["vram", "gpus", "prio", "min", "mig", "share", "ttl", "wait", "engine", "shards"]


@pytest.mark.parametrize(("comment",), [(c,) for c, _ in _corpus("ok")])
def test_round_trip_corpus(comment: str) -> None:
    once = S.parse(comment)
    assert once is not None
    assert S.parse(S.format_spec(once)) == once
    assert S.parse(S.format_spec(once, canonical=False)) == dataclasses.replace(once, shards=None)


# ---------------------------------------------------------------------------------------- classes


def test_check_classes_accepts_configured_and_unset_prio() -> None:
    S.check_classes(LeaseSpec(vram=Vram(mib=1), prio="llm"), {"llm", "batch"})
    S.check_classes(LeaseSpec(vram=Vram(mib=1)), set())


def test_check_classes_suggests_the_nearest_class() -> None:
    with pytest.raises(LeaseSpecError) as info:
        S.check_classes(LeaseSpec(vram=Vram(mib=1), prio="bach"), ["llm", "batch"])
    assert str(info.value) == (
        "unknown priority class 'bach' in prio=bach; did you mean 'batch'?; configured classes: batch, llm"
    )


def test_check_classes_lists_classes_when_nothing_is_close() -> None:
    with pytest.raises(LeaseSpecError, match=r"configured classes: batch, llm$") as info:
        S.check_classes(LeaseSpec(vram=Vram(mib=1), prio="zzz"), ("llm", "batch"))
    assert "did you mean" not in str(info.value)
    with pytest.raises(LeaseSpecError, match="none configured"):
        S.check_classes(LeaseSpec(vram=Vram(mib=1), prio="zzz"), ())


# ---------------------------------------------------------------------------------------- tables


def test_keys_table_is_consistent_with_the_model() -> None:
    fields = {f.name for f in dataclasses.fields(LeaseSpec)}
    assert {ks.field for ks in S.KEYS.values()} == fields
    assert S.KEYS["share"].choices == tuple(s.value for s in Share)
    assert S.KEYS["engine"].choices == tuple(e.value for e in Engine)
    assert [k for k, ks in S.KEYS.items() if ks.canonical_only] == ["shards"]
    for key, ks in S.KEYS.items():
        assert ks.kind in S.KINDS, key
        assert ks.help and ks.lua_shapes, key
        assert len(ks.example) <= ks.max_len, key
        assert (ks.lo is None) == (ks.hi is None), key
        assert (ks.kind == "enum") <= bool(ks.choices), key
        assert ks.canonical_only <= bool(ks.user_hint), key


@pytest.mark.parametrize("key", list(S.KEYS))
def test_every_example_parses_and_one_character_more_is_refused(key: str) -> None:
    ks = S.KEYS[key]
    base = "" if key == "vram" else "vram=100% " if key == "min" else "vram=1GiB "
    marker = S.CANONICAL_MARKER if ks.canonical_only else S.MARKER
    assert S.parse(f"{marker} {base}{key}={ks.example}") is not None
    too_long = "9" * (ks.max_len + 1)
    assert "too long" in _error(f"{marker} {base}{key}={too_long}")


def test_numeric_bounds_are_inclusive() -> None:
    for key in ("gpus", "shards"):
        ks = S.KEYS[key]
        assert ks.lo is not None and ks.hi is not None
        for n, ok in ((ks.lo, True), (ks.hi, True), (ks.lo - 1, False), (ks.hi + 1, False)):
            comment = f"gpuarb/1: vram=1GiB {key}={n}"
            if ok:
                assert getattr(S.parse(comment), ks.field) == n
            else:
                assert f"bad {key}= value" in _error(comment)


# ---------------------------------------------------------------------------------------- properties

_FRAGMENTS = st.sampled_from(
    [*S.KEYS, "=", " ", ",", "6", "0", "12", "GiB", "MiB", "gb", "%", ".", "1g.10gb", "any", "mps", "vllm",
     "batch", "h", "m", "s", "1h30m", "gpuarb:", "gpuarb/1:", "-", ";", "$(", "{{", "\x00", "６", "vrm"]
)  # fmt: skip


@PROPERTY
@given(st.text(max_size=5000))
def test_arbitrary_text_never_crashes(text: str) -> None:
    _outcome(text)


@PROPERTY
@given(st.text(max_size=300), st.text(max_size=300))
def test_arbitrary_text_around_a_marker_never_crashes(before: str, after: str) -> None:
    _outcome(f"{before} gpuarb: {after}")


@PROPERTY
@given(st.text(max_size=2000))
def test_arbitrary_spec_body_never_crashes(body: str) -> None:
    _outcome("gpuarb: " + body)
    _outcome("gpuarb/1: " + body)


@PROPERTY
@given(st.lists(_FRAGMENTS, max_size=40).map("".join))
def test_grammar_shaped_noise_never_crashes(body: str) -> None:
    _outcome("gpuarb: " + body)
    _outcome("gpuarb/1:" + body)


def _size_token(mib: int, percent: int | None, draw: st.DrawFn) -> str:
    if percent is not None:
        return f"{percent}%"
    if mib % 1024 == 0 and draw(st.booleans()):
        return f"{mib // 1024}{draw(st.sampled_from(['GiB', 'gib', 'GIB']))}"
    return f"{mib}{draw(st.sampled_from(['MiB', 'mib', 'MIB']))}"


@st.composite
def valid_specs(draw: st.DrawFn, canonical: bool) -> tuple[str, LeaseSpec]:
    """A valid spec text (keys in random order, random separators and unit spellings) and its LeaseSpec."""
    tokens: dict[str, str] = {}
    values: dict[str, object] = {}
    if draw(st.booleans()):
        values["mig"] = tokens["mig"] = draw(st.one_of(st.just("any"), st.from_regex(S.MIG_RE, fullmatch=True)))
    if "mig" not in values or draw(st.booleans()):
        percent = draw(st.none() | st.integers(1, 100))
        mib = draw(st.integers(1, MAX_SIZE_MIB)) if percent is None else 0
        values["vram"] = Vram(percent=percent) if percent is not None else Vram(mib=mib)
        tokens["vram"] = _size_token(mib, percent, draw)
        if draw(st.booleans()):
            floor_pct = draw(st.integers(1, percent)) if percent is not None else None
            floor_mib = draw(st.integers(1, mib)) if percent is None else 0
            values["min"] = Vram(percent=floor_pct) if floor_pct is not None else Vram(mib=floor_mib)
            tokens["min"] = _size_token(floor_mib, floor_pct, draw)
    if draw(st.booleans()):
        gpus = 1 if "mig" in values else draw(st.integers(1, S.MAX_GPUS))
        values["gpus"], tokens["gpus"] = gpus, str(gpus)
    if draw(st.booleans()):
        values["prio"] = tokens["prio"] = draw(st.from_regex(S.NAME_RE, fullmatch=True))
    if draw(st.booleans()):
        share = draw(st.sampled_from(Share))
        values["share"], tokens["share"] = share, share.value
    if draw(st.booleans()):
        engine = draw(st.sampled_from(Engine))
        values["engine"], tokens["engine"] = engine, engine.value
    for key, field in (("ttl", "ttl_s"), ("wait", "wait_s")):
        if draw(st.booleans()):
            seconds = draw(st.integers(1, MAX_DURATION_S))
            values[field] = seconds
            tokens[key] = format_duration(seconds) if seconds > 999_999 or draw(st.booleans()) else f"{seconds}s"
    if canonical and draw(st.booleans()):
        shards = draw(st.integers(1, S.MAX_SHARDS))
        values["shards"], tokens["shards"] = shards, str(shards)
    order = draw(st.permutations(list(tokens)))
    seps = draw(st.lists(st.sampled_from([" ", ",", ", ", " ,", "  "]), min_size=len(order), max_size=len(order)))
    body = "".join(f"{sep}{key}={tokens[key]}" for sep, key in zip(seps, order, strict=True))
    marker = S.CANONICAL_MARKER if canonical else S.MARKER
    return f"{draw(st.sampled_from(['', 'job 7 ', 'a;']))}{marker}{body}", LeaseSpec(**values)  # type: ignore[arg-type]


@PROPERTY
@given(st.booleans().flatmap(lambda canonical: valid_specs(canonical)))
def test_valid_specs_parse_and_round_trip(case: tuple[str, LeaseSpec]) -> None:
    text, expected = case
    parsed = S.parse(text)
    assert parsed == expected
    canonical = S.format_spec(parsed)
    assert S.parse(canonical) == parsed
    assert S.format_spec(S.parse(canonical)) == canonical  # type: ignore[arg-type]
    if parsed.shards is None:
        assert S.parse(S.format_spec(parsed, canonical=False)) == parsed
