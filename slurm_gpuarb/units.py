"""Human units for memory sizes and durations, shared by the spec parser and the config loader.

Sizes: ``MiB``/``GiB``/``TiB`` are binary; ``MB``/``GB``/``TB`` are decimal (SI) and are
converted exactly, rounding *up* to a whole MiB (asking for 6GB never yields less than
6×10⁹ bytes). Units are case-insensitive (``6gib`` = ``6GiB``); a bare number is refused,
because a missing unit is the commonest sizing mistake. Only ASCII digits count: a
lookalike such as ``６`` (fullwidth) is an error, not a six.

Durations: ``90s``, ``10m``, ``2h``, ``1d`` and compounds such as ``1h30m``.
"""

from __future__ import annotations

import re

# bytes per unit, keys lower-case
SIZE_UNITS: dict[str, int] = {
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
SIZE_UNITS_HELP = "MiB, GiB, TiB, MB, GB or TB"
MAX_SIZE_MIB = 4 * 1024 * 1024  # 4 TiB: larger than any GPU by an order of magnitude

_SIZE_RE = re.compile(r"([0-9]{1,9})(?:\.([0-9]{1,3}))?([A-Za-z]{2,3})", re.ASCII)
_DURATION_RE = re.compile(r"(?:[0-9]{1,6}[dhms]){1,4}", re.ASCII)
_DURATION_PART_RE = re.compile(r"([0-9]{1,6})([dhms])", re.ASCII)
_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
MAX_DURATION_S = 366 * 86400


class UnitError(ValueError):
    """A size or duration that cannot be read; the message says what was expected."""


def _q(text: str, limit: int = 40) -> str:
    """User text for an error message: escaped (repr) and cut, so it is safe in a terminal or a log."""
    shown = text if len(text) <= limit else text[:limit] + "…"
    return repr(shown)


def parse_size_mib(text: str) -> int:
    """``"6GiB"`` → 6144; ``"1.5GiB"`` → 1536; ``"6GB"`` → 5723 (rounded up). Raises UnitError."""
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise UnitError(f"{_q(text)} is not a size (expected a number and a unit, {SIZE_UNITS_HELP}, e.g. 6GiB)")
    whole, frac, unit = m.groups()
    per = SIZE_UNITS.get(unit.lower())
    if per is None:
        raise UnitError(f"{_q(text)} has an unknown unit {_q(unit)} (expected {SIZE_UNITS_HELP})")
    scale = 10 ** len(frac) if frac else 1
    numerator = (int(whole) * scale + (int(frac) if frac else 0)) * per
    mib = -(-numerator // (scale << 20))  # ceil division
    if mib <= 0:
        raise UnitError(f"{_q(text)} is zero (a size must be at least 1MiB)")
    if mib > MAX_SIZE_MIB:
        raise UnitError(f"{_q(text)} is absurdly large (at most {MAX_SIZE_MIB // (1 << 20)}TiB)")
    return mib


def format_size(mib: int) -> str:
    """Canonical, lossless: always whole MiB (``6144MiB``)."""
    return f"{mib}MiB"


def human_size(mib: int) -> str:
    """For people: ``6GiB``, ``10.8GiB``, ``512MiB``."""
    if mib >= 1024:
        gib = mib / 1024
        return f"{gib:.0f}GiB" if mib % 1024 == 0 else f"{gib:.1f}GiB"
    return f"{mib}MiB"


def parse_duration_s(text: str) -> int:
    """``"90s"`` → 90, ``"1h30m"`` → 5400. Each unit at most once, largest first. Raises UnitError."""
    if _DURATION_RE.fullmatch(text) is None:
        raise UnitError(f"{_q(text)} is not a duration (expected e.g. 90s, 10m, 2h, 1d or 1h30m)")
    seen: list[str] = []
    total = 0
    for num, unit in _DURATION_PART_RE.findall(text):
        if seen and "dhms".index(unit) <= "dhms".index(seen[-1]):
            raise UnitError(f"{_q(text)} repeats or misorders its units (write them largest first, e.g. 1h30m)")
        seen.append(unit)
        total += int(num) * _DURATION_UNITS[unit]
    if total <= 0:
        raise UnitError(f"{_q(text)} is zero (a duration must be at least 1s)")
    if total > MAX_DURATION_S:
        raise UnitError(f"{_q(text)} is longer than a year")
    return total


def format_duration(seconds: int) -> str:
    """Canonical and lossless: ``5400`` → ``1h30m``, ``90`` → ``1m30s``."""
    out = []
    rest = seconds
    for unit in "dhms":
        n, rest = divmod(rest, _DURATION_UNITS[unit])
        if n:
            out.append(f"{n}{unit}")
    return "".join(out) or "0s"
