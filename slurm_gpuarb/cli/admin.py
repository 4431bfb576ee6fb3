"""The admin plane's commands: ``gpuarb render``, ``gpuarb discover``, ``gpuarb mig plan``.

Registered on the ``gpuarb`` group of :mod:`.commands`, which imports this module last; this
``render`` replaces the shorter one defined there. Each callback parses, calls one library
function, prints the answer and lets the group map errors (``Error: …``, exit 1).
``render --check`` exits 3 when the installed files drifted from the inventory.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import click

from .. import migplan
from ..config import telemetry_for
from ..units import UnitError, parse_duration_s
from . import GpuArbGroup
from .commands import Ctx, _emit_json, cli, json_option, pass_ctx

EXIT_DRIFT = 3  # render --check: the installed files differ from the render


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> int:
    try:
        return parse_duration_s(value)
    except UnitError as e:
        raise click.BadParameter(str(e)) from e


@cli.command("render")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write to; with --check, the installed directory to compare with.")
@click.option("--check", is_flag=True,
              help="Write nothing: compare the render with --out and exit 3 on drift, printing a diff.")
@click.option("--dev-dir", default="/dev", show_default=True, help="Device directory; {node} becomes the node name.")
@click.option("--templates", default=None, type=click.Path(exists=True, file_okay=False),
              help="Site template directory (overrides any template by relative path).")
@click.option("--hooks-dir", default=None, type=click.Path(file_okay=False),
              help="Install root holding the prolog/ and epilog/ shims (adds the hook lines).")
@click.option("--node-hostname", default=None, help="NodeHostname= on every node line (one-host clusters).")
@click.option("--node-addr", default=None, help="NodeAddr= on every node line.")
@click.option("--port-base", type=click.IntRange(1, 65535), default=None,
              help="Port= of the first node, +1 for each next one.")
@click.option("--discovery", default=None, type=click.Path(exists=True, file_okay=False),
              help="Directory of <node>.json files from `gpuarb discover` (needed for nodes with real MIG GPUs).")
@click.option("--autodetect", type=click.Choice(["off", "nvml"]), default="off", show_default=True,
              help="gres.conf AutoDetect= (Debian's Slurm has no NVML support: off).")
@click.option("--accounting/--no-accounting", default=None,
              help="slurmdbd runs: PreemptType=preempt/qos, AccountingStoreFlags=job_comment and gpuarb-qos.sh. "
                   "--no-accounting: PreemptType=preempt/partition_prio, no QoS script. Neither: the base "
                   "slurm.conf sets PreemptType.")
@click.option("--preempt-mode", type=click.Choice(["REQUEUE", "CANCEL", "SUSPEND"], case_sensitive=False),
              default="REQUEUE", show_default=True,
              help="What happens to preempted batch jobs (SUSPEND is refused: a suspended job keeps its GPU memory).")
@click.option("--grace-time", "grace_time_s", default="60s", show_default=True, callback=_duration,
              help="GraceTime of the preemptible QoS: time a preempted job gets to checkpoint.")
@click.option("--llm-account", "llm_accounts", multiple=True,
              help="Account that may use the QoS of classes that preempt others (repeatable; default: every user).")
@click.option("--lua/--no-lua", default=None,
              help="Render job_submit.lua and cli_filter.lua (default: when slurm_gpuarb.lua is installed).")
@pass_ctx
def render_cmd(obj: Ctx, out_dir: str, check: bool, dev_dir: str, templates: str | None, hooks_dir: str | None,
               node_hostname: str | None, node_addr: str | None, port_base: int | None, discovery: str | None,
               autodetect: str, accounting: bool | None, preempt_mode: str, grace_time_s: int,
               llm_accounts: tuple[str, ...], lua: bool | None) -> None:
    """Render gres.conf, the slurm.conf part, the QoS script, the MIG layouts (and the Lua plugins)
    from the inventory, or check the installed ones against it.

    \b
    Examples:
      gpuarb --config docker-slurm/inventory.toml render --out /tmp/slurm-etc
      gpuarb render --out /etc/slurm/gpuarb --discovery /etc/slurm/gpuarb-discovery --accounting
      gpuarb render --out /etc/slurm/gpuarb --check     # exit 3 and a diff when the inventory changed
    """
    from ..discover import load_dir
    from ..drift import check_rendered
    from ..render import HookPaths, NodeAddressing, RenderOptions, render_all

    cfg = obj.cfg
    opts = RenderOptions(
        dev_dir=dev_dir, template_dir=templates, autodetect=autodetect, accounting=accounting,
        hooks=HookPaths.at(hooks_dir, installed_only=True) if hooks_dir else None,
        addressing=NodeAddressing(node_hostname, node_addr, port_base),
        discovery=load_dir(discovery, [n.name for n in cfg.nodes]) if discovery else {},
        preempt_mode=preempt_mode.upper(), grace_time_s=grace_time_s,
        privileged_accounts=llm_accounts or None, lua=lua)
    if check:
        drift = check_rendered(cfg, out_dir, opts)
        click.echo(drift.report())
        if not drift.clean:
            click.get_current_context().exit(EXIT_DRIFT)
        return
    for path in render_all(cfg, out_dir, opts):
        click.echo(str(path))


@cli.command("discover")
@click.option("--out", "out_file", default=None, type=click.Path(dir_okay=False),
              help="Write the JSON to this file (default: print it).")
@click.option("--proc-root", default="/proc", show_default=True, type=click.Path(file_okay=False),
              help="Where /proc is (its driver/nvidia-caps/mig-minors holds the MIG capability minors).")
@pass_ctx
def discover_cmd(obj: Ctx, out_file: str | None, proc_root: str) -> None:
    """Record this node's GPUs, their /dev/nvidiaN minors and MIG devices (UUIDs, GPU and compute
    instance ids, capability minors) for `gpuarb render --discovery DIR`. Run it on each MIG node
    after applying its MIG layout, into DIR/<node>.json.

    \b
    Example:
      gpuarb discover --out /etc/slurm/gpuarb-discovery/$(hostname -s).json
    """
    from ..discover import discover, dump
    from ..telemetry import select

    cfg = obj.cfg
    with select(telemetry_for(cfg, cfg.node), node=cfg.node) as t:
        text = dump(discover(t, node=cfg.node, proc_root=proc_root))
    if out_file is None:
        click.echo(text, nl=False)
        return
    path = Path(out_file)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    click.echo(str(path))


@cli.group(cls=GpuArbGroup)
def mig() -> None:
    """MIG layouts that honour the GPU's placement rules.

    \b
    Example:
      gpuarb mig plan --sku h100-80g 4g.40gb 3g.40gb
    """


@mig.command("plan")
@click.option("--sku", required=True, help="The GPU model as the capacity table names it (h100-80g, a100-80g, …).")
@click.argument("requests", nargs=-1, required=True)
@json_option
def mig_plan(sku: str, requests: tuple[str, ...], as_json: bool) -> None:
    """Propose a MIG layout for REQUESTS: each a profile (1g.10gb), a memory size that becomes the
    smallest profile holding it (12GiB), or either with a count (2x3g.40gb, 3x12GiB). A layout
    that the placement rules refuse is explained.

    \b
    Examples:
      gpuarb mig plan --sku h100-80g 4g.40gb 3g.40gb
      gpuarb mig plan --sku h100-80g 3x2g.20gb 9GiB
    """
    from .. import skus

    layout = migplan.plan(sku, [migplan.parse_request(r) for r in requests])
    s = skus.sku(sku)
    if as_json:
        _emit_json({"sku": layout.sku, "compute_slices": layout.compute_slices, "memory_slots": layout.memory_slots,
                    "instances": [{"profile": p.profile, "start": p.start, "size": p.size,
                                   "memory_mib": p.memory_mib} for p in layout.instances],
                    "mig_devices": layout.counts()})
        return
    click.echo(f"{s.display_name}: {layout.describe()} ({layout.compute_slices}/{migplan.COMPUTE_SLICES} compute "
               f"slices, {layout.memory_slots}/{migplan.MEMORY_SLOTS} memory slots)")
    legend = " ".join(f"{chr(ord('a') + n)}={p.profile}" for n, p in enumerate(layout.instances))
    click.echo(f"  slots 01234567\n        {layout.diagram()}   {legend}")
    click.echo("  nvidia-mig-parted:\n    mig-enabled: true\n    mig-devices:")
    for profile, n in layout.counts().items():
        click.echo(f'      "{profile}": {n}')
