"""Render the Slurm side of an inventory: every file ``gpuarb render --out DIR`` writes.

All arithmetic happens in Python, where it is unit-tested: shard counts, GRES sums, partition
tiers, device files, QoS order, MIG placement. The jinja2 templates under ``templates/etc/``
only format what was computed (``StrictUndefined``: a missing value is an error, never an
empty string); their paths mirror the install paths, and a site directory may override any of
them by the same relative path (``etc/slurm/gres.conf.j2``).

Files (relative to ``--out``):

=================================  ===================================================================
``gres.conf``                      every node's GPUs, shards, MPS and MIG devices
``slurm.conf.part``                appended to the cluster's base ``slurm.conf``: ``GresTypes``,
                                   ``SelectType``, preemption, plugins, hooks, nodes, partitions
``gpuarb-qos.sh``                  the idempotent ``sacctmgr`` script (:mod:`slurm_gpuarb.qos`);
                                   not with ``accounting=False`` (no slurmdbd)
``nvidia-mig-manager/config.yaml`` a mig-parted config per node with MIG-capable GPUs
                                   (:mod:`slurm_gpuarb.migplan`)
``gres-map/<node>.json``           Slurm GRES index → GPU / MIG UUID, for nodes rendered from a
                                   discovery file (the Prolog's map)
``job_submit.lua``,                when :mod:`slurm_gpuarb.lua` is installed (``render_lua``); the
``cli_filter.lua``                 slurm.conf part then names the plugins
=================================  ===================================================================

Slurm 22.05 facts this module relies on (checked against Debian's 22.05.8 build):

* Debian's Slurm has no NVML autodetection (no ``gpu_nvml.so``), so ``gres.conf`` says
  ``AutoDetect=off`` and lists every device file (``autodetect="nvml"`` for other builds).
* A shard GPU is ``Name=shard Count=N File=/dev/nvidiaK`` per GPU; a job's shards always
  come from one GPU, so the per-GPU count is what bounds a lease. One shard is one
  quantum of VRAM (``policy.quantum``).
* A MIG instance is ``Name=gpu Type=<profile> MultipleFiles=/dev/nvidia<minor>,
  /dev/nvidia-caps/nvidia-cap<GI>,/dev/nvidia-caps/nvidia-cap<CI>``. Those numbers exist only on
  the node, so they come from ``gpuarb discover`` (:mod:`slurm_gpuarb.discover`), never from a
  planned layout. With ``AutoDetect=off`` a node's GRES index k is its k-th ``gpu`` line, in the
  order written here (a MIG GPU's instances in NVML's enumeration order); ``slurmd -N NODE -G``
  shows the index Slurm gave each line. (``AutoDetect=nvml`` merges and re-sorts the lines.)
* ``slurm.conf``'s ``Gres=`` is the per-node sum of each GRES (``gpu:a100:2,shard:154``).
* Preemption requeues or cancels; ``SUSPEND`` is refused (a suspended job keeps its GPU
  memory). ``PreemptType`` is written only when told whether slurmdbd runs
  (``accounting``): ``preempt/qos`` with it, ``preempt/partition_prio`` without.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Final

import jinja2

from . import migplan, qos
from .config import Config, load
from .discover import Discovery, load_dir
from .errors import CapacityError, GpuArbError, RenderError

# The planning half lives in gresplan; its names stay importable from here (``render.plan_node``).
from .gresplan import (
    MPS_COUNT_PER_GPU,
    SHIM_NAMES,
    GresDevice,
    HookPaths,
    NodeAddressing,
    NodePlan,
    PartitionPlan,
    Plan,
    ShardBudget,
    gres_map,
    gres_type,
    mig_layout,
    plan,
    plan_node,
    plan_partitions,
    shard_budget,
    static_reservations_mib,
)

__all__ = [
    "MPS_COUNT_PER_GPU",
    "SHIM_NAMES",
    "GresDevice",
    "HookPaths",
    "NodeAddressing",
    "NodePlan",
    "PartitionPlan",
    "Plan",
    "RenderOptions",
    "Rendered",
    "ShardBudget",
    "build",
    "default_template_dirs",
    "gres_map",
    "gres_type",
    "main",
    "mig_layout",
    "plan",
    "plan_node",
    "plan_partitions",
    "render_all",
    "render_gres_conf",
    "render_slurm_conf_part",
    "shard_budget",
    "static_reservations_mib",
]

GRES_CONF = "etc/slurm/gres.conf.j2"
SLURM_CONF_PART = "etc/slurm/slurm.conf.j2"
QOS_SCRIPT = "etc/slurm/gpuarb-qos.sh.j2"
MIG_PARTED = "etc/nvidia-mig-manager/config.yaml.j2"
# What render_all writes, relative to its output directory.
OUT_GRES: Final = "gres.conf"
OUT_PART: Final = "slurm.conf.part"
OUT_QOS: Final = "gpuarb-qos.sh"
OUT_MIG: Final = "nvidia-mig-manager/config.yaml"
OUT_GRES_MAP: Final = "gres-map/{node}.json"
GRES_TYPES = ("gpu", "shard", "mps")
AUTODETECT: Final = ("off", "nvml")


@dataclass(frozen=True)
class RenderOptions:
    """How to render, besides the inventory. Every default renders what the test cluster loads.

    ``discovery`` maps node names to what ``gpuarb discover`` found there (needed for every node
    with a real MIG GPU; optional elsewhere, where it supplies the ``/dev/nvidiaN`` minors).
    ``accounting``: True when slurmdbd runs (``PreemptType=preempt/qos``,
    ``AccountingStoreFlags=job_comment``, the QoS script), False without it
    (``preempt/partition_prio``, no QoS script), None to leave ``PreemptType`` to the base
    ``slurm.conf``. ``lua``: None renders the Lua plugins when :mod:`slurm_gpuarb.lua` can be
    imported, True requires them, False leaves them (and their plugin lines) out.
    ``privileged_accounts``: the accounts allowed to use the QoS of classes that preempt others
    (None: every user).
    """

    dev_dir: str = "/dev"
    hooks: HookPaths | None = None
    addressing: NodeAddressing | None = None
    template_dir: str | os.PathLike[str] | None = None
    discovery: Mapping[str, Discovery] = field(default_factory=dict)
    autodetect: str = "off"
    accounting: bool | None = None
    preempt_mode: str = "REQUEUE"
    grace_time_s: int = 60
    privileged_accounts: tuple[str, ...] | None = None
    lua: bool | None = None


# --------------------------------------------------------------------------- templates


def default_template_dirs() -> tuple[Path, ...]:
    """Where the shipped templates are: the source checkout's ``templates/`` (an editable install),
    else ``<prefix>/share/slurm-gpuarb/templates``, where a wheel puts them (pyproject's data-files)."""
    here = Path(__file__).resolve().parent
    shared = Path(sys.prefix) / "share" / "slurm-gpuarb" / "templates"
    return tuple(d for d in (here.parent / "templates", shared) if (d / GRES_CONF).is_file())


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


# --------------------------------------------------------------------------- formatting


def _format_gres(p: Plan, opts: RenderOptions) -> str:
    if opts.autodetect not in AUTODETECT:
        raise RenderError(f"AutoDetect={opts.autodetect[:20]!r} is not one of {', '.join(AUTODETECT)}")
    return _render(GRES_CONF, opts.template_dir, nodes=[n for n in p.nodes if n.devices], autodetect=opts.autodetect)


def _format_part(p: Plan, opts: RenderOptions, lua: bool) -> str:
    addr = opts.addressing or NodeAddressing()
    nodes = [NodePlan(n.name, n.devices, n.gres, addr.params(i)) for i, n in enumerate(p.nodes)]
    mode = opts.preempt_mode.upper()  # plan() has refused anything but REQUEUE and CANCEL
    preempt_type, why = "", ""
    if opts.accounting is True:
        preempt_type, why = "preempt/qos", "slurmdbd runs: a QoS preempts the QoS in its Preempt= list (gpuarb-qos.sh)"
    elif opts.accounting is False:
        preempt_type, why = "preempt/partition_prio", "no slurmdbd: a partition of higher PriorityTier preempts lower"
    return _render(SLURM_CONF_PART, opts.template_dir, gres_types=",".join(GRES_TYPES),
                   hooks=(opts.hooks or HookPaths()).lines(), nodes=nodes, partitions=p.partitions,
                   preempt_type=preempt_type, preempt_type_why=why, preempt_mode=mode,
                   preempt_verb="cancelled" if mode == "CANCEL" else "requeued",
                   accounting=bool(opts.accounting), lua=lua)


def _format_qos(cfg: Config, opts: RenderOptions) -> str:
    q = qos.plan_qos(cfg.policy, preempt_mode=opts.preempt_mode, grace_time_s=opts.grace_time_s,
                     privileged_accounts=opts.privileged_accounts)
    rows = [{"name": s.name, "priority": s.priority, "preempt": ",".join(s.preempt), "preempt_mode": s.preempt_mode,
             "grace_time_s": s.grace_time_s, "classes": ",".join(s.classes)} for s in q.qos]
    return _render(QOS_SCRIPT, opts.template_dir, qos=rows, open_qos=",".join(q.open_qos),
                   privileged_qos=",".join(q.privileged_qos), privileged_accounts=list(q.privileged_accounts),
                   privileged_accounts_csv=",".join(q.privileged_accounts), default_qos=q.default_qos,
                   all_qos=", ".join(s.name for s in q.qos))


def _format_mig(cfg: Config, opts: RenderOptions) -> str | None:
    try:
        configs = migplan.node_configs(cfg)
    except CapacityError as e:
        raise RenderError("the nvidia-mig-parted config cannot be rendered") from e
    if not configs:
        return None
    rows = [{"name": c.name, "entries": [{
        "devices": ", ".join(map(str, e.devices)), "enabled": "true" if e.mig_enabled else "false",
        "counts": list(e.layout.counts().items()) if e.layout else [],
        "placement": e.layout.describe() if e.layout else "",
    } for e in c.entries]} for c in configs]
    return _render(MIG_PARTED, opts.template_dir, configs=rows)


def _lua_files(cfg: Config, opts: RenderOptions) -> dict[str, str] | None:
    """``job_submit.lua`` and ``cli_filter.lua`` from :mod:`slurm_gpuarb.lua`, or None when that
    module is not installed (or does not import) and ``opts.lua`` is not True. The Lua maps a
    class to its QoS only where slurmdbd runs (``accounting=True``)."""
    wanted = opts.lua
    if wanted is False:
        return None
    try:
        module = importlib.import_module(f"{__package__}.lua")
        render_lua = module.render_lua
    except Exception as e:  # absent or broken: the Lua plugins are optional unless asked for
        if wanted:
            raise RenderError("the Lua plugins were asked for, but slurm_gpuarb.lua cannot be imported") from e
        return None
    # Pass only the options this version of render_lua takes (it is developed alongside).
    accepted = inspect.signature(render_lua).parameters
    given = {"use_qos": opts.accounting is True, "template_dir": opts.template_dir}
    files = dict(render_lua(cfg, **{k: v for k, v in given.items() if k in accepted}))
    for name in files:
        if PurePosixPath(name).name != name or not name.endswith(".lua"):
            raise RenderError(f"slurm_gpuarb.lua rendered {name!r}; expected plain *.lua file names")
    return files


@dataclass(frozen=True)
class Rendered:
    """A whole render: the plan it came from and the files, by path relative to the output directory."""

    plan: Plan
    files: Mapping[str, str]


def build(cfg: Config, opts: RenderOptions | None = None) -> Rendered:
    """Render every file for ``cfg`` in memory (nothing is written; see :func:`render_all`)."""
    o = opts or RenderOptions()
    p = plan(cfg, dev_dir=o.dev_dir, discovery=o.discovery, preempt_mode=o.preempt_mode)
    lua = _lua_files(cfg, o)
    files = {OUT_GRES: _format_gres(p, o), OUT_PART: _format_part(p, o, lua is not None)}
    if o.accounting is not False:
        files[OUT_QOS] = _format_qos(cfg, o)
    mig = _format_mig(cfg, o)
    if mig is not None:
        files[OUT_MIG] = mig
    for n in p.nodes:
        if n.name in o.discovery:
            files[OUT_GRES_MAP.format(node=n.name)] = json.dumps(gres_map(n, o.autodetect), indent=2) + "\n"
    files.update(lua or {})
    return Rendered(p, files)


def _options(options: RenderOptions | None, **given: Any) -> RenderOptions:
    # The keyword arguments of the older API win over options when they are given.
    return replace(options or RenderOptions(), **{k: v for k, v in given.items() if v is not None})


def render_gres_conf(cfg: Config, *, dev_dir: str | None = None, template_dir: str | os.PathLike[str] | None = None,
                     options: RenderOptions | None = None) -> str:
    """``gres.conf`` for every node of the inventory (``AutoDetect=off`` by default, every device listed)."""
    o = _options(options, dev_dir=dev_dir, template_dir=template_dir)
    return _format_gres(plan(cfg, dev_dir=o.dev_dir, discovery=o.discovery, preempt_mode=o.preempt_mode), o)


def render_slurm_conf_part(cfg: Config, *, hooks: HookPaths | None = None, addressing: NodeAddressing | None = None,
                           template_dir: str | os.PathLike[str] | None = None, options: RenderOptions | None = None,
                           lua: bool = False) -> str:
    """The inventory's part of ``slurm.conf``: append it to the cluster's base file.

    ``hooks`` None renders no hook lines (a cluster without the hooks installed yet); ``lua``
    adds the Lua plugin lines (:func:`build` sets it when it renders the Lua files)."""
    o = _options(options, hooks=hooks, addressing=addressing, template_dir=template_dir)
    return _format_part(plan(cfg, dev_dir=o.dev_dir, discovery=o.discovery, preempt_mode=o.preempt_mode), o, lua)


def render_all(cfg: Config, out_dir: str | os.PathLike[str], options: RenderOptions | None = None, *,
               dev_dir: str | None = None, hooks: HookPaths | None = None, addressing: NodeAddressing | None = None,
               template_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Write every file of :func:`build` into ``out_dir``; returns the paths written.

    Everything is rendered before anything is written, and each file is replaced
    atomically, so a failed render never leaves a half-written config behind."""
    o = _options(options, dev_dir=dev_dir, hooks=hooks, addressing=addressing, template_dir=template_dir)
    files = build(cfg, o).files
    out = Path(out_dir)
    try:
        written = []
        for name, text in files.items():
            path = out / name
            path.parent.mkdir(parents=True, exist_ok=True)
            written.append(_write_atomic(path, text, 0o755 if name.endswith(".sh") else 0o644))
        return written
    except OSError as e:
        raise RenderError(f"could not write the rendered files to {out}; check that it is a writable directory") from e


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)  # slurm.conf's directory is world-readable; these hold no secrets
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- python -m slurm_gpuarb.render


def main(argv: Sequence[str] | None = None) -> int:
    """Render the Slurm files from an inventory (the twin of ``gpuarb render``, without --check)."""
    ap = argparse.ArgumentParser(prog="python -m slurm_gpuarb.render", description=main.__doc__)
    ap.add_argument("--config", required=True, help="the inventory (gpuarb.toml)")
    ap.add_argument("--out", required=True, help="directory for gres.conf, slurm.conf.part and the rest")
    ap.add_argument("--dev-dir", default="/dev", help="device directory; {node} becomes the node name")
    ap.add_argument("--templates", default=None, help="site template directory (overrides by relative path)")
    ap.add_argument("--hooks-dir", default=None, help="install root holding the prolog/ and epilog/ shims")
    ap.add_argument("--node-hostname", default=None, help="NodeHostname= on every node line (one-host clusters)")
    ap.add_argument("--node-addr", default=None, help="NodeAddr= on every node line")
    ap.add_argument("--port-base", type=int, default=None, help="Port= of the first node, +1 for each next one")
    ap.add_argument("--discovery", default=None, help="directory of <node>.json files from gpuarb discover")
    args = ap.parse_args(argv)
    try:
        cfg = load(args.config)
        opts = RenderOptions(
            dev_dir=args.dev_dir, template_dir=args.templates,
            hooks=HookPaths.at(args.hooks_dir, installed_only=True) if args.hooks_dir else None,
            addressing=NodeAddressing(args.node_hostname, args.node_addr, args.port_base),
            discovery=load_dir(args.discovery, [n.name for n in cfg.nodes]) if args.discovery else {})
        for path in render_all(cfg, args.out, opts):
            print(path)
    except GpuArbError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
