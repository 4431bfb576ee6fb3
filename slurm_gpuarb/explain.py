"""Retell a decision as one paragraph a person can act on (``gpuarb explain JOB``).

Everything here reads the JSON ``inputs`` the arbiter stored with its decision (the shape is
documented in :mod:`slurm_gpuarb.arbiter`), never live telemetry: an explanation says what the
arbiter saw *then*. Inputs come back from the ledger, possibly written by an older version,
so every key is read defensively and a missing one only shortens the story.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from slurm_gpuarb.arbiter import tenant_phrase
from slurm_gpuarb.model import Decision, DecisionRecord, TenantKind
from slurm_gpuarb.units import human_size

__all__ = ["explain_decision", "explain_decision_obj", "explain_history", "format_ts"]

_SPEC_ORDER = ("vram", "gpus", "prio", "min", "mig", "share", "ttl", "wait", "engine", "shards")
_MAX_GPUS = 8  # GPUs described one by one; more are summarised
_MAX_NAMED = 3  # leases named by id

_DONE = {"release": "released", "expire": "expired", "revoke": "revoked", "reconcile": "reconciled"}


def format_ts(ts: float) -> str:
    """A decision time for people: ``2026-11-23 14:05:01 UTC`` (UTC, so nodes in any zone agree)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def explain_decision(record: DecisionRecord) -> str:
    """One paragraph for one ledger row: when and where, then what was asked, seen and answered.

    Rows without arbiter inputs (release, expire, revoke, …) get one sentence: what happened
    to which lease, and why.
    """
    where = f" on {record.node}" if record.node else ""
    head = f"At {format_ts(record.ts)}, {record.plane}{where}:"
    if not record.inputs or "request" not in record.inputs:
        return f"{head} {_event(record)}"
    body = _paragraph(
        outcome=record.outcome, reason=record.reason, inputs=record.inputs, requested=record.requested_mib,
        granted=record.granted_mib, lease_id=record.lease_id, job_id=record.job_id,
        restart_count=record.restart_count,
    )
    return f"{head} {body}"


def explain_decision_obj(decision: Decision) -> str:
    """The same paragraph for a fresh :class:`Decision` (before it has a ledger row and a time)."""
    req = decision.inputs.get("request", {})
    return _paragraph(
        outcome=str(decision.outcome), reason=decision.reason, inputs=decision.inputs,
        requested=decision.requested_mib, granted=decision.granted_mib, lease_id=None,
        job_id=req.get("job_id"), restart_count=int(req.get("restart_count") or 0),
    )


def explain_history(records: Sequence[DecisionRecord]) -> str:
    """A lease's or job's story in time order (request → grant → release/expire/revoke), one paragraph a line."""
    if not records:
        return "No decisions are recorded for it."
    return "\n".join(explain_decision(r) for r in sorted(records, key=lambda r: (r.ts, r.id)))


# --------------------------------------------------------------------------- rows without inputs


def _subject(lease_id: str | None, job_id: str | None, restart_count: int) -> str:
    job = f"job {job_id}" + (f" (restart {restart_count})" if restart_count else "") if job_id else ""
    if lease_id and job:
        return f"lease {lease_id} of {job}"
    return f"lease {lease_id}" if lease_id else (job or "an unnamed lease")


def _event(r: DecisionRecord) -> str:
    verb = _DONE.get(r.action, r.action)
    size = f" ({human_size(r.granted_mib)})" if r.granted_mib else ""
    note = "" if r.outcome in (verb, r.action) else f" [{r.outcome}]"
    reason = r.reason.rstrip(".") or "no reason was recorded"
    return f"{verb} {_subject(r.lease_id, r.job_id, r.restart_count)}{size}{note}: {reason}."


# --------------------------------------------------------------------------- the paragraph


def _int(d: Mapping[str, Any], key: str) -> int:
    v = d.get(key)
    return v if isinstance(v, int) else 0


def _asked(req: Mapping[str, Any], requested: int | None) -> str:
    size = human_size(requested) if requested else None
    vram = req.get("vram")
    if vram and str(vram).endswith("%"):
        what = f"{vram} of a GPU's memory" + (f" ({size})" if size else "")
    elif size:
        what = size
    else:
        what = f"vram={vram}" if vram else "an unsized lease"
    if req.get("mig"):
        what = f"a MIG instance ({req['mig']}) for {what}" if vram or size else f"a MIG instance ({req['mig']})"
    gpus = req.get("gpus")
    if gpus and gpus != "1":
        what += f" on each of {gpus} GPUs"
    if req.get("min"):
        what += f", accepting down to {req['min']}"
    return what


def _class_text(cls: Mapping[str, Any]) -> str:
    name = cls.get("name", "?")
    if "priority" not in cls:
        return f"class {name} (not a configured class)"
    pre = "preemptible" if cls.get("preemptible") else "not preemptible"
    deg = "may degrade" if cls.get("may_degrade") else "may not degrade"
    return f"class {name} (priority {cls['priority']}, {pre}, {deg})"


def _gpu_text(g: Mapping[str, Any], mig: Sequence[Mapping[str, Any]]) -> str:
    name = f"GPU {g.get('index')} ({g.get('name', '?')})"
    own = [m for m in mig if m.get("gpu") == g.get("index")]
    if own:
        free = [m for m in own if not m.get("tenant")]
        profiles = sorted({str(m.get("profile")) for m in free})
        which = f" ({', '.join(profiles)})" if profiles else ""
        return f"{name} is in MIG mode with {len(own)} instances, {len(free)} free{which}"
    return (f"{name} had {human_size(_int(g, 'free_mib'))} free of {human_size(_int(g, 'usable_mib'))} usable "
            f"({human_size(_int(g, 'total_mib'))} total − {human_size(_int(g, 'reserved_mib'))} driver reserve − "
            f"{human_size(_int(g, 'margin_mib'))} safety margin)")


def _tenants(gpus: Sequence[Mapping[str, Any]]) -> list[tuple[int, Mapping[str, Any]]]:
    return [(_int(g, "index"), t) for g in gpus for t in g.get("tenants", ())]


def _label_job(label: str) -> str | None:
    """The job id in a lease tenant's label (``job=42 holds=ollama``), if it names one."""
    for token in label.split():
        if token.startswith("job="):
            return token[4:] or None
    return None


def _reservation_text(i: int, t: Mapping[str, Any], many: bool) -> str:
    on = f" on GPU {i}" if many else ""
    seen = _int(t, "observed_mib")
    held_for = t.get("reservation")
    if t.get("kind") == TenantKind.LEASE:  # a holder job's lease holding a holder-mode reservation
        job = _label_job(str(t.get("label") or ""))
        of_job = f" of job {job}" if job else ""
        return (f"reservation {held_for}{on} (holder mode) held by lease {t.get('id')}{of_job}, its processes "
                f"counted in that lease ({human_size(_int(t, 'held_mib'))})")
    if held_for:
        return (f"reservation {t.get('id')}{on} (holder mode): no holder job — counts only what its processes use "
                f"({human_size(seen)})")
    size, held = _int(t, "size_mib"), _int(t, "held_mib")
    use = f"its processes used {human_size(seen)}" if seen else "its processes used nothing"
    return f"{t.get('id')}{on}, declared {human_size(size)}, {use}, counted once as {human_size(held)}"


def _reservations(tenants: list[tuple[int, Mapping[str, Any]]], many: bool) -> str:
    res = [(i, t) for i, t in tenants
           if t.get("kind") == TenantKind.RESERVATION or (t.get("kind") == TenantKind.LEASE and t.get("reservation"))]
    if not res:
        return "Nothing was reserved."
    return "Reserved: " + "; ".join(_reservation_text(i, t, many) for i, t in res) + "."


def _leases(tenants: list[tuple[int, Mapping[str, Any]]]) -> str:
    leases = [t for _, t in tenants if t.get("kind") == TenantKind.LEASE]
    if not leases:
        return "No leases were live."
    total = sum(_int(t, "held_mib") for t in leases)
    count = len({t.get("id") for t in leases})
    top = sorted(leases, key=lambda t: -_int(t, "held_mib"))[:_MAX_NAMED]
    named = ", ".join(f"{t.get('id')} {t.get('prio') or '?'} {human_size(_int(t, 'held_mib'))}" for t in top)
    more = ", …" if len(leases) > _MAX_NAMED else ""
    noun = "lease held" if count == 1 else "leases held"
    return f"Leased: {count} {noun} {human_size(total)} ({named}{more})."


def _foreign(tenants: list[tuple[int, Mapping[str, Any]]], many: bool) -> str:
    procs = [(i, t) for i, t in tenants if t.get("kind") == TenantKind.FOREIGN]
    if not procs:
        return ""
    procs.sort(key=lambda p: -_int(p[1], "held_mib"))
    parts = [tenant_phrase(TenantKind.FOREIGN, str(t.get("id")), None, str(t.get("label") or ""),
                           list(t.get("pids") or ())) + f" {human_size(_int(t, 'held_mib'))}"
             + (f" on GPU {i}" if many else "") for i, t in procs[:_MAX_NAMED]]
    more = f" and {len(procs) - _MAX_NAMED} more" if len(procs) > _MAX_NAMED else ""
    return "Foreign processes (not leased, not reserved): " + ", ".join(parts) + more + "."


def _answer(outcome: str, granted: int | None, inputs: Mapping[str, Any]) -> str:
    chosen = inputs.get("chosen") or []
    on = (" on GPU " if len(chosen) == 1 else " on GPUs ") + ", ".join(str(c) for c in chosen) if chosen else ""
    inst = f" (MIG instance {inputs['mig_uuid']})" if inputs.get("mig_uuid") else ""
    size = human_size(granted) if granted else ""
    revoked = inputs.get("revoked") or []
    rv = ""
    if revoked:
        rv = ", revoking " + ", ".join(
            f"lease {r.get('id')} ({r.get('prio') or '?'}, {human_size(_int(r, 'held_mib'))})" for r in revoked)
    if outcome == "grant":
        return f"Answer: granted {size}{on}{inst}{rv}"
    if outcome == "degrade":
        return f"Answer: degraded to {size}{on}{inst}"
    if outcome == "wait":
        return "Answer: wait"
    if outcome == "deny":
        return "Answer: denied"
    return f"Answer: {outcome}"


def _paragraph(*, outcome: str, reason: str, inputs: Mapping[str, Any], requested: int | None,
               granted: int | None, lease_id: str | None, job_id: str | None, restart_count: int) -> str:
    req: Mapping[str, Any] = inputs.get("request") or {}
    cls: Mapping[str, Any] = inputs.get("class") or {}
    gpus: Sequence[Mapping[str, Any]] = inputs.get("gpus") or []
    mig: Sequence[Mapping[str, Any]] = inputs.get("mig") or []
    who = _subject(lease_id, job_id or req.get("job_id"), restart_count)
    spec = " ".join(f"{k}={req[k]}" for k in _SPEC_ORDER if req.get(k) is not None)
    pinned = f", pinned to GPU {req['gpu']}" if req.get("gpu") is not None else ""
    node = req.get("node", "?")
    out = [f"{who[0].upper()}{who[1:]} asked node {node} for {_asked(req, requested)}{pinned} as {_class_text(cls)}"
           + (f" [{spec}]." if spec else ".")]
    if gpus:
        shown = [_gpu_text(g, mig) for g in gpus[:_MAX_GPUS]]
        if len(gpus) > _MAX_GPUS:
            rest = gpus[_MAX_GPUS:]
            shown.append(f"{len(rest)} more GPUs had at most {human_size(max(_int(g, 'free_mib') for g in rest))} "
                         "free")
        out.append("; ".join(shown) + ".")
        tenants = _tenants(gpus)
        many = len(gpus) > 1
        out.append(_reservations(tenants, many))
        if inputs.get("holds"):
            out.append(f"It is the holder job of reservation {inputs['holds']} (holder mode): that reservation's "
                       "processes count inside this lease, not on top of it.")
        out.append(_leases(tenants))
        foreign = _foreign(tenants, many)
        if foreign:
            out.append(foreign)
    answer = _answer(outcome, granted, inputs)
    out.append(f"{answer}. The arbiter said: {reason}" if reason else f"{answer}.")
    return " ".join(out)
