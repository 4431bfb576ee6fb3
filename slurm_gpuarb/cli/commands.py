"""The ``gpuarb`` command tree. Each callback: parse, call the library once, render, map errors."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from .. import engines, protocol
from ..config import Config, load
from ..model import Decision, Lease, LeaseSpec, LeaseState, Outcome, Share
from ..units import human_size
from . import EXIT_DENIED, EXIT_WAIT, GpuArbGroup


class Ctx:
    """Lazily built shared state: config first, the service only when a command needs it."""

    def __init__(self, config: str | None, overrides: dict[str, Any]) -> None:
        self._config_path = config
        self._overrides = overrides
        self._cfg: Config | None = None

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            self._cfg = load(self._config_path, overrides=self._overrides)
        return self._cfg

    def service(self) -> Any:
        from ..service import Arbitration

        return Arbitration(self.cfg)


pass_ctx = click.make_pass_decorator(Ctx)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group(cls=GpuArbGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", metavar="PATH", help="Config file (default /etc/slurm/gpuarb.toml; env GPUARB_CONFIG).")
@click.option("--ledger", metavar="URL", help="Ledger URL, sqlite:///PATH or postgresql+psycopg://… "
              "(env GPUARB_LEDGER).")
@click.option("--telemetry", metavar="BACKEND", help="auto | nvml | smi | fake:PRESET (env GPUARB_TELEMETRY).")
@click.option("--node", metavar="NAME", help="Node name in the ledger (env GPUARB_NODE; default: SLURMD_NODENAME "
              "or the short hostname).")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="slurm-gpuarb", prog_name="gpuarb")
@click.pass_context
def cli(ctx: click.Context, config: str | None, ledger: str | None, telemetry: str | None, node: str | None,
        debug: bool) -> None:
    """GPU memory (VRAM) and MIG leases for Slurm and for hosts without it.

    \b
    Examples:
      gpuarb lease check 'gpuarb: vram=6GiB prio=batch min=4GiB'
      gpuarb --telemetry fake:rtx3090ti-24g lease request 'gpuarb: vram=4GiB prio=batch'
      gpuarb status
      gpuarb explain 12
    """
    overrides: dict[str, Any] = {}
    if ledger:
        overrides["ledger_url"] = ledger
    if telemetry:
        overrides["telemetry"] = telemetry
    if node:
        overrides["node"] = node
    ctx.obj = Ctx(config, overrides)


# ---------------------------------------------------------------------------- lease


@cli.group(cls=GpuArbGroup)
def lease() -> None:
    """Check, request, release and list leases.

    \b
    Example:
      gpuarb lease request 'gpuarb: vram=4GiB prio=batch ttl=2h'
    """


@lease.command("check")
@click.argument("spec")
@json_option
@pass_ctx
def lease_check(obj: Ctx, spec: str, as_json: bool) -> None:
    """Validate SPEC and print its normalised, canonical form. Nothing is recorded.

    \b
    Example:
      gpuarb lease check 'gpuarb: vram=6GiB prio=batch min=4GiB'
      -> gpuarb/1: vram=6144MiB prio=batch min=4096MiB
    """
    from .. import spec as specmod
    from ..errors import LeaseSpecError

    parsed = specmod.parse(spec)
    if parsed is None:
        raise LeaseSpecError("no lease spec: a spec starts with the marker 'gpuarb:', e.g. 'gpuarb: vram=6GiB'")
    specmod.check_classes(parsed, obj.cfg.policy.classes)
    canonical = specmod.format_spec(parsed)
    if as_json:
        _emit_json({"valid": True, "canonical": canonical})
    else:
        click.echo(canonical)


@lease.command("request")
@click.argument("spec")
@click.option("--gpu", type=click.IntRange(0, 1023), help="Only this GPU (NVML index).")
@click.option("--job", "job_id", metavar="JOBID", help="Slurm job id the lease belongs to.")
@click.option("--restart-count", type=click.IntRange(0), default=0, show_default=True,
              help="The job's SLURM_JOB_RESTART_COUNT.")
@click.option("--pid", type=click.IntRange(1), help="Process that will use the memory (attributes its usage).")
@click.option("--engine", type=click.Choice(engines.ENGINES), default=None,
              help="Print this serving engine's knobs for the grant (default: the spec's engine=).")
@click.option("--kv-cache", "kv_cache", metavar="SIZE", default=None,
              help="vLLM only: also size its KV cache alone (--kv-cache-memory-bytes); must fit the grant.")
@json_option
@pass_ctx
def lease_request(obj: Ctx, spec: str, gpu: int | None, job_id: str | None, restart_count: int,
                  pid: int | None, engine: str | None, kv_cache: str | None, as_json: bool) -> None:
    """Ask for a lease on this node. Exit 0 when granted or degraded, 3 when it
    must wait, 4 when it can never fit here; the reason is printed either way.

    With --engine (or engine= in the spec) a grant also prints the knobs that keep
    that engine inside it: vLLM's --gpu-memory-utilization (grant / total, rounded
    down; vLLM will not start unless that much of the GPU is free), Ollama's
    OLLAMA_GPU_OVERHEAD and OLLAMA_MAX_LOADED_MODELS, TF Serving's
    --per_process_gpu_memory_fraction, PyTorch's memory fraction; share=mps adds
    the class's CUDA_MPS_ACTIVE_THREAD_PERCENTAGE and CUDA_MPS_PINNED_DEVICE_MEM_LIMIT.

    \b
    Example:
      gpuarb lease request 'gpuarb: vram=4GiB prio=batch min=3GiB'
      gpuarb lease request 'gpuarb: vram=6GiB prio=llm' --engine tf
    """
    import os

    parsed, engine, kv_mib = _engine_options(spec, engine, kv_cache)
    with obj.service() as svc:
        decision, new = svc.request(spec, gpu=gpu, job_id=job_id, restart_count=restart_count, pid=pid,
                                    owner_uid=os.getuid(), plane="cli")
        knobs = None
        if new is not None and (engine is not None or (parsed is not None and parsed.share is Share.MPS)):
            knobs = engines.knobs_for_lease(new, svc.telemetry.gpus(), obj.cfg.policy.classes, engine=engine,
                                            share_mps=parsed is not None and parsed.share is Share.MPS,
                                            kv_cache_mib=kv_mib)
    if as_json:
        out = protocol.decision_to_json(decision, new)
        if knobs is not None:
            out["knobs"] = knobs.to_json()
        _emit_json(out)
    else:
        click.echo(_decision_line(decision, new))
        if knobs is not None:
            click.echo(_knobs_text(knobs))
    if decision.outcome is Outcome.WAIT:
        raise click.exceptions.Exit(EXIT_WAIT)
    if decision.outcome is Outcome.DENY:
        raise click.exceptions.Exit(EXIT_DENIED)


def _engine_options(spec: str, engine: str | None, kv_cache: str | None) -> tuple[LeaseSpec | None, str | None,
                                                                                  int | None]:
    """The spec (when it parses: the request reports a bad one), the engine whose knobs to print, the KV cache."""
    from .. import spec as specmod
    from ..errors import LeaseSpecError
    from ..units import UnitError, parse_size_mib

    try:
        parsed = specmod.parse(spec)
    except LeaseSpecError:
        parsed = None
    named = parsed.engine.value if parsed is not None and parsed.engine is not None else None
    if engine is not None and named is not None and engine != named:
        raise click.UsageError(f"--engine {engine} disagrees with the spec's engine={named}; give one of them")
    engine = engine or named
    kv_mib = None
    if kv_cache is not None:
        if engine != "vllm":
            raise click.UsageError("--kv-cache sizes vLLM's KV cache: add --engine vllm (or engine=vllm to the spec)")
        try:
            kv_mib = parse_size_mib(kv_cache)
        except UnitError as e:
            raise click.BadParameter(str(e), param_hint="--kv-cache") from e
    return parsed, engine, kv_mib


_FLAG_LABEL = {"vllm": "vllm serve flags", "tf": "tensorflow_model_server flags"}


def _knobs_text(knobs: engines.Knobs) -> str:
    import shlex

    lines = [f"engine {knobs.engine}:" if knobs.engine else "share=mps:"]
    lines += [f"  export {k}={shlex.quote(v)}" for k, v in knobs.exports.items()]
    if knobs.flags:
        lines.append(f"  {_FLAG_LABEL.get(knobs.engine or '', 'flags')}: {knobs.flags}")
    lines += [f"  note: {n}" for n in knobs.notes]
    return "\n".join(lines)


def _decision_line(decision: Decision, new: Lease | None) -> str:
    where = f"{decision.node} gpu{','.join(map(str, decision.gpus))}" if decision.gpus else decision.node
    if new is not None:
        size = f"{human_size(decision.granted_mib)} ({decision.granted_mib}MiB)"
        head = f"{decision.outcome.value}: lease {new.id} {size} prio={decision.prio} on {where}"
        if decision.mig_uuid:
            head += f" mig={decision.mig_uuid}"
        return f"{head}\n{decision.reason}"
    return f"{decision.outcome.value}: {decision.reason}"


@lease.command("release")
@click.argument("lease_id", required=False)
@click.option("--job", "job_id", metavar="JOBID", help="Release this Slurm job's leases on this node.")
@click.option("--restart-count", type=click.IntRange(0), help="Only the leases of this run of the job.")
@click.option("--reason", default="released", show_default=True, help="Recorded in the ledger.")
@json_option
@pass_ctx
def lease_release(obj: Ctx, lease_id: str | None, job_id: str | None, restart_count: int | None, reason: str,
                  as_json: bool) -> None:
    """Release LEASE_ID, or a job's leases with --job. Releasing twice is not an error.

    \b
    Examples:
      gpuarb lease release L3f2a9c0d1e4b
      gpuarb lease release --job 12 --restart-count 0
    """
    if (lease_id is None) == (job_id is None):
        raise click.UsageError("give a LEASE_ID or --job JOBID (one of them)")
    with obj.service() as svc:
        released = svc.release(lease_id, job_id=job_id, restart_count=restart_count, reason=reason, plane="cli")
    if as_json:
        _emit_json({"released": [protocol.lease_to_json(le) for le in released]})
    elif released:
        for le in released:
            click.echo(f"released {le.id} ({human_size(le.vram_mib)} on {le.node} gpu{','.join(map(str, le.gpus))})")
    else:
        click.echo("nothing to release (already released, expired or revoked)")


@lease.command("list")
@click.option("--all", "show_all", is_flag=True, help="Include released, expired and revoked leases.")
@click.option("--job", "job_id", metavar="JOBID", help="Only this job's leases.")
@click.option("--limit", type=click.IntRange(1), default=1000, show_default=True)
@json_option
@pass_ctx
def lease_list(obj: Ctx, show_all: bool, job_id: str | None, limit: int, as_json: bool) -> None:
    """List live leases (all nodes), or every lease with --all.

    \b
    Example:
      gpuarb lease list --json
    """
    with obj.service() as svc:
        rows = svc.ledger.leases(state=None if show_all else LeaseState.GRANTED, job_id=job_id, limit=limit)
    if as_json:
        _emit_json([protocol.lease_to_json(le) for le in rows])
        return
    if not rows:
        click.echo("no leases")
        return
    click.echo(f"{'LEASE':<14} {'STATE':<9} {'NODE':<10} {'GPU':<5} {'VRAM':>9} {'PRIO':<8} {'JOB':<10} AGE")
    now = time.time()
    for le in rows:
        click.echo(f"{le.id:<14} {le.state.value:<9} {le.node:<10} {','.join(map(str, le.gpus)):<5} "
                   f"{human_size(le.vram_mib):>9} {le.prio:<8} {(le.job_id or '-'):<10} {_age(now - le.created_at)}")


def _age(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


@lease.command("gc")
@json_option
@pass_ctx
def lease_gc(obj: Ctx, as_json: bool) -> None:
    """Expire leases whose TTL has passed (each gets a decision row).

    \b
    Example:
      gpuarb lease gc
    """
    with obj.service() as svc:
        expired = svc.ledger.expire(time.time())
    if as_json:
        _emit_json({"expired": [protocol.lease_to_json(le) for le in expired]})
    else:
        click.echo(f"expired {len(expired)} lease(s)" + "".join(f"\n  {le.id}" for le in expired))


# ---------------------------------------------------------------------------- read commands


@cli.command("explain")
@click.argument("target")
@json_option
@pass_ctx
def explain_cmd(obj: Ctx, target: str, as_json: bool) -> None:
    """Say why: the decisions about a Slurm job (JOBID), a lease (L…) or one decision (D…).

    \b
    Examples:
      gpuarb explain 12
      gpuarb explain L3f2a9c0d1e4b
      gpuarb explain D17
    """
    with obj.service() as svc:
        text = svc.explain(target)
        if as_json:
            records = svc.explain_records(target)
            _emit_json({"target": target, "text": text,
                        "decisions": [protocol.record_to_json(r) for r in records]})
            return
    click.echo(text)


@cli.command("status")
@json_option
@pass_ctx
def status_cmd(obj: Ctx, as_json: bool) -> None:
    """Per GPU of this node: total, reserved, standing reservations, leased, free, tenants.

    \b
    Example:
      GPUARB_TELEMETRY=fake:rtx3090ti-24g gpuarb status
    """
    from ..capacity import describe_state

    with obj.service() as svc:
        snap = svc.snapshot()
    if as_json:
        _emit_json({"node": snap.node, "gpus": [describe_state(s) for s in snap.states]})
        return
    for st in snap.states:
        g = st.gpu
        by_kind: dict[str, int] = {}
        for t in st.tenants:
            by_kind[t.kind.value] = by_kind.get(t.kind.value, 0) + t.held_mib
        click.echo(f"{snap.node} gpu{g.index} {g.name}: total {human_size(g.total_mib)}, driver reserved "
                   f"{human_size(g.reserved_mib)}, margin {human_size(st.margin_mib)}, reservations "
                   f"{human_size(by_kind.get('reservation', 0))}, leased {human_size(by_kind.get('lease', 0))}, "
                   f"foreign {human_size(by_kind.get('foreign', 0))}, free {human_size(st.free_mib)}")
        for t in sorted(st.tenants, key=lambda t: -t.held_mib):
            extra = f" observed {human_size(t.observed_mib)}" if t.observed_mib else ""
            pids = f" pids {','.join(map(str, t.pids))}" if t.pids else ""
            label = f" ({t.label})" if t.label else ""
            prio = f" prio={t.prio}" if t.prio else ""
            click.echo(f"  {t.kind.value:<11} {t.id}{label}{prio}: holds {human_size(t.held_mib)}"
                       f" (declared {human_size(t.size_mib)}{extra}){pids}")


@cli.command("capacity")
@click.argument("sku_key", metavar="SKU")
@click.option("--margin", default=None, help="Safety margin to subtract (default: policy margin).")
@json_option
@pass_ctx
def capacity_cmd(obj: Ctx, sku_key: str, margin: str | None, as_json: bool) -> None:
    """Show a GPU model's memory, driver reserve, usable VRAM, shards and MIG profiles.

    \b
    Example:
      gpuarb capacity h100-80g
    """
    from ..skus import shards_for, sku, usable_mib
    from ..units import UnitError, parse_size_mib

    s = sku(sku_key)
    if margin is None:
        margin_mib = obj.cfg.policy.margin_mib
    else:
        try:
            margin_mib = parse_size_mib(margin)
        except UnitError as e:
            raise click.BadParameter(str(e), param_hint="--margin") from None
    quantum = obj.cfg.policy.quantum_mib
    usable = usable_mib(s.total_mib, s.reserved_mib, margin_mib, 0)
    data = {
        "sku": s.key, "name": s.display_name, "total_mib": s.total_mib, "reserved_mib": s.reserved_mib,
        "margin_mib": margin_mib, "usable_mib": usable, "quantum_mib": quantum, "shards": shards_for(usable, quantum),
        "mig_profiles": [{"name": p.name, "memory_mib": p.memory_mib, "max_instances": p.max_instances}
                         for p in s.mig_profiles],
    }
    if as_json:
        _emit_json(data)
        return
    click.echo(f"{s.display_name} ({s.key}): total {s.total_mib}MiB, driver reserved ~{s.reserved_mib}MiB, "
               f"margin {margin_mib}MiB -> usable {usable}MiB = {data['shards']} shards of {quantum}MiB")
    for p in s.mig_profiles:
        click.echo(f"  MIG {p.name:<9} {p.memory_mib:>6}MiB  x{p.max_instances}")
    if not s.mig_profiles:
        click.echo("  no MIG")


# ---------------------------------------------------------------------------- db


@cli.group(cls=GpuArbGroup)
def db() -> None:
    """Ledger database administration.

    \b
    Example:
      gpuarb db upgrade
    """


@db.command("upgrade")
@pass_ctx
def db_upgrade(obj: Ctx) -> None:
    """Create the ledger or migrate it to this version's schema (hooks never migrate).

    \b
    Example:
      GPUARB_LEDGER=postgresql+psycopg://gpuarb@db/gpuarb gpuarb db upgrade
    """
    from ..ledger import Ledger

    pw = obj.cfg.pg_password_file
    ledger = Ledger.open(obj.cfg.ledger_url, create=False, password_file=str(pw) if pw else None, check=False)
    try:
        before, after = ledger.upgrade()
    finally:
        ledger.close()
    click.echo(f"ledger at revision {after}" + (f" (was {before})" if before != after else " (already current)"))


# ---------------------------------------------------------------------------- demo


@cli.command("demo")
@click.option("--ledger-dir", type=click.Path(file_okay=False), default=None,
              help="Where to keep the demo's SQLite ledger (default: a fresh temporary directory).")
def demo_cmd(ledger_dir: str | None) -> None:
    """Replay the RTX 3090 Ti story on fake telemetry: without arbitration three 8 GiB
    workers push Ollama off the GPU; with it, Ollama keeps its 12 GiB.

    \b
    Example:
      gpuarb demo
    """
    from ..demo import run_workstation_demo

    run_workstation_demo(click.echo, ledger_dir=ledger_dir)


# ---------------------------------------------------------------------------- config and render


@cli.group(cls=GpuArbGroup)
def config() -> None:
    """Inspect the configuration.

    \b
    Example:
      gpuarb config show
    """


@config.command("show")
@json_option
@pass_ctx
def config_show(obj: Ctx, as_json: bool) -> None:
    """Print the resolved configuration and where each setting came from.

    \b
    Example:
      GPUARB_CONFIG=templates/examples/workstation-3090ti.toml gpuarb config show
    """
    cfg = obj.cfg
    p = cfg.policy
    data: dict[str, Any] = {
        "path": str(cfg.path) if cfg.path else None, "node": cfg.node, "ledger_url": cfg.ledger_url,
        "telemetry": cfg.telemetry, "margin_mib": p.margin_mib, "quantum_mib": p.quantum_mib,
        "default_class": p.default_class, "fail_mode": cfg.fail_mode, "socket_path": str(cfg.socket_path),
        "classes": {c.name: {"priority": c.priority, "preemptible": c.preemptible, "may_degrade": c.may_degrade}
                    for c in p.classes.values()},
        "reservations": [{"name": r.name, "size_mib": r.size_mib, "gpu": r.gpu, "node": r.node, "mode": r.mode}
                         for r in cfg.reservations],
        "nodes": [n.name for n in cfg.nodes], "sources": dict(cfg.sources),
    }
    if as_json:
        _emit_json(data)
        return
    for key in ("path", "node", "ledger_url", "telemetry", "margin_mib", "quantum_mib", "default_class",
                "fail_mode", "socket_path"):
        src = cfg.sources.get(key)
        click.echo(f"{key:<14} {data[key]}" + (f"   ({src})" if src else ""))
    for name, c in data["classes"].items():
        click.echo(f"class {name:<8} priority={c['priority']} preemptible={c['preemptible']} "
                   f"may_degrade={c['may_degrade']}")
    for r in cfg.reservations:
        click.echo(f"reservation {r.name}: {human_size(r.size_mib)} on gpu{r.gpu} of {r.node or 'every node'} "
                   f"({r.mode})")


# ---------------------------------------------------------------------------- node


@cli.group(cls=GpuArbGroup)
def node() -> None:
    """Slurm node administration.

    \b
    Example:
      gpuarb node resume n2
    """


@node.command("resume")
@click.argument("name")
def node_resume(name: str) -> None:
    """Resume a node the health check drained (a foreign process held VRAM) and clear its counts.

    \b
    Example:
      gpuarb node resume n2
    """
    from ..hooks.health import resume_node
    from ..slurm import select_adapter

    resume_node(name, adapter=select_adapter())
    click.echo(f"resumed {name}")


from . import admin  # noqa: E402,F401  - registers render (with --check), discover and mig plan
