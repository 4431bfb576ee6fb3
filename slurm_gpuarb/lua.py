"""The submit plane: ``job_submit.lua`` and ``cli_filter.lua``, rendered from the spec grammar and the inventory.

Slurm runs ``job_submit.lua`` inside slurmctld for every submission; it is where a lease spec is
enforced (``cli_filter.lua`` runs inside ``sbatch`` and can be bypassed: UX only). Both are
generated here from the *same* tables as the Python parser (:data:`spec.KEYS` and the spec's
limits, :data:`units.SIZE_UNITS`) and from the inventory (classes → QoS, partitions and their
modes, each shard GPU's usable memory, the MIG profiles of each MIG partition). Every number the
Lua needs is computed in Python; the templates (``templates/etc/slurm/*.lua.j2``) only format.

This module is also the Python twin of what the Lua does (:func:`decide_submit`,
:func:`decide_modify`, :func:`map_lease`): the tests run the rendered Lua under a real Lua 5.1
over a shared corpus and compare every field with these functions.

Decisions, written down once:

* A comment without the ``gpuarb:`` marker is none of our business: the job is untouched.
* Partition: the job's own (one name; a list is refused), else the first ``[[partitions]]`` entry
  that admits its class (list a class's preferred partition first). An inventory
  without ``[[partitions]]`` is one implicit partition whose GPUs must all be in one mode; the
  job's partition is then neither read nor set.
* Mapping by the partition's mode: ``shard`` → ``gres:shard:ceil(vram / quantum)``, refused when
  that is more shards than the partition's largest GPU has (Slurm 22.05 takes a job's shards from
  one GPU, and would leave it pending forever); ``gpus>1`` → whole GPUs ``gres:gpu:N``; ``mig`` →
  the smallest profile of the partition that holds ``vram`` (by memory, then compute slices), or
  the named one, as ``gres:gpu:<profile>:1``; ``whole`` → ``gres:gpu:N``; ``mps`` →
  ``gres:mps:ceil(100 × vram / GPU total)``. ``vram=N%`` resolves against the partition's
  *smallest* GPU (a job may land on any of them). A MIG profile's memory is its least on any GPU
  of the partition. ``share=`` does not change the mapping (it steers the run plane).
  ``vram`` above one GPU's usable memory is refused in every mode (shards: above what the
  largest GPU's shards hold).
* The job may not ask for GPUs itself as well (``--gpus*`` naming gpu, shard or mps), except a
  ``--gres`` that asks for exactly what the lease maps to (``--gres=gpu:1`` beside a spec that
  takes one whole GPU; a GPU type may narrow it): that is asking once, not twice. Other GRES it
  asks for (``--gres=nvme:1``) stays, and the lease's GRES is added to it.
* A refusal answers ``ESLURM_ACCESS_DENIED`` with ``slurm.log_user("gpuarb: invalid lease spec in
  --comment: <the parser's message>")``.
* QoS is set only when rendered with ``use_qos`` (a site with slurmdbd); a different ``--qos``
  from the user is then refused rather than silently replaced.
* The comment becomes the canonical ``gpuarb/1: …`` form (:func:`spec.format_spec`, with
  ``shards=N`` when shards were set), keeping the text before the marker. A user-written
  canonical comment is re-validated; its ``shards=`` must be what job_submit computes.
* ``slurm_job_modify`` (an owner may update a pending job): a new comment must hold a valid spec
  that maps to the same GRES (and QoS) as the job's canonical one, and is rewritten canonical; a
  lease spec cannot be dropped from, or added to, a comment; ``--gres``/``tres_per_node`` may not
  change the canonical ``shards=`` (more would grow the job; fewer would leave its lease, sized
  from the comment, larger than its GRES); no other GPU GRES may be set; a lease job cannot
  move partition. The privileged uids (root; the controller agent) may change GRES and
  partition; their comments are only validated. Slurm does not show the user ``log_user`` text
  from here, so the reason is logged (``slurm.log_info``).
* Errors inside the Lua (a bug, not a bad spec) are logged and the job is accepted unchanged: a
  Lua bug must not stop every submission. In ``slurm_job_modify`` an internal error refuses the
  change for ordinary users (an unchecked update could grow a job) and allows it for privileged
  uids (the controller agent shrinks pending jobs).
* ``slurm.log_user``/``log_info`` are ``string.format`` wrappers: the Lua always passes ``"%s"``,
  so a ``%`` in a comment is text, never a format directive.
* Comment bytes are read as UTF-8 with surrogate escapes (as ``os.environ`` decodes
  ``SLURM_JOB_COMMENT``): the Lua counts and quotes characters exactly as the parser does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import jinja2

from . import skus, spec
from .config import Config, NodeConfig
from .errors import CapacityError, LeaseSpecError, RenderError
from .gresplan import MPS_COUNT_PER_GPU, mig_layout, shard_budget, static_reservations_mib
from .model import LeaseSpec, Vram
from .render import default_template_dirs
from .units import MAX_DURATION_S, MAX_SIZE_MIB, SIZE_UNITS, SIZE_UNITS_HELP, parse_duration_s

__all__ = [
    "CLI_FILTER",
    "EXAMPLE",
    "JOB_SUBMIT",
    "USER_PREFIX",
    "GresChoice",
    "JobRequest",
    "MigOption",
    "ModifyRequest",
    "ModifyResult",
    "PartitionTable",
    "SubmitResult",
    "SubmitTables",
    "decide_modify",
    "decide_submit",
    "lua_context",
    "lua_literal",
    "lua_string",
    "map_lease",
    "render_lua",
    "submit_tables",
]

JOB_SUBMIT: Final = "etc/slurm/job_submit.lua.j2"
CLI_FILTER: Final = "etc/slurm/cli_filter.lua.j2"
USER_PREFIX: Final = "gpuarb: invalid lease spec in --comment: "
EXAMPLE: Final = "gpuarb: vram=6GiB prio=batch"  # spec's example in its messages (a test keeps them equal)

# Digit-run lengths of spec's regexes that Lua patterns cannot count (tests probe spec's regexes).
SIZE_WHOLE_DIGITS: Final = 9
SIZE_FRAC_DIGITS: Final = 3
SIZE_UNIT_LETTERS: Final = (2, 3)
PERCENT_DIGITS: Final = 3
INT_DIGITS: Final = 6
DURATION_DIGITS: Final = 6
DURATION_PARTS: Final = 4
VERSION_DIGITS: Final = 3
MARKER_VERSION_CHARS: Final = 8

GPU_GRES: Final = ("gpu", "shard", "mps")
# The job fields that can ask for GPUs, in the order they are checked, with the option a user wrote.
GPU_FIELDS: Final = (("gres", "--gres"), ("tres_per_node", "--gres/--gpus-per-node"), ("tres_per_job", "--gpus"),
                     ("tres_per_task", "--gpus-per-task"), ("tres_per_socket", "--gpus-per-socket"))
MODE_NOUNS: Final = {"whole": "whole GPUs", "shard": "VRAM shards", "mig": "MIG slices", "mps": "MPS shares"}
_HUGE: Final = 10**9  # a GRES count too long to read is "more than any lease"


# --------------------------------------------------------------------------- tables


@dataclass(frozen=True)
class MigOption:
    """A MIG profile a partition offers; ``memory_mib`` is its least memory on any GPU there."""

    name: str
    memory_mib: int
    compute_slices: int


@dataclass(frozen=True)
class PartitionTable:
    """What job_submit needs to know about one partition (all MiB)."""

    name: str  # "" for the implicit partition of an inventory without [[partitions]]
    label: str  # how messages name it: "partition batch" or "this cluster"
    mode: str
    classes: tuple[str, ...]
    gpu_total_mib: int  # the smallest GPU: what vram=N% resolves against
    usable_mib: int  # the most usable memory of one GPU (whole GPUs, MPS)
    shard_count: int  # the most shards one GPU has (shard mode), else 0
    max_gpus: int  # the most GPUs of this mode on one node
    mig: tuple[MigOption, ...] = ()  # smallest first


@dataclass(frozen=True)
class SubmitTables:
    """Everything the submit plane decides with, computed once from the inventory."""

    quantum_mib: int
    default_class: str
    class_qos: Mapping[str, str]
    partitions: Mapping[str, PartitionTable]
    class_partition: Mapping[str, str]  # class → the partition set when the job names none
    implicit: PartitionTable | None = None
    use_qos: bool = False
    privileged_uids: tuple[int, ...] = (0,)


def _serves(partition_mode: str, gpu_mode: str) -> bool:
    # As config.py: Slurm hands out a shard or MPS GPU whole too; a MIG GPU only as its instances.
    return partition_mode == gpu_mode or (partition_mode == "whole" and gpu_mode in ("shard", "mps"))


def _partition_table(name: str, mode: str, classes: tuple[str, ...], nodes: Sequence[NodeConfig],
                     cfg: Config) -> PartitionTable:
    totals: list[int] = []
    usable: list[int] = []
    counts: list[int] = [0]
    per_node: list[int] = [0]
    mig: dict[str, MigOption] = {}
    label = f"partition {name}" if name else "this cluster"
    for node in nodes:
        gpus = [g for g in node.gpus if _serves(mode, g.mode)]
        per_node.append(len(gpus))
        for g in gpus:
            budget = shard_budget(g.sku, cfg.policy, static_reservations_mib(cfg.reservations, node.name, g.index))
            totals.append(budget.total_mib)
            usable.append(budget.usable_mib)
            if mode == "shard":
                counts.append(budget.count)
            if mode == "mig":
                try:
                    profiles = [skus.mig_profile(skus.sku(g.sku), p) for p in mig_layout(node.name, g)]
                except CapacityError as e:
                    raise RenderError(f"node {node.name} gpu {g.index}: its MIG layout does not fit its SKU") from e
                for p in profiles:
                    known = mig.get(p.name)
                    if known is None or p.memory_mib < known.memory_mib:
                        mig[p.name] = MigOption(p.name, p.memory_mib, p.compute_slices)
    if not totals:
        raise RenderError(f"{label} has no GPU in {mode} mode; fix its nodes or its mode in the inventory")
    ordered = tuple(sorted(mig.values(), key=lambda o: (o.memory_mib, o.compute_slices, o.name)))
    return PartitionTable(name, label, mode, classes, min(totals), max(usable), max(counts), max(per_node), ordered)


def submit_tables(cfg: Config, *, use_qos: bool = False, privileged_uids: Sequence[int] = (0,)) -> SubmitTables:
    """The submit plane's view of ``cfg`` (raises :class:`RenderError` when a lease could not be mapped).

    ``use_qos``: set each job's QoS from its class (sites with slurmdbd and the QoS script).
    ``privileged_uids``: who may change a pending job's GRES (root; add SlurmUser's uid if the
    controller agent runs as it)."""
    classes = tuple(cfg.policy.classes)
    by_name = {n.name: n for n in cfg.nodes}
    partitions = {p.name: _partition_table(p.name, p.mode, p.classes, [by_name[n] for n in p.nodes], cfg)
                  for p in cfg.partitions}
    implicit = None
    if not cfg.partitions:
        modes = sorted({g.mode for n in cfg.nodes for g in n.gpus})
        if len(modes) != 1:
            found = ", ".join(modes) or "no GPUs"
            raise RenderError(f"the inventory has no [[partitions]] and its GPUs are in modes {found}: job_submit.lua "
                              "cannot tell how to map a lease; add [[partitions]] with a mode each")
        implicit = _partition_table("", modes[0], classes, cfg.nodes, cfg)
    # The first partition that admits a class is that class's: the inventory lists the preferred one first.
    class_partition: dict[str, str] = {}
    for p in cfg.partitions:
        for c in p.classes:
            class_partition.setdefault(c, p.name)
    qos = {name: c.qos or name for name, c in cfg.policy.classes.items()}
    return SubmitTables(cfg.policy.quantum_mib, cfg.policy.default_class, qos, partitions, class_partition, implicit,
                        use_qos, tuple(privileged_uids))


# --------------------------------------------------------------------------- the Python twin of the Lua


@dataclass(frozen=True)
class GresChoice:
    """What a lease maps to in one partition."""

    partition: PartitionTable
    set_partition: str | None  # the partition job_submit sets (the job named none)
    gres: str  # the tres_per_node value: gres:shard:12, gres:gpu:1g.10gb:1, gres:gpu:2
    shards: int | None = None


@dataclass(frozen=True)
class JobRequest:
    """The job_desc fields job_submit reads (``None`` or ``""``: not given)."""

    comment: str | None = None
    partition: str | None = None
    qos: str | None = None
    gres: str | None = None
    tres_per_node: str | None = None
    tres_per_job: str | None = None
    tres_per_task: str | None = None
    tres_per_socket: str | None = None


@dataclass(frozen=True)
class SubmitResult:
    """job_submit's answer. Refused: ``message`` is what the user sees. Accepted: the fields it sets
    (``None``: left as the job had it; all ``None`` for a comment without a lease)."""

    accepted: bool
    message: str = ""
    comment: str | None = None
    tres_per_node: str | None = None
    qos: str | None = None
    partition: str | None = None


def _mib_text(v: Vram, mib: int) -> str:
    return f"{mib}MiB" if v.mib is not None else f"{v.percent}% ({mib}MiB)"


def _pick_partition(t: SubmitTables, cls: str, partition: str | None) -> tuple[PartitionTable, str | None]:
    if t.implicit is not None:
        return t.implicit, None
    if partition:
        if "," in partition:
            raise LeaseSpecError(f"a job with a lease spec runs in one partition, not {spec.quote(partition)};"
                                 " name one with -p")
        found = t.partitions.get(partition)
        if found is None:
            raise LeaseSpecError(f"partition {spec.quote(partition)} has no GPUs that gpuarb manages;"
                                 f" use one of: {', '.join(t.partitions)}")
        return found, None
    name = t.class_partition.get(cls)
    if name is None:
        raise LeaseSpecError(f"no partition admits prio={cls}; use a class one of them admits:"
                             f" {', '.join(c for c in t.class_qos if c in t.class_partition)}")
    return t.partitions[name], name


def _mig_fix(t: SubmitTables) -> str:
    migs = [p.name for p in t.partitions.values() if p.mode == "mig"]
    return f"submit with -p {migs[0]} or drop mig=" if migs else "drop mig= (this cluster has no MIG partition)"


def _pick_mig(part: PartitionTable, lease: LeaseSpec, need: int | None) -> MigOption:
    names = ", ".join(o.name for o in part.mig)
    if lease.mig is not None and lease.mig != spec.MIG_ANY:
        wanted = next((o for o in part.mig if o.name == lease.mig), None)
        if wanted is None:
            raise LeaseSpecError(f"MIG profile {lease.mig} is not available in {part.label} (it has: {names})")
        if need is not None and need > wanted.memory_mib:
            assert lease.vram is not None
            raise LeaseSpecError(f"vram={_mib_text(lease.vram, need)} does not fit MIG profile {wanted.name}"
                                 f" ({wanted.memory_mib}MiB); ask for less or a larger profile ({part.label} has:"
                                 f" {names})")
        return wanted
    fitting = [o for o in part.mig if need is None or o.memory_mib >= need]
    if not fitting:
        assert lease.vram is not None and need is not None
        largest = max(part.mig, key=lambda o: o.memory_mib)
        raise LeaseSpecError(f"vram={_mib_text(lease.vram, need)} is more than any MIG slice of {part.label} holds"
                             f" (the largest, {largest.name}, has {largest.memory_mib}MiB)")
    return fitting[0]


def map_lease(t: SubmitTables, lease: LeaseSpec, *, partition: str | None = None) -> GresChoice:
    """The GRES (and partition) a lease maps to; :class:`LeaseSpecError` when it cannot run.

    ``lease.prio`` must be a configured class (:func:`spec.check_classes`)."""
    cls = lease.prio or t.default_class
    part, set_partition = _pick_partition(t, cls, partition)
    if cls not in part.classes:
        raise LeaseSpecError(f"{part.label} does not admit prio={cls} (it admits: {', '.join(part.classes)});"
                             " pick another partition with -p or another prio=")
    if lease.mig is not None and part.mode != "mig":
        raise LeaseSpecError(f"mig={lease.mig} needs a MIG partition, but {part.label} hands out"
                             f" {MODE_NOUNS[part.mode]}; {_mig_fix(t)}")
    need = lease.vram.resolve(part.gpu_total_mib) if lease.vram is not None else None
    gpus = lease.gpus or 1
    if part.mode == "mig":
        if gpus > 1:
            raise LeaseSpecError(f"{part.label} hands out MIG slices, one per lease; drop gpus={gpus} or use a"
                                 " partition with whole GPUs")
        return GresChoice(part, set_partition, f"gres:gpu:{_pick_mig(part, lease, need).name}:1")
    assert lease.vram is not None and need is not None  # the parser wants vram= or mig=
    if gpus > part.max_gpus:
        raise LeaseSpecError(f"gpus={gpus} is more than any node of {part.label} has (at most {part.max_gpus})")
    if part.mode == "shard" and gpus == 1:
        shards = -(-need // t.quantum_mib)
        if shards > part.shard_count:
            raise LeaseSpecError(f"vram={_mib_text(lease.vram, need)} is more than one GPU of {part.label} can hold"
                                 f" ({part.shard_count * t.quantum_mib}MiB usable); Slurm 22.05 takes a job's shards"
                                 " from one GPU")
        return GresChoice(part, set_partition, f"gres:shard:{shards}", shards)
    if need > part.usable_mib:
        raise LeaseSpecError(f"vram={_mib_text(lease.vram, need)} is more than one GPU of {part.label} can hold"
                             f" ({part.usable_mib}MiB usable)")
    if part.mode == "mps" and gpus == 1:
        share = max(1, -(-need * MPS_COUNT_PER_GPU // part.gpu_total_mib))  # ceil: never less than asked
        return GresChoice(part, set_partition, f"gres:mps:{share}")
    return GresChoice(part, set_partition, f"gres:gpu:{gpus}")


def _asks_for_gpus(value: str, *, any_value: bool) -> bool:
    return any_value or any(c in GPU_GRES for c in re.split(r"[,:/]", value))


def _agreeing_fields(cli: bool) -> tuple[str, ...]:
    """The fields whose GPU GRES may repeat the lease's: --gres (and, in job_submit, its alias
    tres_per_node, which --gpus-per-node also sets). cli_filter sees --gpus-per-node as a bare count."""
    return ("gres",) if cli else ("gres", "tres_per_node")


def _check_no_gpus(job: JobRequest, *, cli: bool) -> None:
    agreeing = _agreeing_fields(cli)
    for name, flag in GPU_FIELDS:
        value = getattr(job, name)
        # cli_filter sees --gpus* as bare counts ("2"): any value asks for GPUs.
        if value and name not in agreeing and _asks_for_gpus(value, any_value=cli and name != "gres"):
            raise LeaseSpecError(f"the job asks for GPUs itself ({flag} {spec.quote(value)}) and through its lease"
                                 f" spec; drop {flag}: job_submit sets the GRES from the spec")


def _gres_item(item: str) -> tuple[str, tuple[str, ...], int]:
    """``(name, types, count)`` of one GRES item (``gres:gpu:h100:2`` → ``("gpu", ("h100",), 2)``); a
    count too long to read is :data:`_HUGE`, so it agrees with no lease."""
    comps = [c for c in re.sub(r"^gres[:/]", "", item).split(":") if c]
    if not comps:
        return "", (), 1
    if len(comps) > 1 and re.fullmatch(r"[0-9]+", comps[-1]):
        last = comps[-1]
        return comps[0], tuple(comps[1:-1]), int(last) if len(last) <= 9 else _HUGE
    return comps[0], tuple(comps[1:]), 1


def _lease_gres(job: JobRequest, choice: GresChoice, *, cli: bool) -> str:
    """The job's GRES with the lease's. GRES that is no GPU stays. A ``--gres`` GPU item is accepted
    when it asks for what the lease maps to (same GRES and count; a type may narrow an untyped
    lease GRES, ``gpu:h100:1`` for ``gpu:1``): asking twice for the same thing is asking once, and
    scripts that already pass ``--gres=gpu:1`` keep working. Anything else is refused."""
    want_name, want_types, want_count = _gres_item(choice.gres)
    agreeing = _agreeing_fields(cli)
    agreed: str | None = None
    for name, flag in GPU_FIELDS:
        value = getattr(job, name)
        if name not in agreeing or not value:
            continue
        gpu_items = [i for i in value.split(",") if i and _asks_for_gpus(i, any_value=False)]
        if not gpu_items:
            continue
        got_name, got_types, got_count = _gres_item(gpu_items[0])
        if (len(gpu_items) > 1 or got_name != want_name or got_count != want_count
                or not (got_types == want_types or (not want_types and len(got_types) == 1))):
            raise LeaseSpecError(f"the job asks for GPUs itself ({flag} {spec.quote(value)}) and through its lease"
                                 f" spec, which takes {choice.gres} in {choice.partition.label}; drop {flag}:"
                                 " job_submit sets the GRES from the spec")
        agreed = ":".join(("gres", got_name, *got_types, str(got_count)))
    base = job.tres_per_node or job.gres
    items = [i for i in base.split(",") if i and not _asks_for_gpus(i, any_value=False)] if base else []
    return ",".join([*items, agreed or choice.gres])


def _marker_start(comment: str) -> int:
    """Where the marker :func:`spec.parse` found starts (the text before it is kept)."""
    for m in spec.MARKER_RE.finditer(comment):
        if m.start() == 0 or comment[m.start() - 1] in spec.MARKER_BOUNDARY:
            return m.start()
    raise AssertionError("spec.parse found a marker that is not there")


def _canonical(lease: LeaseSpec, choice: GresChoice) -> LeaseSpec:
    if lease.shards is not None and lease.shards != choice.shards:
        if choice.shards is None:
            raise LeaseSpecError(f"shards={lease.shards} in the canonical comment, but {choice.partition.label} hands"
                                 f" out {MODE_NOUNS[choice.partition.mode]} for this lease, not shards; submit the"
                                 " gpuarb: form")
        raise LeaseSpecError(f"shards={lease.shards} in the canonical comment is not the {choice.shards} shards this"
                             f" lease takes in {choice.partition.label}; submit the gpuarb: form and let job_submit"
                             " set shards=")
    return replace(lease, shards=choice.shards)


def decide_submit(t: SubmitTables, job: JobRequest, *, cli: bool = False) -> SubmitResult:
    """What job_submit.lua (``cli=False``) or cli_filter.lua (``cli=True``) does with ``job``."""
    try:
        lease = spec.parse(job.comment)
        if lease is None:
            return SubmitResult(True)
        spec.check_classes(lease, t.class_qos)
        _check_no_gpus(job, cli=cli)
        choice = map_lease(t, lease, partition=job.partition)
        cls = lease.prio or t.default_class
        qos = t.class_qos[cls] if t.use_qos else None
        if qos is not None and job.qos and job.qos != qos:
            raise LeaseSpecError(f"--qos {spec.quote(job.qos)} does not match prio={cls} (QoS {qos}); drop --qos:"
                                 " the lease's class sets it")
        canonical = _canonical(lease, choice)
        gres = _lease_gres(job, choice, cli=cli)
    except LeaseSpecError as e:
        return SubmitResult(False, USER_PREFIX + str(e))
    assert job.comment is not None
    comment = job.comment[: _marker_start(job.comment)] + spec.format_spec(canonical)
    return SubmitResult(True, comment=comment, tres_per_node=gres, qos=qos, partition=choice.set_partition)


@dataclass(frozen=True)
class ModifyRequest:
    """What slurm_job_modify sees: the update (``comment`` etc.: ``None`` = not changed) and the job."""

    uid: int
    old_comment: str | None  # job_rec.comment
    job_partition: str | None  # job_rec.partition
    comment: str | None = None
    partition: str | None = None
    gres: str | None = None
    tres_per_node: str | None = None
    tres_per_job: str | None = None
    tres_per_task: str | None = None
    tres_per_socket: str | None = None


@dataclass(frozen=True)
class ModifyResult:
    """slurm_job_modify's answer; ``reason`` goes to slurmctld's log (the user only sees "Access denied")."""

    allowed: bool
    reason: str = ""
    comment: str | None = None  # the canonical comment it writes, when the comment changed


def _old_lease(text: str | None) -> LeaseSpec | None:
    try:
        return spec.parse(text)
    except LeaseSpecError:
        return None  # not written by job_submit (a job from before gpuarb): nothing to hold it to


def _shards_in(value: str) -> tuple[int, bool]:
    """(shards asked for, whether other GPU GRES is asked for) in a GRES string."""
    total, other = 0, False
    for item in value.split(","):
        comps = [c for c in re.sub(r"^gres[:/]", "", item).split(":") if c]
        if comps and comps[0] == "shard":
            last = comps[-1]
            numeric = len(comps) > 1 and re.fullmatch(r"[0-9]+", last) is not None
            total += (int(last) if len(last) <= 9 else _HUGE) if numeric else 1
        elif any(c in GPU_GRES for c in comps):
            other = True
    return total, other


def _key(t: SubmitTables, lease: LeaseSpec, choice: GresChoice) -> str:
    qos = f" qos={t.class_qos[lease.prio or t.default_class]}" if t.use_qos else ""
    return choice.gres + qos


def decide_modify(t: SubmitTables, req: ModifyRequest) -> ModifyResult:
    """What slurm_job_modify does with an update of a pending job."""
    privileged = req.uid in t.privileged_uids
    old = _old_lease(req.old_comment)
    new_comment = None
    if req.comment is not None:
        try:
            new = spec.parse(req.comment)
            if new is not None:
                spec.check_classes(new, t.class_qos)
        except LeaseSpecError as e:
            return ModifyResult(False, f"the new comment's lease spec is invalid: {e}")
        if not privileged:
            if new is None and old is not None:
                return ModifyResult(False, "the new comment drops the job's lease spec; cancel and resubmit instead")
            if new is not None:
                if old is None:
                    return ModifyResult(False, "a lease spec can only be given at submission; cancel and resubmit")
                try:
                    choice = map_lease(t, new, partition=req.partition or req.job_partition)
                    was = _key(t, old, map_lease(t, old, partition=req.job_partition))
                    canonical = _canonical(new, choice)
                except LeaseSpecError as e:
                    return ModifyResult(False, f"the new comment's lease spec is invalid: {e}")
                if _key(t, new, choice) != was:
                    return ModifyResult(False, f"the new lease spec asks for {_key(t, new, choice)}, but the job was"
                                               f" submitted for {was}; cancel and resubmit to change a lease's size"
                                               " or class")
                new_comment = req.comment[: _marker_start(req.comment)] + spec.format_spec(canonical)
    if not privileged and old is not None:
        if req.partition and req.partition != req.job_partition:
            return ModifyResult(False, "a job with a lease spec stays in the partition it was submitted to"
                                       f" ({req.job_partition or ''}); its GRES was computed there: cancel and"
                                       " resubmit to move it")
        for name, flag in GPU_FIELDS:
            value = getattr(req, name)
            if not value:
                continue
            shards, other = _shards_in(value)
            if other or name not in ("gres", "tres_per_node"):
                if other or shards:
                    return ModifyResult(False, f"{flag} {spec.quote(value)} cannot be set on a job with a lease spec;"
                                               " only root or the controller agent may change its GPUs")
                continue
            if shards > (old.shards or 0):
                return ModifyResult(False, f"{flag} {spec.quote(value)} asks for {shards} shards, more than the"
                                           f" {old.shards or 0} its lease spec was given; only root or the controller"
                                           " agent may grow a job")
            if 0 < shards < (old.shards or 0):
                # The Prolog sizes the lease from the comment's shards=: fewer shards under the same
                # comment would export a budget larger than the job holds.
                return ModifyResult(False, f"{flag} {spec.quote(value)} asks for {shards} shards, fewer than the"
                                           f" {old.shards} its lease spec was given, which would leave its lease"
                                           " larger than its GRES; only root or the controller agent may shrink a"
                                           " job (it rewrites the comment too); cancel and resubmit instead")
    return ModifyResult(True, comment=new_comment)


# --------------------------------------------------------------------------- Lua literals


_LUA_KEYWORDS: Final = frozenset(("and", "break", "do", "else", "elseif", "end", "false", "for", "function", "if", "in",
                                  "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while"))
_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_WIDTH: Final = 110


def lua_string(text: str) -> str:
    """``text`` as a Lua 5.1 string literal: printable ASCII as is, every other byte as ``\\ddd``."""
    out = []
    for b in text.encode("utf-8", "surrogateescape"):
        out.append(chr(b) if 32 <= b <= 126 and b not in (34, 92) else f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def _lua_key(key: object) -> str:
    if isinstance(key, str) and _IDENT_RE.fullmatch(key) and key not in _LUA_KEYWORDS:
        return key
    return f"[{lua_literal(key)}]"


def lua_literal(value: object, indent: int = 0) -> str:
    """A Lua 5.1 literal for ``value`` (None, bool, int, str, mappings, sequences), wrapped past 110 columns."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return lua_string(value)
    if isinstance(value, Mapping):
        items = [f"{_lua_key(k)} = {lua_literal(v, indent + 1)}" for k, v in value.items()]
    elif isinstance(value, list | tuple):
        items = [lua_literal(v, indent + 1) for v in value]
    else:
        raise RenderError(f"cannot write a {type(value).__name__} into job_submit.lua (a bug in slurm_gpuarb.lua)")
    one = "{" + ", ".join(items) + "}"
    if "\n" not in one and len(one) + 2 * indent <= _WIDTH:
        return one
    pad = "  " * (indent + 1)
    return "{\n" + "".join(f"{pad}{item},\n" for item in items) + "  " * indent + "}"


def _size_limits() -> dict[str, list[int]]:
    """For each unit and fraction length 0..3: the largest whole*10^f+frac that stays within MAX_SIZE_MIB.

    With it the Lua never multiplies past 2^53: it checks the limit, then computes exactly."""
    return {u: [MAX_SIZE_MIB * 10**f * (1 << 20) // per for f in range(SIZE_FRAC_DIGITS + 1)]
            for u, per in SIZE_UNITS.items()}


def _partition_literal(p: PartitionTable) -> dict[str, Any]:
    return {"name": p.name, "label": p.label, "mode": p.mode, "noun": MODE_NOUNS[p.mode],
            "classes": {c: True for c in p.classes}, "class_list": ", ".join(p.classes),
            "gpu_total": p.gpu_total_mib, "usable": p.usable_mib, "shard_count": p.shard_count,
            "max_gpus": p.max_gpus, "mig": [{"name": o.name, "memory": o.memory_mib} for o in p.mig],
            "mig_names": ", ".join(o.name for o in p.mig)}


def lua_context(t: SubmitTables) -> dict[str, Any]:
    """The template context: every table and constant the Lua uses, already computed."""
    keys = [{"name": k, "kind": ks.kind, "field": ks.field, "help": ks.help, "max_len": ks.max_len,
             "shapes": list(ks.lua_shapes), "lo": ks.lo, "hi": ks.hi, "choices": {c: True for c in ks.choices},
             "choice_list": sorted(ks.choices), "canonical_only": ks.canonical_only, "user_hint": ks.user_hint}
            for k, ks in spec.KEYS.items()]
    readable = ", ".join([spec.MARKER] + [f"gpuarb/{v}:" for v in spec.SUPPORTED_VERSIONS])
    grammar = {
        "marker": spec.MARKER, "word": spec.MARKER[:-1], "canonical_marker": spec.CANONICAL_MARKER,
        "versions": {v: True for v in spec.SUPPORTED_VERSIONS}, "readable_versions": readable,
        "boundary": {ord(c): True for c in sorted(spec.MARKER_BOUNDARY)}, "example": EXAMPLE,
        "max_body": spec.MAX_BODY_CHARS, "max_tokens": spec.MAX_TOKENS, "quote_max": spec.QUOTE_MAX_CHARS,
        "keys": keys, "valid_all": ", ".join(spec.KEYS), "valid_user": ", ".join(spec.USER_KEYS),
        "suggest_all": sorted(spec.KEYS), "suggest_user": sorted(spec.USER_KEYS), "mig_any": spec.MIG_ANY,
        "size_units": dict(SIZE_UNITS), "size_limits": _size_limits(), "size_help": SIZE_UNITS_HELP,
        "max_size_tib": MAX_SIZE_MIB // (1 << 20),
        "duration_units": [[u, parse_duration_s(f"1{u}")] for u in "dhms"], "max_duration": MAX_DURATION_S,
        "digits": {"whole": SIZE_WHOLE_DIGITS, "frac": SIZE_FRAC_DIGITS, "unit_lo": SIZE_UNIT_LETTERS[0],
                   "unit_hi": SIZE_UNIT_LETTERS[1], "percent": PERCENT_DIGITS, "int": INT_DIGITS,
                   "duration": DURATION_DIGITS, "duration_parts": DURATION_PARTS, "version": VERSION_DIGITS,
                   "marker_version": MARKER_VERSION_CHARS},
    }
    site = {
        "quantum": t.quantum_mib, "default_class": t.default_class, "class_qos": dict(t.class_qos),
        "class_names": sorted(t.class_qos), "class_listing": ", ".join(sorted(t.class_qos)) or "(none configured)",
        "partitions": {name: _partition_literal(p) for name, p in t.partitions.items()},
        "partition_names": ", ".join(t.partitions), "class_partition": dict(t.class_partition),
        "placeable_classes": ", ".join(c for c in t.class_qos if c in t.class_partition),
        "implicit": _partition_literal(t.implicit) if t.implicit is not None else False,
        "mig_fix": _mig_fix(t),
        "use_qos": t.use_qos, "privileged_uids": {u: True for u in t.privileged_uids},
        "gpu_gres": {g: True for g in GPU_GRES}, "gpu_fields": [list(f) for f in GPU_FIELDS],
        "user_prefix": USER_PREFIX, "mps_per_gpu": MPS_COUNT_PER_GPU,
    }
    return {"grammar": grammar, "site": site}


# --------------------------------------------------------------------------- rendering


def _environment(site_dir: str | os.PathLike[str] | None) -> jinja2.Environment:
    dirs = [str(site_dir)] if site_dir is not None else []
    dirs += [str(d) for d in default_template_dirs()]
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(dirs), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["lua"] = lua_literal
    return env


def render_lua(cfg: Config, *, use_qos: bool = False, privileged_uids: Sequence[int] = (0,),
               template_dir: str | os.PathLike[str] | None = None, source: str | None = None) -> dict[str, str]:
    """``{"job_submit.lua": …, "cli_filter.lua": …}`` for ``cfg``.

    ``use_qos`` sets each job's QoS from its class (sites with slurmdbd); ``privileged_uids`` may
    change a pending job's GRES (root and the controller agent); ``template_dir`` overrides
    templates by relative path; ``source`` names the inventory in the files' header (default:
    the config's path). Raises :class:`RenderError`."""
    tables = submit_tables(cfg, use_qos=use_qos, privileged_uids=privileged_uids)
    context = lua_context(tables)
    context["source"] = source if source is not None else (cfg.path.name if cfg.path is not None else "<defaults>")
    env = _environment(template_dir)
    out = {}
    for template in (JOB_SUBMIT, CLI_FILTER):
        try:
            text = env.get_template(template).render(**context)
        except jinja2.TemplateError as e:
            raise RenderError(f"template {template} failed to render") from e
        out[template.rsplit("/", 1)[-1].removesuffix(".j2")] = text
    return out
