"""MIG layouts that a GPU can really hold: placement, not only instance counts.

A seven-slice GPU (A100, H100, H200) has 7 compute slices and a grid of 8 memory slots. Each
GPU-instance profile may start only at certain slots and spans a fixed number of them
(``nvidia-smi mig -lgipp``: ``3g.40gb`` is ``{0,4}:4``, ``1g.10gb`` is ``{0..6}:1``, so slot 7
is never a ``1g.10gb``). A layout fits when its compute slices add up to at most 7, each profile
stays within its maximum instance count, and every instance gets an allowed start with no
overlap. ``skus.MigProfile.placements``/``size`` hold the table.

:func:`plan` turns requests (a profile, or a memory size that becomes the smallest profile
holding it, each with a count) into a placed :class:`MigLayout`, or a :class:`CapacityError`
that says which rule refused it. :func:`node_configs` gives each node of the inventory its
nvidia-mig-parted config (``mig-configs.gpuarb-<node>``), which ``gpuarb render`` writes to
``nvidia-mig-manager/config.yaml``: apply it with
``nvidia-mig-parted apply -f /etc/nvidia-mig-manager/config.yaml -c gpuarb-<node>``.

Examples (H100 80GB): ``3g.40gb`` + ``3g.40gb`` fits (slots 0 and 4); ``4g.40gb`` + ``3g.40gb``
fits (0 and 4); ``4g.40gb`` × 2 does not (one instance at most, and only at slot 0);
``1g.10gb`` × 7 fits (0..6); ``2g.20gb`` × 3 + ``1g.10gb`` fits (0, 2, 4 and 6).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from . import skus
from .config import Config
from .errors import CapacityError
from .units import UnitError, parse_size_mib

__all__ = [
    "COMPUTE_SLICES",
    "MEMORY_SLOTS",
    "MigLayout",
    "NodeMigConfig",
    "PartedEntry",
    "Placed",
    "Request",
    "check",
    "node_configs",
    "parse_request",
    "plan",
]

COMPUTE_SLICES: Final = 7
MEMORY_SLOTS: Final = 8
_REQUEST_RE: Final = re.compile(r"(?:([1-9][0-9]?)\s*[x×]\s*)?(\S+)", re.ASCII)

#: (profile name or MiB of memory, instance count)
Request = tuple[str | int, int]


@dataclass(frozen=True)
class Placed:
    """One instance of a layout: its profile and the memory slots it occupies."""

    profile: str
    start: int
    size: int
    compute_slices: int
    memory_mib: int

    def __str__(self) -> str:
        return f"{self.profile}@{self.start}"


@dataclass(frozen=True)
class MigLayout:
    """A placed MIG layout of one GPU, instances ordered by start slot."""

    sku: str
    instances: tuple[Placed, ...]

    @property
    def compute_slices(self) -> int:
        return sum(p.compute_slices for p in self.instances)

    @property
    def memory_slots(self) -> int:
        return sum(p.size for p in self.instances)

    def counts(self) -> dict[str, int]:
        """``{profile: count}``, largest profile first (the ``mig-devices`` map of mig-parted)."""
        order = sorted(self.instances, key=lambda p: (-p.size, -p.compute_slices, p.start))
        return dict(Counter(p.profile for p in order))

    def describe(self) -> str:
        """``3g.40gb@0 3g.40gb@4`` — each instance with its start slot."""
        return " ".join(str(p) for p in self.instances)

    def diagram(self) -> str:
        """The 8 memory slots as letters, one per instance in start order (``aaaabbbb``); ``.`` is unused."""
        cells = ["."] * MEMORY_SLOTS
        for n, p in enumerate(self.instances):
            for s in range(p.start, p.start + p.size):
                cells[s] = chr(ord("a") + n)
        return "".join(cells)


def parse_request(text: str) -> Request:
    """``"2x1g.10gb"`` → ``("1g.10gb", 2)``; ``"20GiB"`` → ``(20480, 1)``; ``"3x12GiB"`` → ``(12288, 3)``."""
    m = _REQUEST_RE.fullmatch(text.strip())
    if m is None:
        raise CapacityError(f"{text[:40]!r} is not a MIG request (expected PROFILE, SIZE, NxPROFILE or NxSIZE, "
                            "e.g. 1g.10gb, 20GiB, 2x3g.40gb)")
    count = int(m.group(1) or 1)
    what = m.group(2).lower()
    if what[:1].isdigit() and "g." not in what:
        try:
            return parse_size_mib(m.group(2)), count
        except UnitError as e:
            raise CapacityError(f"{text[:40]!r} is not a MIG request (a size such as 20GiB or a profile such as "
                                "1g.10gb)") from e
    return what, count


def _profiles(s: skus.Sku, requests: Sequence[Request]) -> list[skus.MigProfile]:
    out: list[skus.MigProfile] = []
    for what, count in requests:
        if count < 1:
            raise CapacityError(f"a MIG request needs a count of at least 1, got {count} for {what}")
        p = skus.smallest_mig_profile(s, what) if isinstance(what, int) else skus.mig_profile(s, what)
        out += [p] * count
    return out


def _refuse_counts(s: skus.Sku, profiles: Sequence[skus.MigProfile], asked: str) -> None:
    for name, n in Counter(p.name for p in profiles).items():
        p = skus.mig_profile(s, name)
        if n > p.max_instances:
            raise CapacityError(f"{asked} does not fit {s.display_name}: it holds at most {p.max_instances} × "
                                f"{p.name}, asked for {n}; ask for fewer or smaller instances")
    compute = sum(p.compute_slices for p in profiles)
    memory = sum(p.memory_slices for p in profiles)
    if compute > COMPUTE_SLICES or memory > MEMORY_SLOTS:
        raise CapacityError(f"{asked} does not fit {s.display_name}: it needs {compute} of {COMPUTE_SLICES} compute "
                            f"and {memory} of {MEMORY_SLOTS} memory slices; ask for fewer or smaller instances")


def plan(sku: str | skus.Sku, requests: Sequence[Request]) -> MigLayout:
    """A layout of ``sku`` holding every request, with a valid start slot for each instance.

    A request is ``(profile name, count)`` or ``(MiB, count)``: a size becomes the smallest
    profile that holds it (:func:`skus.smallest_mig_profile`). Larger instances are placed first
    and each takes its lowest free allowed start; a dead end backtracks, so any layout the
    placement rules allow is found. Raises :class:`CapacityError` naming the rule that refuses
    the request: an unknown profile, too many of one profile, too many compute or memory
    slices, or no free allowed start for some instance.
    """
    s = skus.sku(sku) if isinstance(sku, str) else sku
    if not requests:
        raise CapacityError("a MIG layout needs at least one instance, e.g. 7x1g.10gb")
    profiles = _profiles(s, requests)
    asked = " + ".join(f"{n} × {name}" if n > 1 else name for name, n in Counter(p.name for p in profiles).items())
    _refuse_counts(s, profiles, asked)
    # Most constrained first: big instances, then those with few allowed starts.
    order = sorted(profiles, key=lambda p: (-p.size, len(p.placements), p.name))
    placed: list[Placed] = []
    deepest: tuple[list[Placed], skus.MigProfile | None] = ([], None)

    def fill(i: int, used: int) -> bool:
        nonlocal deepest
        if i == len(order):
            return True
        p = order[i]
        for start in p.placements:
            mask = ((1 << p.size) - 1) << start
            if start + p.size <= MEMORY_SLOTS and not used & mask:
                placed.append(Placed(p.name, start, p.size, p.compute_slices, p.memory_mib))
                if fill(i + 1, used | mask):
                    return True
                placed.pop()
        if i >= len(deepest[0]):
            deepest = (list(placed), p)
        return False

    if not fill(0, 0):
        done, stuck = deepest
        assert stuck is not None
        taken = ", ".join(f"{q.profile} at slots {q.start}-{q.start + q.size - 1}" for q in done) or "nothing"
        raise CapacityError(
            f"{asked} does not fit {s.display_name}: with {taken} placed, no {stuck.name} can be placed "
            f"(it may start only at slot {', '.join(map(str, stuck.placements))} and spans {stuck.size} of the "
            f"{MEMORY_SLOTS} memory slots); ask for fewer or smaller instances")
    return MigLayout(s.key, tuple(sorted(placed, key=lambda q: q.start)))


def check(sku: str | skus.Sku, profiles: Sequence[str]) -> MigLayout:
    """:func:`plan` for a layout written one profile per instance (the inventory's ``mig = [...]``)."""
    return plan(sku, [(name, 1) for name in profiles])


# --------------------------------------------------------------------------- nvidia-mig-parted


@dataclass(frozen=True)
class PartedEntry:
    """One entry of a mig-parted config: GPUs (NVML indices) that share a MIG state."""

    devices: tuple[int, ...]
    mig_enabled: bool
    layout: MigLayout | None = None  # None when MIG is disabled


@dataclass(frozen=True)
class NodeMigConfig:
    """A node's named mig-parted config (``gpuarb-<node>``)."""

    name: str
    node: str
    entries: tuple[PartedEntry, ...]


def node_configs(cfg: Config) -> list[NodeMigConfig]:
    """One mig-parted config per node with a MIG-capable GPU, in inventory order.

    MIG-mode GPUs get their inventory layout (placement-checked); the node's other MIG-capable
    GPUs get ``mig-enabled: false``, so applying the config also turns off MIG where the
    inventory says shard, MPS or whole. GPUs with the same state share one entry.
    """
    out = []
    for node in cfg.nodes:
        groups: dict[tuple[bool, tuple[str, ...]], list[int]] = {}
        layouts: dict[tuple[bool, tuple[str, ...]], MigLayout | None] = {}
        for gpu in node.gpus:
            s = skus.sku(gpu.sku)
            if not s.mig_capable:
                continue
            key = (gpu.mode == "mig", gpu.mig if gpu.mode == "mig" else ())
            if key not in layouts:
                try:
                    layouts[key] = check(s, gpu.mig) if key[0] else None
                except CapacityError as e:
                    raise CapacityError(f"node {node.name} gpu {gpu.index}: its MIG layout cannot be applied") from e
            groups.setdefault(key, []).append(gpu.index)
        if groups:
            entries = tuple(PartedEntry(tuple(ix), key[0], layouts[key]) for key, ix in groups.items())
            out.append(NodeMigConfig(f"gpuarb-{node.name}", node.name, entries))
    return out
