"""Render the Slurm side of an inventory: ``gres.conf`` and the ``slurm.conf`` part.

All arithmetic happens here, in Python, where it is unit-tested: shard counts, GRES
sums, partition tiers, device files. The jinja2 templates under ``templates/etc/slurm/``
only format what this module computed (``StrictUndefined``: a missing value is an
error, never an empty string). A site directory may override any template by the same
relative path (``etc/slurm/gres.conf.j2``).

The ``slurm.conf`` part is meant to be appended to a cluster's own base ``slurm.conf``
(ports, paths, munge, cgroup, accounting). It carries what the inventory decides:
``GresTypes``, ``SelectType``, ``PrologFlags``, the hook programs, one ``NodeName`` line
per node with its ``Gres=`` and one ``PartitionName`` line per partition.

Slurm 22.05 facts this module relies on (checked against Debian's 22.05.8 build):

* Debian's Slurm has no NVML autodetection (no ``gpu_nvml.so``), so ``gres.conf`` says
  ``AutoDetect=off`` and lists every device file.
* A shard GPU is ``Name=shard Count=N File=/dev/nvidiaK`` per GPU; a job's shards always
  come from one GPU, so the per-GPU count is what bounds a lease. One shard is one
  quantum of VRAM (``policy.quantum``).
* ``slurm.conf``'s ``Gres=`` is the per-node sum of each GRES (``gpu:a100:2,shard:154``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from . import skus
from .config import GPU_MODES, Config, GpuConfig, NodeConfig, load, telemetry_for
from .errors import CapacityError, GpuArbError, RenderError
from .model import Policy, Reservation

GRES_CONF = "etc/slurm/gres.conf.j2"
SLURM_CONF_PART = "etc/slurm/slurm.conf.j2"
GRES_TYPES = ("gpu", "shard", "mps")
MPS_COUNT_PER_GPU = 100  # gres/mps counts percent of one GPU's compute

# Names Slurm reads as one token: no spaces, '#', '=', ',' or ':' (they split GRES specs).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
# A path as slurm.conf/gres.conf can hold it: absolute, no whitespace, no '#' (starts a comment).
_PATH_RE = re.compile(r"/[^\s#,]*", re.ASCII)
_MEM_SUFFIX_RE = re.compile(r"-\d+g$")


# --------------------------------------------------------------------------- computed plan


@dataclass(frozen=True)
class ShardBudget:
    """How one GPU's shard count follows from its memory (all MiB; usable never below zero)."""

    total_mib: int
    reserved_mib: int
    margin_mib: int
    static_reservations_mib: int
    quantum_mib: int

    @property
    def usable_mib(self) -> int:
        return skus.usable_mib(self.total_mib, self.reserved_mib, self.margin_mib, self.static_reservations_mib)

    @property
    def count(self) -> int:
        return skus.shards_for(self.usable_mib, self.quantum_mib)

    def explain(self) -> str:
        return (f"{self.total_mib} total - {self.reserved_mib} driver - {self.margin_mib} margin"
                f" - {self.static_reservations_mib} reserved = {self.usable_mib} MiB"
                f" / {self.quantum_mib} MiB = {self.count} shards")


@dataclass(frozen=True)
class GresDevice:
    """One ``gres.conf`` line: a GRES bound to one device file."""

    name: str  # gpu | shard | mps
    file: str
    type: str | None = None
    count: int | None = None
    note: str = ""  # a comment line above it (why the count is what it is)


@dataclass(frozen=True)
class NodePlan:
    """Everything rendered for one node."""

    name: str
    devices: tuple[GresDevice, ...]
    gres: str  # slurm.conf ``Gres=`` value, "" for a CPU node
    params: str = ""  # cluster-local node parameters (NodeHostname=… Port=…)


@dataclass(frozen=True)
class PartitionPlan:
    name: str
    nodes: str
    default: bool
    priority_tier: int
    preempt_mode: str  # REQUEUE (a class is preemptible) | OFF
    classes: str
    mode: str


@dataclass(frozen=True)
class HookPaths:
    """Absolute paths of the installed hook programs; ``None`` leaves that hook out.

    Slurm runs Prolog, Epilog and the Slurmctld variants with no ``PATH``: these must be
    absolute. ``PrologEpilogTimeout`` is only a backstop (Slurm's default is 65534 s); the
    hooks keep their own, shorter deadline.
    """

    prolog: str | None = None
    epilog: str | None = None
    task_prolog: str | None = None
    prolog_slurmctld: str | None = None
    epilog_slurmctld: str | None = None
    health_check: str | None = None
    health_check_interval_s: int = 60
    prolog_epilog_timeout_s: int = 60

    @classmethod
    def at(cls, root: str | os.PathLike[str], *, installed_only: bool = False) -> HookPaths:
        """Every shim under ``root`` (its ``prolog/`` and ``epilog/`` folders) by its conventional
        name (:data:`SHIM_NAMES`). ``installed_only`` leaves out the shims not there (yet)."""
        base = Path(root)

        def pick(key: str) -> str | None:
            path = base / SHIM_NAMES[key]
            return str(path) if not installed_only or path.is_file() else None

        return cls(prolog=pick("prolog"), epilog=pick("epilog"), task_prolog=pick("task_prolog"),
                   prolog_slurmctld=pick("prolog_slurmctld"), epilog_slurmctld=pick("epilog_slurmctld"),
                   health_check=pick("health_check"))

    def lines(self) -> list[tuple[str, str]]:
        """``(slurm.conf key, value)`` pairs for the hooks that are set."""
        keys = (("Prolog", self.prolog), ("Epilog", self.epilog), ("TaskProlog", self.task_prolog),
                ("PrologSlurmctld", self.prolog_slurmctld), ("EpilogSlurmctld", self.epilog_slurmctld),
                ("HealthCheckProgram", self.health_check))
        out = [(k, _check_path(v, k)) for k, v in keys if v is not None]
        if out:
            out.append(("PrologEpilogTimeout", str(self.prolog_epilog_timeout_s)))
        if self.health_check is not None:
            # ANY: also idle nodes, where a foreign VRAM holder is found before a job lands.
            out += [("HealthCheckInterval", str(self.health_check_interval_s)), ("HealthCheckNodeState", "ANY")]
        return out


# Shim file names relative to the install root (the repo's prolog/ and epilog/ folders).
SHIM_NAMES: Mapping[str, str] = {
    "prolog": "prolog/gpuarb-prolog",
    "task_prolog": "prolog/gpuarb-task-prolog",
    "prolog_slurmctld": "prolog/gpuarb-prolog-slurmctld",
    "health_check": "prolog/gpuarb-health-check",
    "epilog": "epilog/gpuarb-epilog",
    "epilog_slurmctld": "epilog/gpuarb-epilog-slurmctld",
}


@dataclass(frozen=True)
class NodeAddressing:
    """Cluster-local node parameters for the ``NodeName`` lines.

    A real cluster resolves node names and needs none of these. The loopback test cluster
    runs every slurmd on one host: each node line then names the host, the address and a
    port of its own (``port_base`` + the node's position in the inventory).
    """

    hostname: str | None = None
    addr: str | None = None
    port_base: int | None = None

    def params(self, position: int) -> str:
        parts = []
        if self.hostname is not None:
            parts.append(f"NodeHostname={_check_name(self.hostname, 'node hostname')}")
        if self.addr is not None:
            parts.append(f"NodeAddr={_check_name(self.addr, 'node address')}")
        if self.port_base is not None:
            parts.append(f"Port={self.port_base + position}")
        return " ".join(parts)


# --------------------------------------------------------------------------- arithmetic


def gres_type(sku_key: str) -> str:
    """The GRES type for a SKU: its key without the memory suffix (``a100-80g`` → ``a100``).

    Slurm matches ``--gres=gpu:<type>:N`` against it; the memory size is what leases
    express, so GPUs of one family share a type."""
    t = _MEM_SUFFIX_RE.sub("", sku_key.lower())
    if not _NAME_RE.fullmatch(t) or t.isdigit():
        raise RenderError(f"SKU '{sku_key}' gives no usable GRES type '{t}' (Slurm needs a non-numeric name "
                          "of letters, digits, '.', '-' or '_'); fix the sku key in the inventory")
    return t


def static_reservations_mib(reservations: Iterable[Reservation], node: str, gpu: int) -> int:
    """MiB of static standing reservations on one GPU (``node=None`` means every node).

    Holder-mode reservations are held by a job at run time, so they are not subtracted."""
    return sum(r.size_mib for r in reservations
               if r.mode == "static" and r.gpu == gpu and (r.node is None or r.node == node))


def shard_budget(sku_key: str, policy: Policy, static_reservations: int = 0) -> ShardBudget:
    """The shard count of one GPU: (total − driver reserve − margin − static reservations) // quantum."""
    try:
        s = skus.sku(sku_key)
    except CapacityError as e:
        raise RenderError("the inventory names a GPU SKU this version does not know") from e
    return ShardBudget(s.total_mib, s.reserved_mib, policy.margin_mib, static_reservations, policy.quantum_mib)


# --------------------------------------------------------------------------- planning


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.fullmatch(value):
        raise RenderError(f"{what} '{value}' cannot be written to a Slurm config (use letters, digits, '.', '-', '_')")
    return value


def _check_path(value: str, what: str) -> str:
    if not _PATH_RE.fullmatch(value):
        raise RenderError(f"{what} path '{value}' cannot be written to a Slurm config "
                          "(it must be absolute, without spaces, commas or '#')")
    return value


def _device_file(dev_dir: str, node: str, number: int) -> str:
    # "{node}" lets several slurmd on one host each see their own fake devices.
    return _check_path(f"{dev_dir.replace('{node}', node).rstrip('/')}/nvidia{number}", f"device of node {node}")


def plan_node(node: NodeConfig, cfg: Config, *, dev_dir: str = "/dev") -> NodePlan:
    """The GRES of one node: its ``gres.conf`` devices and its ``slurm.conf`` ``Gres=`` value."""
    name = _check_name(node.name, "node name")
    devices: list[GresDevice] = []
    gpu_counts: dict[str, int] = {}
    shards = 0
    mps = 0
    minors = [g.minor if g.minor is not None else g.index for g in node.gpus]
    # MIG stand-ins are numbered after the node's other devices, in layout order: on a
    # MIG-only node Slurm's GRES index k is then MIG instance k.
    next_standin = max((m for g, m in zip(node.gpus, minors, strict=True) if g.mode != "mig"), default=-1) + 1
    for gpu, minor in zip(node.gpus, minors, strict=True):
        if gpu.mode not in GPU_MODES:
            raise RenderError(f"node {name} gpu {gpu.index}: unknown mode '{gpu.mode}' "
                              f"(expected {', '.join(GPU_MODES)})")
        if gpu.mode == "mig":
            if not telemetry_for(cfg, name).startswith("fake:"):
                # A real MIG instance is MultipleFiles=/dev/nvidiaK,/dev/nvidia-caps/nvidia-capN, known
                # only from discovery on the node; a guessed device file would hand out the wrong GPU.
                raise RenderError(f"node {name} gpu {gpu.index}: gres.conf lines for real MIG instances are not "
                                  "rendered yet; write them by hand (MultipleFiles=) or use fake telemetry")
            for j, profile in enumerate(mig_layout(name, gpu)):
                # Test-cluster stand-ins: one fake device file per MIG instance.
                devices.append(GresDevice("gpu", _device_file(dev_dir, name, next_standin), type=profile,
                                          note=f"gpu{gpu.index} {gpu.sku} MIG instance {j}: {profile}"))
                gpu_counts[profile] = gpu_counts.get(profile, 0) + 1
                next_standin += 1
            continue
        t = gres_type(gpu.sku)
        file = _device_file(dev_dir, name, minor)
        devices.append(GresDevice("gpu", file, type=t, note=f"gpu{gpu.index} {gpu.sku} ({gpu.mode})"))
        gpu_counts[t] = gpu_counts.get(t, 0) + 1
        if gpu.mode == "shard":
            budget = shard_budget(gpu.sku, cfg.policy, static_reservations_mib(cfg.reservations, name, gpu.index))
            if budget.count == 0:
                raise RenderError(f"node {name} gpu {gpu.index} ({gpu.sku}) has no room for one shard: "
                                  f"{budget.explain()}; lower [policy] margin, the quantum or the reservations")
            devices.append(GresDevice("shard", file, count=budget.count, note=f"gpu{gpu.index}: {budget.explain()}"))
            shards += budget.count
        elif gpu.mode == "mps":
            devices.append(GresDevice("mps", file, count=MPS_COUNT_PER_GPU))
            mps += MPS_COUNT_PER_GPU
    gres = [f"gpu:{t}:{n}" for t, n in gpu_counts.items()]
    if shards:
        gres.append(f"shard:{shards}")
    if mps:
        gres.append(f"mps:{mps}")
    return NodePlan(name, tuple(devices), ",".join(gres))


def mig_layout(node: str, gpu: GpuConfig) -> tuple[str, ...]:
    """The MIG profiles of a MIG-mode GPU, checked against its SKU: each profile exists, and
    together they fit the GPU's 7 compute slices and 8 memory slices."""
    if not gpu.mig:
        raise RenderError(f"node {node} gpu {gpu.index} is in MIG mode but has no layout; "
                          'add mig = ["7x1g.10gb"] (one profile per instance) to it')
    try:
        s = skus.sku(gpu.sku)
        profiles = [skus.mig_profile(s, name) for name in gpu.mig]
    except CapacityError as e:
        raise RenderError(f"node {node} gpu {gpu.index}: its MIG layout does not fit its SKU") from e
    compute = sum(p.compute_slices for p in profiles)
    memory = sum(p.memory_slices for p in profiles)
    if compute > 7 or memory > 8:
        raise RenderError(f"node {node} gpu {gpu.index}: MIG layout {', '.join(gpu.mig)} needs {compute} of 7 compute "
                          f"and {memory} of 8 memory slices; use fewer or smaller instances")
    return tuple(_check_name(p.name, f"MIG profile on node {node} gpu {gpu.index}") for p in profiles)


def _check_reservations(cfg: Config) -> None:
    gpus = {(n.name, g.index) for n in cfg.nodes for g in n.gpus}
    for r in cfg.reservations:
        if r.node is not None and (r.node, r.gpu) not in gpus:
            raise RenderError(f"reservation '{r.name}' is on node {r.node} gpu {r.gpu}, which the inventory "
                              "does not have; fix its node/gpu")


def plan_partitions(cfg: Config) -> list[PartitionPlan]:
    """``PartitionName`` lines (config.load has checked their nodes, classes and default).

    A partition is as preemptible as the weakest class it admits: its ``PriorityTier`` ranks
    the lowest class priority among its classes (partition-priority preemption needs only the
    order), and it is requeued when any of its classes is preemptible, never suspended (a
    suspended job keeps its GPU memory)."""
    classes = cfg.policy.classes
    floor = {p.name: min((classes[c].priority for c in p.classes), default=0) for p in cfg.partitions}
    tiers = {prio: i + 1 for i, prio in enumerate(sorted(set(floor.values())))}
    return [PartitionPlan(
        name=_check_name(p.name, "partition name"),
        nodes=",".join(_check_name(n, "node name") for n in p.nodes),
        default=p.default,
        priority_tier=tiers[floor[p.name]],
        preempt_mode="REQUEUE" if any(classes[c].preemptible for c in p.classes) else "OFF",
        classes=",".join(p.classes),
        mode=p.mode,
    ) for p in cfg.partitions]


# --------------------------------------------------------------------------- templates


def default_template_dirs() -> tuple[Path, ...]:
    """Where the shipped templates are: inside the package when installed from a wheel that
    carries them, else the source checkout's ``templates/``."""
    here = Path(__file__).resolve().parent
    return tuple(d for d in (here / "templates", here.parent / "templates") if (d / GRES_CONF).is_file())


def _environment(site_dir: str | os.PathLike[str] | None) -> jinja2.Environment:
    dirs = ([Path(site_dir)] if site_dir is not None else []) + list(default_template_dirs())
    if not dirs:
        raise RenderError("no templates found (the install lacks templates/etc/slurm/); pass a template directory")
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader([str(d) for d in dirs]),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,  # Slurm configs, not HTML: every value was checked by _check_name/_check_path
    )


def _render(template: str, site_dir: str | os.PathLike[str] | None, **context: Any) -> str:
    try:
        return _environment(site_dir).get_template(template).render(**context)
    except jinja2.TemplateError as e:
        raise RenderError(f"template {template} failed to render") from e


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Plan:
    """Everything the templates format, computed once from the inventory."""

    nodes: tuple[NodePlan, ...]
    partitions: tuple[PartitionPlan, ...]


def plan(cfg: Config, *, dev_dir: str = "/dev") -> Plan:
    """Compute every node's GRES and every partition line (raises RenderError on a bad inventory).

    ``dev_dir`` holds the ``nvidiaN`` device files; ``{node}`` in it is replaced by the node
    name (the loopback test cluster gives each node its own fake devices)."""
    _check_reservations(cfg)
    return Plan(tuple(plan_node(n, cfg, dev_dir=dev_dir) for n in cfg.nodes), tuple(plan_partitions(cfg)))


def _format_gres(p: Plan, template_dir: str | os.PathLike[str] | None) -> str:
    return _render(GRES_CONF, template_dir, nodes=[n for n in p.nodes if n.devices])


def _format_part(p: Plan, hooks: HookPaths | None, addressing: NodeAddressing | None,
                 template_dir: str | os.PathLike[str] | None) -> str:
    addr = addressing or NodeAddressing()
    nodes = [NodePlan(n.name, n.devices, n.gres, addr.params(i)) for i, n in enumerate(p.nodes)]
    return _render(SLURM_CONF_PART, template_dir, gres_types=",".join(GRES_TYPES),
                   hooks=(hooks or HookPaths()).lines(), nodes=nodes, partitions=p.partitions)


def render_gres_conf(cfg: Config, *, dev_dir: str = "/dev", template_dir: str | os.PathLike[str] | None = None) -> str:
    """``gres.conf`` for every node of the inventory (``AutoDetect=off``, every device listed)."""
    return _format_gres(plan(cfg, dev_dir=dev_dir), template_dir)


def render_slurm_conf_part(cfg: Config, *, hooks: HookPaths | None = None, addressing: NodeAddressing | None = None,
                           template_dir: str | os.PathLike[str] | None = None) -> str:
    """The inventory's part of ``slurm.conf``: append it to the cluster's base file.

    ``hooks`` None renders no hook lines (a cluster without the hooks installed yet)."""
    return _format_part(plan(cfg), hooks, addressing, template_dir)


def render_all(cfg: Config, out_dir: str | os.PathLike[str], *, dev_dir: str = "/dev",
               hooks: HookPaths | None = None, addressing: NodeAddressing | None = None,
               template_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write ``gres.conf`` and ``slurm.conf.part`` into ``out_dir``; returns the paths written.

    Everything is rendered before anything is written, and each file is replaced
    atomically, so a failed render never leaves a half-written config behind."""
    p = plan(cfg, dev_dir=dev_dir)
    files = {"gres.conf": _format_gres(p, template_dir),
             "slurm.conf.part": _format_part(p, hooks, addressing, template_dir)}
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return [_write_atomic(out / name, text) for name, text in files.items()]
    except OSError as e:
        raise RenderError(f"could not write the rendered files to {out}; check that it is a writable directory") from e


def _write_atomic(path: Path, text: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # slurm.conf's directory is world-readable; these hold no secrets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- python -m slurm_gpuarb.render


def main(argv: Sequence[str] | None = None) -> int:
    """Render gres.conf and slurm.conf.part from an inventory (the twin of ``gpuarb render``)."""
    ap = argparse.ArgumentParser(prog="python -m slurm_gpuarb.render", description=main.__doc__)
    ap.add_argument("--config", required=True, help="the inventory (gpuarb.toml)")
    ap.add_argument("--out", required=True, help="directory for gres.conf and slurm.conf.part")
    ap.add_argument("--dev-dir", default="/dev", help="device directory; {node} becomes the node name")
    ap.add_argument("--templates", default=None, help="site template directory (overrides by relative path)")
    ap.add_argument("--hooks-dir", default=None, help="install root holding the prolog/ and epilog/ shims")
    ap.add_argument("--node-hostname", default=None, help="NodeHostname= on every node line (one-host clusters)")
    ap.add_argument("--node-addr", default=None, help="NodeAddr= on every node line")
    ap.add_argument("--port-base", type=int, default=None, help="Port= of the first node, +1 for each next one")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
        hooks = HookPaths.at(args.hooks_dir, installed_only=True) if args.hooks_dir else None
        addressing = NodeAddressing(args.node_hostname, args.node_addr, args.port_base)
        for path in render_all(cfg, args.out, dev_dir=args.dev_dir, hooks=hooks, addressing=addressing,
                               template_dir=args.templates):
            print(path)
    except GpuArbError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
