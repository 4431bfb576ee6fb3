"""Per-SKU GPU tables: memory totals, the driver's typical reserve, and MIG profiles.

These are *defaults*. Live telemetry (NVML ``nvmlDeviceGetMemoryInfo_v2``: ``total`` and
``reserved``) always wins over the table; the table serves the renderer (shard counts for
``gres.conf`` before a node has ever run), the fake telemetry presets, and MIG profile
selection. Every number is in MiB as NVML reports it, never a marketing "GB".

Sources, so that a number can be re-checked:

- Totals: ``nvidia-smi`` / NVML ``memory.total`` on recent drivers (R535+), e.g.
  H100 80GB HBM3 = 81559, H200 = 143771, H100 NVL = 95830, RTX 3090 Ti / 4090 = 24564.
- Driver reserve: ``nvidia-smi -q`` → ``FB Memory Usage / Reserved``. It varies with the
  driver (328–551 MiB seen on H100 80GB HBM3); where no sample was found the value is
  marked *assumed* in the table.
- MIG profiles: NVIDIA's MIG user guide ("Supported MIG Profiles") for names, instance
  counts and placements; memory as ``nvidia-smi mig -lgip`` (NVML
  ``nvmlGpuInstanceProfileInfo_t.memorySizeMB``) prints it. These memory sizes move a little
  between driver branches (A100-80GB ``7g.80gb`` has been printed as 78.50–79.25 GiB):
  the MIG telemetry of a live GPU is authoritative, the table is the planning value.
- Placements are on the 8-slot memory grid of ``nvidia-smi mig -lgipp`` (``{0,4}:4`` for a
  3g profile): ``placements`` are the allowed start slots, ``size`` the slots one instance
  spans. The ``+me`` (media extension) variants are left out: same memory, one instance.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .errors import CapacityError

__all__ = [
    "SKUS",
    "MigProfile",
    "Sku",
    "mig_profile",
    "shards_for",
    "shards_needed",
    "sku",
    "sku_for_nvml_name",
    "smallest_mig_profile",
    "usable_mib",
]

# A live GPU whose NVML total differs from the table by more than this is not that SKU
# (an "RTX 3060" exists with 8 GiB as well as 12 GiB; an H100 with 94 GiB is not an H100 80GB).
_TOTAL_TOLERANCE = 0.05


@dataclass(frozen=True)
class MigProfile:
    """One MIG GPU-instance profile of a SKU (a row of ``nvidia-smi mig -lgip``)."""

    name: str  # "1g.10gb"
    memory_mib: int
    max_instances: int
    compute_slices: int  # of 7
    memory_slices: int  # of 8
    placements: tuple[int, ...]  # allowed start slots on the 8-slot grid
    size: int  # slots one instance spans

    def __str__(self) -> str:
        return f"{self.name} ({self.memory_mib}MiB, up to {self.max_instances})"


@dataclass(frozen=True)
class Sku:
    """One GPU model. ``nvml_names`` are regular expressions searched (case-insensitively) in
    the NVML device name (``nvmlDeviceGetName``)."""

    key: str
    display_name: str
    nvml_names: tuple[str, ...]
    total_mib: int
    reserved_mib: int
    mig_profiles: tuple[MigProfile, ...] = ()

    @property
    def mig_capable(self) -> bool:
        return bool(self.mig_profiles)

    def profile(self, name: str) -> MigProfile | None:
        """The profile called ``name`` (``"1g.10gb"``, ``"MIG 1g.10gb"``), or None."""
        wanted = _normalise_profile_name(name)
        for p in self.mig_profiles:
            if p.name == wanted:
                return p
        return None


def _normalise_profile_name(name: str) -> str:
    # NVML and nvidia-smi print "MIG 1g.10gb"; users and gres.conf write "1g.10gb".
    text = name.strip().lower()
    if text.startswith("mig"):
        text = text[3:].lstrip(" -_")
    return text


def _seven_slice_family(*sizes: tuple[str, int]) -> tuple[MigProfile, ...]:
    """The profile geometry shared by A100, H100 and H200 (7 compute slices, 8 memory slots).

    ``sizes`` gives (name, memory_mib) for, in order: 1g small, 1g large, 2g, 3g, 4g, 7g.
    """
    # (max instances, compute slices, memory slices, start slots, slot size), from the MIG
    # user guide and `nvidia-smi mig -lgipp` (e.g. "Profile ID 15 Placements: {0,2,4,6}:2").
    geometry = (
        (7, 1, 1, (0, 1, 2, 3, 4, 5, 6), 1),
        (4, 1, 2, (0, 2, 4, 6), 2),
        (3, 2, 2, (0, 2, 4), 2),
        (2, 3, 4, (0, 4), 4),
        (1, 4, 4, (0,), 4),
        (1, 7, 8, (0,), 8),
    )
    if len(sizes) != len(geometry):
        raise ValueError("a seven-slice MIG family needs exactly six profiles")
    return tuple(
        MigProfile(name, mib, count, compute, memory, starts, size)
        for (name, mib), (count, compute, memory, starts, size) in zip(sizes, geometry, strict=True)
    )


_SKU_LIST: tuple[Sku, ...] = (
    Sku(
        key="rtx3060-12g",
        display_name="NVIDIA GeForce RTX 3060 12GB",
        nvml_names=(r"\bRTX 3060(?!\s*(?:Ti|Laptop))",),
        total_mib=12288,
        reserved_mib=83,  # one `nvidia-smi -q` sample (driver R545); GeForce reserves less than HBM parts
    ),
    Sku(
        key="rtx3090-24g",
        display_name="NVIDIA GeForce RTX 3090",
        nvml_names=(r"\bRTX 3090(?!\s*Ti)",),
        total_mib=24576,
        reserved_mib=316,  # `nvidia-smi -q` samples: 309–355 MiB
    ),
    Sku(
        key="rtx3090ti-24g",
        display_name="NVIDIA GeForce RTX 3090 Ti",
        nvml_names=(r"\bRTX 3090\s*Ti\b",),
        total_mib=24564,
        reserved_mib=354,  # assumed like the RTX 4090 (same 24564 MiB total); no sample found
    ),
    Sku(
        key="rtx4090-24g",
        display_name="NVIDIA GeForce RTX 4090",
        nvml_names=(r"\bRTX 4090(?!\s*Laptop)",),
        total_mib=24564,
        reserved_mib=354,  # `nvidia-smi -q` sample (driver R545)
    ),
    Sku(
        key="a100-40g",
        display_name="NVIDIA A100 40GB",
        nvml_names=(r"\bA100\b.*\b40\s*GB", r"\bA100\b"),
        total_mib=40960,
        reserved_mib=512,  # assumed (~0.5 GiB like the other HBM parts); no sample found
        mig_profiles=_seven_slice_family(
            ("1g.5gb", 4864),
            ("1g.10gb", 9856),
            ("2g.10gb", 9856),
            ("3g.20gb", 19968),
            ("4g.20gb", 19968),
            ("7g.40gb", 40192),
        ),
    ),
    Sku(
        key="a100-80g",
        display_name="NVIDIA A100 80GB",
        nvml_names=(r"\bA100\b.*\b80\s*GB", r"\bA100\b"),
        total_mib=81920,
        reserved_mib=557,  # `nvidia-smi -q` samples: 557–834 MiB
        mig_profiles=_seven_slice_family(
            ("1g.10gb", 9728),
            ("1g.20gb", 19968),
            ("2g.20gb", 19968),
            ("3g.40gb", 40192),
            ("4g.40gb", 40192),
            ("7g.80gb", 80896),  # 79.00 GiB, the commonest -lgip value (78.50–79.25 seen)
        ),
    ),
    Sku(
        key="h100-80g",
        display_name="NVIDIA H100 80GB",
        nvml_names=(r"\bH100\b(?!\s*NVL)",),
        total_mib=81559,
        reserved_mib=512,  # ~0.5 GiB; `nvidia-smi -q` samples: 328–551 MiB depending on driver
        mig_profiles=_seven_slice_family(
            ("1g.10gb", 9984),
            ("1g.20gb", 20096),
            ("2g.20gb", 20096),
            ("3g.40gb", 40448),
            ("4g.40gb", 40448),
            ("7g.80gb", 81152),
        ),
    ),
    Sku(
        key="h100-nvl-94g",
        display_name="NVIDIA H100 NVL 94GB",
        nvml_names=(r"\bH100\s*NVL\b",),
        total_mib=95830,
        reserved_mib=512,  # assumed like the H100 80GB; no sample found
        mig_profiles=_seven_slice_family(  # -lgip on driver R560: 10.75 / 21.62 / 46.38 / 93.12 GiB
            ("1g.12gb", 11008),
            ("1g.24gb", 22144),
            ("2g.24gb", 22144),
            ("3g.47gb", 47488),
            ("4g.47gb", 47488),
            ("7g.94gb", 95360),
        ),
    ),
    Sku(
        key="h200-141g",
        display_name="NVIDIA H200 141GB",
        nvml_names=(r"\bH200\b",),
        total_mib=143771,
        reserved_mib=512,  # assumed like the H100 80GB; no sample found
        mig_profiles=_seven_slice_family(
            # Only 3g/4g (69.75 GiB: a CUDA totalMemory of 74,893,492,224 bytes on a 3g.71gb
            # slice) is confirmed; 1g/2g follow the H100 NVL ratios and 7g is total less the
            # ~0.4 GiB the other Hopper parts keep back. Estimates: re-check with -lgip.
            ("1g.18gb", 16384),
            ("1g.35gb", 33280),
            ("2g.35gb", 33280),
            ("3g.71gb", 71424),
            ("4g.71gb", 71424),
            ("7g.141gb", 143360),
        ),
    ),
)

SKUS: Mapping[str, Sku] = MappingProxyType({s.key: s for s in _SKU_LIST})

_NAME_PATTERNS: tuple[tuple[Sku, tuple[re.Pattern[str], ...]], ...] = tuple(
    (s, tuple(re.compile(p, re.IGNORECASE) for p in s.nvml_names)) for s in _SKU_LIST
)


def sku(key: str) -> Sku:
    """The SKU called ``key`` (case-insensitive). Raises CapacityError naming the known keys."""
    found = SKUS.get(key.strip().lower())
    if found is not None:
        return found
    known = ", ".join(SKUS)
    close = difflib.get_close_matches(key.strip().lower(), list(SKUS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise CapacityError(f"unknown GPU SKU '{key}' (known: {known}){hint}")


def sku_for_nvml_name(name: str, total_mib: int | None = None) -> Sku | None:
    """The SKU an NVML device name (``"NVIDIA H100 80GB HBM3"``) belongs to, or None.

    With ``total_mib`` (NVML's ``memory.total``) a candidate whose table total is more than 5 %
    away is rejected, and among several candidates the closest total wins; without it, the
    candidate whose pattern matched the longest part of the name wins. A name that stays
    ambiguous (``"NVIDIA A100-PCIE"`` without a total) gives None: never guess a memory size.
    """
    scored: list[tuple[Sku, int]] = []
    for s, patterns in _NAME_PATTERNS:
        best = 0
        for pattern in patterns:
            m = pattern.search(name)
            if m is not None:
                best = max(best, m.end() - m.start())
        if not best:
            continue
        if total_mib is not None and abs(total_mib - s.total_mib) > s.total_mib * _TOTAL_TOLERANCE:
            continue
        scored.append((s, best))
    if not scored:
        return None
    if len(scored) == 1:
        return scored[0][0]
    if total_mib is not None:
        scored.sort(key=lambda item: abs(total_mib - item[0].total_mib))
        first, second = scored[0][0], scored[1][0]
        return first if abs(total_mib - first.total_mib) < abs(total_mib - second.total_mib) else None
    scored.sort(key=lambda item: item[1], reverse=True)
    return scored[0][0] if scored[0][1] > scored[1][1] else None


def _profile_list(s: Sku) -> str:
    return ", ".join(str(p) for p in s.mig_profiles)


def mig_profile(s: Sku, name: str) -> MigProfile:
    """The profile ``name`` of ``s``; CapacityError listing the SKU's profiles otherwise."""
    if not s.mig_profiles:
        raise CapacityError(f"{s.display_name} ({s.key}) has no MIG; use a vram= lease instead of mig={name}")
    found = s.profile(name)
    if found is None:
        raise CapacityError(f"'{name}' is not a MIG profile of {s.display_name} (it has: {_profile_list(s)})")
    return found


def smallest_mig_profile(s: Sku, need_mib: int, *, only: str | None = None) -> MigProfile:
    """The smallest MIG profile of ``s`` with at least ``need_mib`` of memory.

    "Smallest" is by memory, then by compute slices, so 11 GiB on an H100 is ``1g.20gb``
    (not ``2g.20gb``, which would take a compute slice more for the same memory).
    ``only`` (a profile name; ``None`` or ``"any"`` for no restriction) limits the choice to
    that profile. Raises CapacityError, listing the profiles, when nothing fits.
    """
    if need_mib <= 0:
        raise CapacityError(f"a MIG lease needs a positive size, got {need_mib}MiB")
    if only is not None and only.strip().lower() != "any":
        profile = mig_profile(s, only)
        if profile.memory_mib < need_mib:
            raise CapacityError(
                f"MIG profile {profile.name} of {s.display_name} has {profile.memory_mib}MiB, less than the "
                f"{need_mib}MiB asked for; ask for a larger profile (it has: {_profile_list(s)}) or less memory"
            )
        return profile
    if not s.mig_profiles:
        raise CapacityError(f"{s.display_name} ({s.key}) has no MIG; use a vram= lease instead of mig=")
    fitting = [p for p in s.mig_profiles if p.memory_mib >= need_mib]
    if not fitting:
        largest = max(s.mig_profiles, key=lambda p: p.memory_mib)
        raise CapacityError(
            f"no MIG profile of {s.display_name} holds {need_mib}MiB (the largest, {largest.name}, has "
            f"{largest.memory_mib}MiB; profiles: {_profile_list(s)}); ask for at most {largest.memory_mib}MiB"
        )
    return min(fitting, key=lambda p: (p.memory_mib, p.compute_slices))


def _check_quantum(quantum_mib: int) -> None:
    if quantum_mib <= 0:
        raise CapacityError(f"the shard quantum must be a positive number of MiB, got {quantum_mib}")


def shards_for(usable_mib: int, quantum_mib: int) -> int:
    """How many whole shards of ``quantum_mib`` fit in ``usable_mib`` (rounded down)."""
    _check_quantum(quantum_mib)
    if usable_mib < 0:
        raise CapacityError(f"usable memory cannot be negative, got {usable_mib}MiB")
    return usable_mib // quantum_mib


def shards_needed(need_mib: int, quantum_mib: int) -> int:
    """How many shards of ``quantum_mib`` a lease of ``need_mib`` takes (rounded up: never less)."""
    _check_quantum(quantum_mib)
    if need_mib < 0:
        raise CapacityError(f"a lease size cannot be negative, got {need_mib}MiB")
    return -(-need_mib // quantum_mib)


def usable_mib(total_mib: int, reserved_mib: int, margin_mib: int, reservations_mib: int | Iterable[int] = 0) -> int:
    """total − driver reserve − safety margin − standing reservations, never below zero."""
    standing = reservations_mib if isinstance(reservations_mib, int) else sum(reservations_mib)
    for label, value in (
        ("total", total_mib),
        ("reserved", reserved_mib),
        ("margin", margin_mib),
        ("reservations", standing),
    ):
        if value < 0:
            raise CapacityError(f"{label} memory cannot be negative, got {value}MiB")
    return max(0, total_mib - reserved_mib - margin_mib - standing)
