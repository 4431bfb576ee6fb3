"""The config's inventory: ``[[nodes]]`` (and their ``gpus``) and ``[[partitions]]``.

Split from :mod:`.config`, which documents every key and calls :func:`parse_inventory` from
``load()``. The same strictness applies: unknown keys are refused with a did-you-mean, and every
error names the file, the key path, what was expected, what was found and the fix. A GPU's mode is
its own ``mode``, else the non-``whole`` mode of the partitions holding its node (they must agree),
else ``whole``.

Like :mod:`.config`, this module is on the hooks' path (the in-process fallback loads the config),
so it imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from .config import (
    _GPU_KEYS,
    _NODE_KEYS,
    _PARTITION_KEYS,
    GPU_MODES,
    MAX_GPU_INDEX,
    MIG_LAYOUT_RE,
    NAME_RE,
    TOKEN_RE,
    GpuConfig,
    NodeConfig,
    PartitionConfig,
    _HostlistError,
    _parse_telemetry,
    _Table,
    expand_hostlist,
)

__all__ = ["parse_inventory"]


def _node_names(t: _Table, key: str, value: str) -> list[str]:
    try:
        names = expand_hostlist(value)
    except _HostlistError as e:
        raise t.error(key, "expected a node name or a Slurm hostlist such as dgx[01-16]") from e
    for name in names:
        if NAME_RE.fullmatch(name) is None:
            raise t.error(key, f"{name[:40]!r} is not a node name (expected {NAME_RE.pattern})")
    return names


# --------------------------------------------------------------------------- run-plane settings


def _gpus(t: _Table) -> list[tuple[GpuConfig, bool]]:
    """A node's GPUs, each with whether its mode was written (else the partitions decide)."""
    out: list[tuple[GpuConfig, bool]] = []
    minors: set[int] = set()
    entries = t.tables("gpus", _GPU_KEYS)
    if not entries:
        raise t.error("gpus", 'missing; add gpus = [ { index = 0, sku = "h100-80g" } ]')
    for g in entries:
        index, count = g.integer("index", 0, MAX_GPU_INDEX), g.integer("count", 1, MAX_GPU_INDEX + 1)
        if (index is None) == (count is None):
            raise g.error(None, "give exactly one of index = N (one GPU) or count = N (the next N indices)")
        minor = g.integer("minor", 0, 4095)
        if count is not None and minor is not None:
            raise g.error("minor", "cannot go with count; list those GPUs one by one with index and minor")
        sku = g.name("sku", TOKEN_RE, "a SKU name such as h100-80g")
        mode = g.get("mode", str, "one of whole, shard, mig, mps")
        if mode is not None and mode not in GPU_MODES:
            raise g.error("mode", f"expected one of {', '.join(GPU_MODES)}, found {mode[:40]!r}")
        mig: list[str] = []
        for i, item in enumerate(g.strings("mig", "MIG profile") or []):
            m = MIG_LAYOUT_RE.fullmatch(item)
            if m is None:
                raise g.error(f"mig[{i}]", f"{item[:40]!r} is not a MIG profile such as 1g.10gb or 7x1g.10gb")
            mig += [m.group(2)] * int(m.group(1) or 1)
        if mig and mode not in (None, "mig"):
            raise g.error("mig", f'a MIG layout needs mode = "mig" (this GPU is {mode})')
        first = index if index is not None else max((c.index + 1 for c, _ in out), default=0)
        for i in range(first, first + (count or 1)):
            if i > MAX_GPU_INDEX or any(c.index == i for c, _ in out):
                raise g.error("index" if count is None else "count", f"GPU index {i} is declared twice or too high")
            out.append((GpuConfig(i, sku, mode or "whole", minor, tuple(mig)), mode is not None))
        if minor is not None:
            if minor in minors:
                raise g.error("minor", f"/dev/nvidia{minor} is declared twice on this node")
            minors.add(minor)
    return out


def parse_inventory(top: _Table, classes: Sequence[str]) -> tuple[tuple[NodeConfig, ...], tuple[PartitionConfig, ...]]:
    nodes: dict[str, tuple[str | None, list[tuple[GpuConfig, bool]]]] = {}
    for t in top.tables("nodes", _NODE_KEYS):
        names = _node_names(t, "name", t.need("name", str, 'a node name, e.g. name = "ws1"'))
        telemetry = t.get("telemetry", str, "a telemetry backend")
        if telemetry is not None:
            _parse_telemetry(telemetry, t.where("telemetry"))
        gpus = _gpus(t)
        for name in names:
            if name in nodes:
                raise t.error("name", f"node {name!r} is declared twice")
            nodes[name] = (telemetry, gpus)
    partitions: list[PartitionConfig] = []
    for t in top.tables("partitions", _PARTITION_KEYS):
        name = t.name("name", NAME_RE, "a partition name")
        if any(p.name == name for p in partitions):
            raise t.error("name", f"partition {name!r} is declared twice")
        members: list[str] = []
        for i, entry in enumerate(t.strings("nodes", "node name") or []):
            for node in _node_names(t, f"nodes[{i}]", entry):
                if node not in nodes:
                    raise t.error(f"nodes[{i}]", f"node {node!r} is not declared; add a [[nodes]] entry for it")
                if node in members:
                    raise t.error(f"nodes[{i}]", f"node {node!r} is listed twice")
                members.append(node)
        if not members:
            raise t.error("nodes", 'missing; add nodes = ["n1", "n2"] (names of [[nodes]] entries)')
        allowed = t.strings("classes", "class name")
        if allowed == []:
            raise t.error("classes", "is empty, so no job could use this partition; leave it out to allow every class")
        for i, c in enumerate(allowed or []):
            if c not in classes:
                raise t.error(f"classes[{i}]", f"{c[:40]!r} is not a declared class (declared: {', '.join(classes)})")
        default = bool(t.get("default", bool, "true or false"))
        if default and any(p.default for p in partitions):
            raise t.error("default", "another partition is already the default; Slurm allows one")
        partitions.append(PartitionConfig(name, tuple(members), t.choice("mode", GPU_MODES, "whole"),
                                          tuple(classes if allowed is None else dict.fromkeys(allowed)), default))
    return _resolve_modes(top, nodes, partitions), tuple(partitions)


def _compatible(partition_mode: str, gpu_mode: str) -> bool:
    # Slurm still hands out a shard/mps GPU whole (gres/gpu); a MIG GPU only as its instances.
    return partition_mode == gpu_mode or (partition_mode == "whole" and gpu_mode in ("shard", "mps"))


def _resolve_modes(top: _Table, nodes: Mapping[str, tuple[str | None, list[tuple[GpuConfig, bool]]]],
                   partitions: Sequence[PartitionConfig]) -> tuple[NodeConfig, ...]:
    out = []
    for name, (telemetry, gpus) in nodes.items():
        implied = {p.mode: p.name for p in partitions if name in p.nodes and p.mode != "whole"}
        if len(implied) > 1 and not all(given for _, given in gpus):
            raise top.error("partitions", f"node {name!r} is in partitions {' and '.join(implied.values())} with "
                                          f"modes {' and '.join(implied)}; set mode on each of its gpus")
        mode = next(iter(implied), "whole")
        resolved = tuple(g if given else replace(g, mode=mode) for g, given in gpus)
        for g in resolved:
            if g.mig and g.mode != "mig":
                raise top.error("nodes", f"node {name!r} GPU {g.index} has a MIG layout but is in mode {g.mode}")
        for i, p in enumerate(partitions):
            if name in p.nodes and not any(_compatible(p.mode, g.mode) for g in resolved):
                raise top.error(f"partitions[{i}].mode", f"partition {p.name!r} is {p.mode} but node {name!r} has no "
                                                         f"GPU in that mode ({', '.join(g.mode for g in resolved)})")
        out.append(NodeConfig(name, telemetry, resolved))
    return tuple(out)


# --------------------------------------------------------------------------- loading
