"""The lease spec: grammar, parser and formatter.

Users write a lease in ``sbatch --comment``::

    sbatch --comment 'run 42 gpuarb: vram=6GiB prio=batch min=4GiB ttl=2h'

The comment may carry other text *before* the marker. The marker (``gpuarb:``) must start the
comment or follow whitespace or ``;``; the spec runs from the marker to the end of the comment
and is a list of quote-free ``key=value`` tokens separated by spaces and/or commas (``#SBATCH
--comment`` strips quotes, so none are needed or allowed). job_submit rewrites an accepted spec
into the canonical, versioned form ``gpuarb/1: vram=6144MiB prio=batch shards=12``, which parses
here too and is the only form that may carry ``shards=``.

Choices this module makes (and job_submit.lua, rendered from the same tables, must repeat):

* Keys, enum values, MIG profiles and the marker are lower-case and case-sensitive. A marker in
  another case (``GPUARB:``) is an error rather than "no lease", so a typo is never silently ignored.
* Separators are the space and the comma only. Tabs, newlines and every other control character
  are refused, as is anything outside ASCII: a fullwidth ``６`` is never read as ``6``.
* Length is capped before any pattern matching (the body at :data:`MAX_BODY_CHARS`, each value at
  its key's ``max_len``), so a 100 kB comment costs one linear search for the marker.
* Error messages quote tokens through :func:`quote`: at most :data:`QUOTE_MAX_CHARS` characters,
  non-printable and non-ASCII characters escaped the way ``ascii()`` does, so a message is safe to
  print to a terminal or a log line.

The grammar is data (:data:`KEYS` and the constants below), not code: every key's check is a
Lua-5.1-pattern shape, a length cap, numeric bounds and enum membership, so a renderer can emit
the same checks for job_submit.lua, which has no regular expressions.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .errors import LeaseSpecError
from .model import Engine, LeaseSpec, Share, Vram
from .units import UnitError, format_duration, format_size, parse_duration_s, parse_size_mib

__all__ = [
    "CANONICAL_MARKER",
    "CANONICAL_VERSION",
    "CONTROL_RE",
    "DURATION_RE",
    "ENGINE_CHOICES",
    "INT_RE",
    "KEYS",
    "KEY_RE",
    "KINDS",
    "MARKER",
    "MARKER_ANYCASE_RE",
    "MARKER_BOUNDARY",
    "MARKER_RE",
    "MAX_BODY_CHARS",
    "MAX_GPUS",
    "MAX_PERCENT",
    "MAX_SHARDS",
    "MAX_TOKENS",
    "MIG_ANY",
    "MIG_RE",
    "MIN_PERCENT",
    "NAME_RE",
    "PERCENT_RE",
    "QUOTE_MAX_CHARS",
    "SEPARATOR_RE",
    "SHARE_CHOICES",
    "SIZE_RE",
    "SUPPORTED_VERSIONS",
    "USER_KEYS",
    "VERSION_RE",
    "KeySpec",
    "check_classes",
    "format_spec",
    "parse",
    "parse_body",
    "quote",
]

MARKER: Final = "gpuarb:"
CANONICAL_VERSION: Final = 1
CANONICAL_MARKER: Final = f"gpuarb/{CANONICAL_VERSION}:"
SUPPORTED_VERSIONS: Final = (CANONICAL_VERSION,)

# ---------------------------------------------------------------------------------------- limits

MAX_BODY_CHARS: Final = 1024  # the spec after the marker; checked before any regex work
MAX_TOKENS: Final = 16  # there are only 10 keys; more tokens can never be a valid spec
QUOTE_MAX_CHARS: Final = 40  # the most characters of one token an error message echoes
MAX_GPUS: Final = 64
MAX_SHARDS: Final = 100_000
MIN_PERCENT: Final = 1
MAX_PERCENT: Final = 100

# ---------------------------------------------------------------------------------------- regexes

# The marker. It counts only at the start of the comment or after whitespace or ';' (checked in
# _find_marker, not with a look-behind: a pattern that starts with a literal lets ``re`` use its fast
# substring search, about 40 µs for 100 kB of text without a marker instead of 3 ms).
MARKER_RE: Final = re.compile(r"gpuarb(?:/([^:\s]{0,8}))?:", re.ASCII)
# Only to refuse a wrongly-cased marker (GPUARB:) with a message instead of ignoring it.
MARKER_ANYCASE_RE: Final = re.compile(MARKER_RE.pattern, re.ASCII | re.IGNORECASE)
MARKER_BOUNDARY: Final = frozenset(" \t\n\r\f\v;")
SEPARATOR_RE: Final = re.compile(r"[ ,]+")
CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")
VERSION_RE: Final = re.compile(r"[0-9]{1,3}", re.ASCII)
KEY_RE: Final = re.compile(r"[a-z]{1,16}", re.ASCII)
# Sizes mirror units.parse_size_mib's accepted shape; units then checks the unit and the range.
SIZE_RE: Final = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,3})?[A-Za-z]{2,3}", re.ASCII)
PERCENT_RE: Final = re.compile(r"([0-9]{1,3})%", re.ASCII)
INT_RE: Final = re.compile(r"[0-9]{1,6}", re.ASCII)
NAME_RE: Final = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)
MIG_RE: Final = re.compile(r"[1-7]g\.[0-9]{1,3}gb", re.ASCII)
DURATION_RE: Final = re.compile(r"(?:[0-9]{1,6}[dhms]){1,4}", re.ASCII)

# ---------------------------------------------------------------------------------------- tables

KINDS: Final = ("size", "int", "enum", "duration", "mig", "name")


@dataclass(frozen=True)
class KeySpec:
    """How one key of the lease spec is written and checked.

    Every check is a combination of: a length cap, a shape (one of ``lua_shapes``, anchored Lua
    5.1 patterns; the Python side uses the ``*_RE`` constant named by ``kind``), inclusive numeric
    bounds and enum membership. Nothing else, so job_submit.lua can be rendered from this table.

    Fields:
        kind: one of :data:`KINDS`.
            ``size``: an absolute size (``SIZE_RE``, units per :func:`units.parse_size_mib`) or a
            whole percent ``N%`` of the GPU's total memory, ``lo..hi`` (``PERCENT_RE``) → ``Vram``.
            ``int``: ASCII digits (``INT_RE``), ``lo..hi`` → ``int``.
            ``enum``: exactly one of ``choices`` → the model's enum.
            ``duration``: ``DURATION_RE``, read by :func:`units.parse_duration_s` → seconds.
            ``mig``: a MIG profile (``MIG_RE``) or one of ``choices`` (``any``) → ``str``.
            ``name``: ``NAME_RE`` → ``str``.
        field: the :class:`model.LeaseSpec` attribute the value lands in.
        help: what a value looks like, with an example; ends error messages about this key.
        example: a valid value, used in messages and tests.
        max_len: the longest value text accepted; checked before the shape.
        lua_shapes: anchored Lua 5.1 patterns; a value must match one. Digit-run lengths that
            Lua patterns cannot count are covered by ``max_len`` and the numeric bounds.
        lo, hi: inclusive bounds of the number (``int``), or of the percent (``size``).
        choices: the allowed words (``enum``), or extra words beside the shape (``mig``).
        canonical_only: only the ``gpuarb/1:`` form job_submit writes may carry this key.
        user_hint: for ``canonical_only`` keys, what to tell a user who wrote it.
    """

    kind: str
    field: str
    help: str
    example: str
    max_len: int
    lua_shapes: tuple[str, ...]
    lo: int | None = None
    hi: int | None = None
    choices: tuple[str, ...] = ()
    canonical_only: bool = False
    user_hint: str = ""


SHARE_CHOICES: Final = tuple(s.value for s in Share)
ENGINE_CHOICES: Final = tuple(e.value for e in Engine)
MIG_ANY: Final = "any"

_SIZE_LUA = ("^(%d+)%%$", "^(%d+)(%a+)$", "^(%d+)%.(%d+)(%a+)$")
_SIZE_HELP = (
    "a size such as 6GiB or 512MiB (MiB, GiB, TiB, MB, GB or TB), or a percent of the GPU's total memory such as 25%"
)

# Dict order is the canonical key order format_spec() writes.
KEYS: Final[Mapping[str, KeySpec]] = {
    "vram": KeySpec("size", "vram", _SIZE_HELP, "6GiB", 16, _SIZE_LUA, MIN_PERCENT, MAX_PERCENT),
    "gpus": KeySpec(
        "int", "gpus", f"a whole number of GPUs from 1 to {MAX_GPUS}, e.g. gpus=2", "2", 2, ("^%d+$",), 1, MAX_GPUS
    ),
    "prio": KeySpec(
        "name",
        "prio",
        "a priority class such as llm or batch (a lower-case letter, then letters, digits, '_' or '-'; at most 32)",
        "batch",
        32,
        ("^%l[%l%d_%-]*$",),
    ),
    "min": KeySpec(
        "size",
        "min",
        "the smallest size vram may be degraded to, written like vram (e.g. min=4GiB or min=10%)",
        "4GiB",
        16,
        _SIZE_LUA,
        MIN_PERCENT,
        MAX_PERCENT,
    ),
    "mig": KeySpec(
        "mig",
        "mig",
        "a MIG profile such as 1g.10gb or 3g.40gb, or any",
        "1g.10gb",
        9,
        ("^[1-7]g%.%d%d?%d?gb$",),
        choices=(MIG_ANY,),
    ),
    "share": KeySpec(
        "enum", "share", "one of " + ", ".join(SHARE_CHOICES), "mps", 9, ("^%l+$",), choices=SHARE_CHOICES
    ),
    "ttl": KeySpec("duration", "ttl_s", "a duration such as 90s, 10m, 2h, 1d or 1h30m", "2h", 28, ("^[%ddhms]+$",)),
    "wait": KeySpec(
        "duration",
        "wait_s",
        "how long to wait before degrading to min, a duration such as 10m or 1h30m",
        "10m",
        28,
        ("^[%ddhms]+$",),
    ),
    "engine": KeySpec(
        "enum", "engine", "one of " + ", ".join(ENGINE_CHOICES), "vllm", 6, ("^%l+$",), choices=ENGINE_CHOICES
    ),
    "shards": KeySpec(
        "int",
        "shards",
        f"the shard count job_submit asked Slurm for, from 1 to {MAX_SHARDS}",
        "12",
        6,
        ("^%d+$",),
        1,
        MAX_SHARDS,
        canonical_only=True,
        user_hint="shards= is set by job_submit; ask for vram= instead",
    ),
}

USER_KEYS: Final = tuple(k for k, ks in KEYS.items() if not ks.canonical_only)
_ENUM_TYPES: Final[Mapping[str, Callable[[str], Any]]] = {"share": Share, "engine": Engine}
_EXAMPLE = "gpuarb: vram=6GiB prio=batch"

# ---------------------------------------------------------------------------------------- helpers


def quote(text: str, limit: int = QUOTE_MAX_CHARS) -> str:
    """``text`` in single quotes, safe for a terminal or a log line.

    Non-printable and non-ASCII characters are escaped as ``ascii()`` does (``'\\x00'``,
    ``'\\uff16'``), and at most ``limit`` characters of output are kept; a longer text ends in ``…``.
    """
    out: list[str] = []
    used = 0
    for ch in text:
        piece = ch if " " <= ch <= "~" else ascii(ch)[1:-1]
        if used + len(piece) > limit:
            out.append("…")
            break
        out.append(piece)
        used += len(piece)
    return "'" + "".join(out) + "'"


def _suggest(word: str, choices: Collection[str]) -> str:
    """``"; did you mean 'x'?"`` when something is close, else ``""``."""
    close = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {quote(close[0])}?" if close else ""


def _bad(key: str, token: str, detail: str) -> LeaseSpecError:
    return LeaseSpecError(f"bad {key}= value in {quote(token)}: {detail}")


# ---------------------------------------------------------------------------------------- values


def _parse_size(key: str, ks: KeySpec, value: str, token: str) -> Vram:
    if value.endswith("%"):
        m = PERCENT_RE.fullmatch(value)
        assert ks.lo is not None and ks.hi is not None
        if m is None or not ks.lo <= int(m.group(1)) <= ks.hi:
            raise _bad(key, token, f"a percent is a whole number from {ks.lo} to {ks.hi} followed by %, e.g. 25%")
        return Vram(percent=int(m.group(1)))
    if SIZE_RE.fullmatch(value) is None:
        raise _bad(key, token, f"expected {ks.help}")
    try:
        # Safe to let units quote the value: it is short and printable ASCII by now.
        return Vram(mib=parse_size_mib(value))
    except UnitError as e:
        raise _bad(key, token, str(e)) from e


def _parse_int(key: str, ks: KeySpec, value: str, token: str) -> int:
    assert ks.lo is not None and ks.hi is not None
    if INT_RE.fullmatch(value) is None or not ks.lo <= int(value) <= ks.hi:
        raise _bad(key, token, f"expected {ks.help}")
    return int(value)


def _parse_value(key: str, ks: KeySpec, value: str, token: str) -> Any:
    """The typed value for one token, or a LeaseSpecError that quotes it."""
    if len(value) > ks.max_len:
        # A near-miss such as engine=pytorch is still worth a suggestion; difflib stays cheap on short words.
        hint = _suggest(value, ks.choices) if ks.kind == "enum" and len(value) <= QUOTE_MAX_CHARS else ""
        raise _bad(
            key,
            token,
            f"the value is too long ({len(value)} characters; at most {ks.max_len}); expected {ks.help}{hint}",
        )
    kind = ks.kind
    if kind == "size":
        return _parse_size(key, ks, value, token)
    if kind == "int":
        return _parse_int(key, ks, value, token)
    if kind == "enum":
        if value not in ks.choices:
            raise _bad(key, token, f"expected {ks.help}{_suggest(value, ks.choices)}")
        return _ENUM_TYPES[key](value)
    if kind == "duration":
        if DURATION_RE.fullmatch(value) is None:
            raise _bad(key, token, f"expected {ks.help}")
        try:
            return parse_duration_s(value)
        except UnitError as e:
            raise _bad(key, token, str(e)) from e
    if kind == "mig":
        if value in ks.choices or MIG_RE.fullmatch(value) is not None:
            return value
        lowered = value.lower()
        hint = f"; did you mean {quote(lowered)}?" if lowered != value and MIG_RE.fullmatch(lowered) else ""
        raise _bad(key, token, f"expected {ks.help}{hint}")
    if kind == "name":
        if NAME_RE.fullmatch(value) is None:
            lowered = value.lower()
            hint = f"; did you mean {quote(lowered)}?" if NAME_RE.fullmatch(lowered) else ""
            raise _bad(key, token, f"expected {ks.help}{hint}")
        return value
    raise AssertionError(f"KEYS[{key!r}] has unknown kind {kind!r}")


# ---------------------------------------------------------------------------------------- parsing


def _check_characters(body: str) -> None:
    """Refuse non-ASCII and control characters, quoting the token that holds the first one."""
    ascii_ok = body.isascii()
    if ascii_ok and CONTROL_RE.search(body) is None:
        return
    for token in SEPARATOR_RE.split(body):
        for ch in token:
            if not ch.isascii():
                raise LeaseSpecError(
                    f"{quote(token)} contains {quote(ch)}, which is not ASCII; only ASCII is accepted in a lease spec"
                    " (write digits, units and names in plain ASCII, e.g. vram=6GiB)"
                )
            if not " " <= ch <= "~":
                raise LeaseSpecError(
                    f"{quote(token)} contains the control character {quote(ch)}; only printable ASCII is accepted,"
                    " with spaces or commas between tokens"
                )
    raise AssertionError("unreachable: a bad character was found but no token holds it")


def _unknown_key(key: str, canonical: bool) -> LeaseSpecError:
    valid = tuple(KEYS) if canonical else USER_KEYS
    hint = _suggest(key, valid) or "; valid keys are " + ", ".join(valid)
    return LeaseSpecError(f"unknown key {quote(key)}{hint}")


def parse_body(body: str, *, canonical: bool) -> LeaseSpec:
    """Parse the text after the marker. ``canonical`` is True for the ``gpuarb/1:`` form.

    Raises :class:`LeaseSpecError` with a message that quotes the offending token.
    """
    if len(body) > MAX_BODY_CHARS:
        raise LeaseSpecError(f"lease spec too long ({len(body)} characters; at most {MAX_BODY_CHARS})")
    _check_characters(body)
    tokens = [t for t in SEPARATOR_RE.split(body) if t]
    if not tokens:
        raise LeaseSpecError(f"empty lease spec; write key=value tokens after the marker, e.g. {_EXAMPLE}")
    if len(tokens) > MAX_TOKENS:
        raise LeaseSpecError(
            f"lease spec has too many tokens ({len(tokens)}; at most {MAX_TOKENS}); give each key once, e.g. {_EXAMPLE}"
        )
    seen: dict[str, str] = {}
    values: dict[str, Any] = {}
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq:
            raise LeaseSpecError(
                f"{quote(token)} is not a key=value token (e.g. vram=6GiB); separate tokens with spaces or commas"
            )
        if not key:
            raise LeaseSpecError(f"{quote(token)} has no key before '='; write key=value, e.g. vram=6GiB")
        ks = KEYS.get(key) if KEY_RE.fullmatch(key) else None
        if ks is None:
            raise _unknown_key(key, canonical)
        if ks.canonical_only and not canonical:
            raise LeaseSpecError(f"{quote(token)}: {ks.user_hint}")
        if key in seen:
            raise LeaseSpecError(
                f"{quote(token)} repeats {key}= (first given as {quote(seen[key])}); give each key once"
            )
        seen[key] = token
        if not value:
            raise LeaseSpecError(f"{quote(token)} has an empty value; {key} is {ks.help}")
        values[ks.field] = _parse_value(key, ks, value, token)
    spec = LeaseSpec(**values)
    _check_combination(spec, seen)
    return spec


def _check_combination(spec: LeaseSpec, tokens: Mapping[str, str]) -> None:
    """Rules that involve more than one key."""
    if spec.vram is None and spec.mig is None:
        raise LeaseSpecError(f"missing vram=…; e.g. vram=6GiB (or mig=1g.10gb for a MIG slice), as in {_EXAMPLE}")
    if spec.min is not None:
        if spec.vram is None:
            raise LeaseSpecError(
                f"{quote(tokens['min'])} needs vram= (min is the floor vram may be degraded to);"
                " e.g. vram=8GiB min=4GiB"
            )
        lo, hi = spec.min, spec.vram
        # A percent and an absolute size can only be compared on a given GPU: the arbiter does that.
        if (lo.mib is not None and hi.mib is not None and lo.mib > hi.mib) or (
            lo.percent is not None and hi.percent is not None and lo.percent > hi.percent
        ):
            raise LeaseSpecError(
                f"{quote(tokens['min'])} is larger than {quote(tokens['vram'])}; min is the floor vram may be"
                " degraded to, so it must not exceed vram"
            )
    if spec.mig is not None and spec.gpus is not None and spec.gpus > 1:
        raise LeaseSpecError(
            f"{quote(tokens['mig'])} with {quote(tokens['gpus'])}: a lease gets one MIG slice; drop gpus= or ask"
            " for whole GPUs without mig="
        )


def _find_marker(regex: re.Pattern[str], comment: str) -> re.Match[str] | None:
    for m in regex.finditer(comment):
        start = m.start()
        if start == 0 or comment[start - 1] in MARKER_BOUNDARY:
            return m
    return None


def parse(comment: str | None) -> LeaseSpec | None:
    """The lease in a job comment, or ``None`` when the comment carries no ``gpuarb:`` marker.

    Accepts the user form (``gpuarb: vram=6GiB``) and the canonical form job_submit writes
    (``gpuarb/1: vram=6144MiB shards=12``). Raises :class:`LeaseSpecError` for a malformed spec,
    an unsupported version or a wrongly-cased marker.
    """
    if not comment:
        return None
    m = _find_marker(MARKER_RE, comment)
    if m is None:
        # Only a comment holding "gpuarb" in some other case pays for the case-insensitive pass.
        if comment.lower().count("gpuarb") > comment.count("gpuarb"):
            wrong = _find_marker(MARKER_ANYCASE_RE, comment)
            if wrong is not None:
                raise LeaseSpecError(
                    f"lease marker {quote(wrong.group(0))} must be lower-case: write {MARKER} (e.g. {_EXAMPLE})"
                )
        return None
    marker = m.group(0)
    version = m.group(1)
    canonical = version is not None
    if canonical and (VERSION_RE.fullmatch(version) is None or int(version) not in SUPPORTED_VERSIONS):
        readable = ", ".join([MARKER] + [f"gpuarb/{v}:" for v in SUPPORTED_VERSIONS])
        raise LeaseSpecError(
            f"unsupported lease spec version {quote(marker)}; this code reads {readable}"
            " (is job_submit.lua from a newer gpuarb?)"
        )
    return parse_body(comment[m.end() :], canonical=canonical)


# ---------------------------------------------------------------------------------------- formatting


def _format_value(ks: KeySpec, value: Any) -> str:
    if ks.kind == "size":
        assert isinstance(value, Vram)
        return format_size(value.mib) if value.mib is not None else f"{value.percent}%"
    if ks.kind == "duration":
        return format_duration(int(value))
    if ks.kind == "enum":
        return str(value)  # StrEnum: its value
    return str(value)


def format_spec(spec: LeaseSpec, *, canonical: bool = True) -> str:
    """The spec as text: ``gpuarb/1: vram=6144MiB gpus=1 prio=batch …``.

    Keys come in :data:`KEYS` order, only those that are set; sizes in whole MiB, percents as
    ``N%``, durations via :func:`units.format_duration`. With ``canonical=False`` the marker is
    ``gpuarb:`` and ``shards`` is left out (a user spec may not carry it). The spec is not
    validated: format a spec that :func:`parse` produced (or built with the same limits), and
    ``parse(format_spec(spec)) == spec``.
    """
    parts = [CANONICAL_MARKER if canonical else MARKER]
    for key, ks in KEYS.items():
        value = getattr(spec, ks.field)
        if value is None or (ks.canonical_only and not canonical):
            continue
        parts.append(f"{key}={_format_value(ks, value)}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------- policy


def check_classes(spec: LeaseSpec, classes: Collection[str]) -> None:
    """Raise :class:`LeaseSpecError` when ``spec.prio`` is set and is not one of ``classes``.

    The parser does not know the policy; callers that do (job_submit rendering, the arbiter's
    front door) call this with the configured class names.
    """
    if spec.prio is None or spec.prio in classes:
        return
    names = sorted(classes)
    hint = _suggest(spec.prio, names)
    listing = ", ".join(names) if names else "(none configured)"
    raise LeaseSpecError(
        f"unknown priority class {quote(spec.prio)} in prio={spec.prio}{hint}; configured classes: {listing}"
    )
