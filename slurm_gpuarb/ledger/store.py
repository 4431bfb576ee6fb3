"""The ledger: leases, their state machine and the append-only decision log, in SQL.

Every write is one transaction. Concurrent writers never double-grant because :meth:`Ledger.acquire`
reads a node's live leases and inserts the new one under a lock that every acquire for that node
takes first: SQLite's database write lock (``BEGIN IMMEDIATE``), or on PostgreSQL the node's row in
``nodes`` (``SELECT … FOR UPDATE``), so acquires on different nodes run in parallel.

Choices made here:

* The lease's ``priority`` and ``preemptible`` come from :meth:`Ledger.acquire`'s keyword
  arguments when given, else from ``decision.inputs`` (top-level keys of those names, else the
  arbiter's ``inputs["class"]``), else 0 / not preemptible. ``min_mib`` and the TTL come from
  ``decision.inputs["min_mib"]`` / ``["ttl_s"]`` when the arbiter resolved them, else from the
  spec (``min`` when absolute, ``ttl``), else none / no expiry.
* The new lease's ``holds`` (the holder-mode reservation a holder job holds) is ``request.holds``: the
  caller (the daemon's job_start) decides whether a job may hold one.
* The request's decision row stores ``decision.inputs`` plus the canonical spec text under ``spec``
  (unless the inputs already have one), so ``gpuarb explain`` can show what a refused job asked for.
  Inputs whose JSON exceeds :data:`MAX_INPUTS_CHARS` are replaced by a stub naming their keys.
* Releasing or revoking an unknown lease id raises NotFoundError; one that already ended changes
  nothing and writes no row. The one exception is :meth:`Ledger.revoke_ended`: the controller agent
  records that a released (or expired) lease was in truth preempted. ``leases()`` and ``decisions()``
  list oldest first; with ``limit`` they return the newest ``limit`` rows, still oldest first.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.pool import PoolProxiedConnection

from ..errors import LedgerError, NotFoundError, SchemaVersionError
from ..model import Decision, DecisionRecord, GpuInfo, Lease, LeaseState, Matcher, Outcome, Request, Reservation
from . import migrate, schema
from .engine import Target, create_engines, file_lock, parse_url, prepare_sqlite_file, translate_errors
from .schema import EXPIRED, HEAD_REVISION, RELEASED, REVISIONS, REVOKED
from .statements import Statements, lease_from_tuple, lease_params

MAX_INPUTS_CHARS = 64 * 1024
_MAX_IDLE = 4

L, D = schema.leases, schema.decisions

_END_ACTIONS = {RELEASED: ("release", "released"), EXPIRED: ("expire", "expired"), REVOKED: ("revoke", "revoke")}


def new_lease_id() -> str:
    """A short unique lease id: ``L`` and 12 hex digits (48 random bits)."""
    return "L" + secrets.token_hex(6)


def _record(r: sa.Row[Any]) -> DecisionRecord:
    return DecisionRecord(
        id=r.id, ts=float(r.ts), plane=r.plane, action=r.action, outcome=r.outcome, node=r.node, reason=r.reason,
        lease_id=r.lease_id, job_id=r.job_id, restart_count=r.restart_count, prio=r.prio,
        requested_mib=r.requested_mib, granted_mib=r.granted_mib, inputs=json.loads(r.inputs) if r.inputs else {})


def _dumps(inputs: Mapping[str, Any] | None) -> str | None:
    if not inputs:
        return None
    text = json.dumps(inputs, separators=(",", ":"), default=str)
    if len(text) > MAX_INPUTS_CHARS:
        text = json.dumps({"truncated_chars": len(text), "keys": sorted(str(k) for k in inputs)})
    return text


def _row(ts: float, plane: str, action: str, outcome: str, node: str | None, reason: str, *,
         lease_id: str | None = None, job_id: str | None = None, restart_count: int = 0, prio: str | None = None,
         requested_mib: int | None = None, granted_mib: int | None = None,
         inputs: str | None = None) -> dict[str, Any]:
    """One decisions row; every row has every key so a list of them can be one executemany."""
    return {"ts": ts, "plane": plane, "action": action, "outcome": outcome, "node": node, "reason": reason,
            "lease_id": lease_id, "job_id": job_id, "restart_count": restart_count, "prio": prio,
            "requested_mib": requested_mib, "granted_mib": granted_mib, "inputs": inputs}


def _with_id(decision: Decision, decision_id: int) -> Decision:
    """``replace(decision, decision_id=…)`` without dataclasses.replace's per-call field walk: this runs
    for every lease request, inside the ledger's write lock."""
    copy: Decision = object.__new__(Decision)
    copy.__dict__.update(decision.__dict__, decision_id=decision_id)
    return copy


def _int_input(inputs: Mapping[str, Any], key: str) -> int | None:
    value = inputs.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Ledger:
    """The lease ledger. Open with :meth:`open`; safe to share between threads; not across ``fork()``."""

    def __init__(self, target: Target, reader: Engine, writer: Engine) -> None:
        self._target = target
        self._reader = reader
        self._writer = writer
        self._pg = target.dialect == "postgresql"
        self._sql = Statements(reader.dialect)
        self._idle: list[PoolProxiedConnection] = []  # SQLite write connections kept for the hot path

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def open(cls, url: str, *, create: bool = True, password_file: str | None = None, check: bool = True) -> Ledger:
        """Open the ledger at ``url`` (``sqlite:///PATH`` or ``postgresql+psycopg://USER@HOST/DB``).

        ``create``: a new, empty database is initialised to the head revision (under a lock, so many
        processes opening a fresh ledger at once do not race). An existing database is never
        migrated here. ``check``: raise SchemaVersionError unless the schema is at the head revision, or
        newer with a ``schema_compat.min_reader`` this gpuarb knows (a rolling upgrade);
        ``gpuarb db upgrade`` opens with ``check=False`` and then calls :meth:`upgrade`.
        ``password_file``: a 0600 file holding the PostgreSQL password.
        """
        target = parse_url(url, password_file=password_file)
        if target.path is not None:
            prepare_sqlite_file(target.path, create=create or not check)
        with translate_errors(target, "connect"):
            reader, writer = create_engines(target)
        ledger = cls(target, reader, writer)
        try:
            ledger._open_schema(create=create, check=check)
        except BaseException:
            ledger.close()
            raise
        return ledger

    def close(self) -> None:
        """Close every pooled connection."""
        while self._idle:
            self._idle.pop().close()
        self._reader.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The ledger's URL without its password."""
        return self._target.display

    def _open_schema(self, *, create: bool, check: bool) -> None:
        with self._read("read the schema version") as conn:
            tables = migrate.table_names(conn)
            rev = migrate.read_revision(conn, tables)
            min_reader = migrate.read_min_reader(conn, tables)
        if rev is None and not tables and create:
            rev = self._migrate("head")[1]
            tables = {migrate.VERSION_TABLE}
        if not check or rev == HEAD_REVISION:
            return
        if rev is not None and rev not in REVISIONS and min_reader in REVISIONS:
            return  # a newer schema that says this gpuarb can still use it: a rolling upgrade
        if rev is None and tables:
            raise LedgerError(f"{self.url} holds tables ({', '.join(sorted(tables)[:5])}) but no gpuarb schema "
                              "version: it is not a gpuarb ledger; point the ledger URL at an empty database")
        if rev is None:
            raise SchemaVersionError(f"ledger {self.url} has no schema yet: run `gpuarb db upgrade`")
        raise self._version_error(rev)

    def _version_error(self, rev: str) -> SchemaVersionError:
        if rev in REVISIONS:
            return SchemaVersionError(f"ledger schema is at revision {rev}, this gpuarb needs {HEAD_REVISION}: run "
                                      "`gpuarb db upgrade`")
        return SchemaVersionError(
            f"ledger schema is at revision {rev}, which this gpuarb does not know (it needs {HEAD_REVISION}), and the "
            "schema does not say this gpuarb can use it (schema_compat): a newer gpuarb upgraded the ledger; "
            "upgrade gpuarb on this host too")

    def revision(self) -> str | None:
        """The schema revision the database is at (None: not initialised)."""
        with self._read("read the schema version") as conn:
            return migrate.read_revision(conn)

    def upgrade(self, revision: str = "head") -> tuple[str | None, str]:
        """Migrate the schema to ``revision`` (default the newest); returns ``(from, to)``."""
        return self._migrate(revision)

    def _migrate(self, revision: str) -> tuple[str | None, str]:
        path = self._target.path
        lock = file_lock(path + ".lock") if path is not None else contextlib.nullcontext()
        with lock, translate_errors(self._target, f"migrate the schema to {revision}"), self._writer.begin() as conn:
            if self._pg:
                # Transaction-scoped: released at commit, so a crashed migrator cannot leave it held.
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(hashtext('gpuarb-migrate:' || current_schema()))")
            tables = migrate.table_names(conn)
            before = migrate.read_revision(conn, tables)
            if before is None and tables:
                raise LedgerError(f"{self.url} holds tables but no gpuarb schema version: it is not a gpuarb ledger "
                                  "and will not be migrated")
            if before is not None and before not in REVISIONS:
                raise self._version_error(before)
            if not (revision == "head" and before == HEAD_REVISION):
                migrate.run_upgrade(conn, revision)
            after = migrate.read_revision(conn)
        if after is None:
            raise LedgerError(f"migrating {self.url} to {revision} left no schema version")
        return before, after

    # ------------------------------------------------------------------ transactions

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[sa.Connection]:
        """A SQLAlchemy connection in a write transaction (BEGIN IMMEDIATE on SQLite)."""
        with translate_errors(self._target, what), self._writer.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self, what: str) -> Iterator[sa.Connection]:
        with translate_errors(self._target, what), self._reader.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def _txn(self, what: str) -> Iterator[Any]:
        """A DBAPI cursor in a write transaction, for the precompiled :mod:`.statements` (the hot path).
        Commits when the block ends, rolls back if it raises."""
        with translate_errors(self._target, what):
            try:
                raw = self._idle.pop()
            except IndexError:
                raw = self._reader.raw_connection()
            healthy = False
            try:
                cur = raw.cursor()
                try:
                    if not self._pg:
                        cur.execute("BEGIN IMMEDIATE")  # take the write lock before reading
                    yield cur
                    raw.commit()
                    healthy = True
                except BaseException:
                    try:
                        raw.rollback()
                        healthy = True
                    except Exception:
                        raw.invalidate()  # a connection that cannot roll back is not reused
                    raise
                finally:
                    cur.close()
            finally:
                # SQLite: keep the connection out of the pool for the next write. A pool checkout and
                # checkin cost about as much as SQLite's own work for a small transaction.
                if healthy and not self._pg and len(self._idle) < _MAX_IDLE:
                    self._idle.append(raw)
                else:
                    raw.close()

    # ------------------------------------------------------------------ acquire

    def acquire(self, request: Request, decide: Callable[[Sequence[Lease]], Decision], *, spec_text: str,
                plane: str = "host", priority: int | None = None,
                preemptible: bool | None = None) -> tuple[Decision, Lease | None]:
        """Decide and record one lease request atomically; returns the decision and the new lease (None
        unless granted or degraded).

        Under the node's lock: expire the node's leases whose TTL passed (``request.now``), call
        ``decide`` with the live ones (it must be pure and fast: the lock is held), insert the lease,
        revoke what the decision preempts, and append the decision rows. A second request for a live
        (job_id, restart_count, node) returns the existing lease without calling ``decide``.
        """
        node, now, sql = request.node, request.now, self._sql
        with self._txn(f"record a lease request on {node}") as cur:
            if self._pg:
                # Serialise this node's acquires on its `nodes` row, inserted on first use.
                cur.execute(sql.lock_node, {"node": node})
                if cur.fetchone() is None:
                    cur.execute(sql.insert_node, {"node": node})
                    cur.execute(sql.lock_node, {"node": node})
            cur.execute(sql.live_on_node, {"node": node})
            live: list[Lease] = []
            expired: list[str] = []
            for r in cur.fetchall():
                if r[16] is not None and r[16] <= now:  # expires_at
                    expired.append(r[0])
                else:
                    live.append(lease_from_tuple(r))
            rows: list[dict[str, Any]] = []
            for lease_id in expired:
                rows += self._end(cur, ("id",), {"f_id": lease_id}, EXPIRED, now, plane, "ttl")[1]

            if request.job_id is not None:
                for le in live:
                    if le.job_id == request.job_id and le.restart_count == request.restart_count:
                        decision = self._retry_decision(le)
                        rows.append(_row(now, plane, "request", decision.outcome.value, node, decision.reason,
                                         lease_id=le.id, job_id=le.job_id, restart_count=le.restart_count,
                                         prio=le.prio, granted_mib=le.vram_mib, inputs=_dumps(decision.inputs)))
                        if len(rows) > 1:
                            cur.executemany(sql.insert_decision, rows[:-1])
                        return _with_id(decision, self._insert_decision_id(cur, rows[-1])), le

            decision = decide(live)
            lease: Lease | None = None
            if decision.granted:
                lease = self._new_lease(request, decision, spec_text, priority, preemptible)
                cur.execute(sql.insert_lease, lease_params(lease))
                if decision.revoke:
                    rows += self._revoke_for(cur, lease, decision, live, plane)
            inputs = decision.inputs
            if "spec" not in inputs:
                inputs = {"spec": spec_text, **inputs}
            rows.append(_row(now, plane, "request", decision.outcome.value, node, decision.reason,
                             lease_id=lease.id if lease else None, job_id=request.job_id,
                             restart_count=request.restart_count, prio=decision.prio,
                             requested_mib=decision.requested_mib,
                             granted_mib=decision.granted_mib if lease else None, inputs=_dumps(inputs)))
            if len(rows) > 1:
                cur.executemany(sql.insert_decision, rows[:-1])
            decision_id = self._insert_decision_id(cur, rows[-1])
        return _with_id(decision, decision_id), lease

    def _insert_decision_id(self, cur: Any, row: Mapping[str, Any]) -> int:
        """Append the request's decision row and return its id (``gpuarb explain D<id>``)."""
        if self._pg:
            cur.execute(self._sql.insert_decision_id, row)
            return int(cur.fetchone()[0])
        cur.execute(self._sql.insert_decision, row)  # sqlite3 knows the new rowid without RETURNING
        return int(cur.lastrowid)

    def _revoke_for(self, cur: Any, lease: Lease, decision: Decision, live: Sequence[Lease],
                    plane: str) -> list[dict[str, Any]]:
        """Revoke the live leases ``decision`` preempts in favour of ``lease``; their decision rows."""
        why = (f"preempted by lease {lease.id} (job {lease.job_id or '-'}, prio {decision.prio}) on {lease.node}: "
               f"{decision.reason}")
        by = _dumps({"by_lease": lease.id, "by_job": lease.job_id, "by_prio": decision.prio})
        live_ids = {le.id for le in live}
        rows: list[dict[str, Any]] = []
        for victim in decision.revoke:
            if victim in live_ids:  # the arbiter only sees this node's live leases
                rows += self._end(cur, ("id",), {"f_id": victim}, REVOKED, lease.created_at, plane, why, by)[1]
        return rows

    @staticmethod
    def _retry_decision(le: Lease) -> Decision:
        return Decision(
            outcome=Outcome.GRANT, node=le.node, prio=le.prio, requested_mib=None, granted_mib=le.vram_mib,
            gpus=le.gpus, mig_uuid=le.mig_uuid,
            reason=f"job {le.job_id} run {le.restart_count} already holds lease {le.id} on {le.node} "
                   "(retried request): returning it, nothing new granted",
            inputs={"retry_of": le.id})

    @staticmethod
    def _new_lease(request: Request, decision: Decision, spec_text: str, priority: int | None,
                   preemptible: bool | None) -> Lease:
        inputs, spec = decision.inputs, request.spec
        cls = inputs.get("class")  # the arbiter's record of the priority class it applied
        cls_inputs: Mapping[str, Any] = cls if isinstance(cls, Mapping) else {}
        if priority is None:
            priority = _int_input(inputs, "priority")
            if priority is None:
                priority = _int_input(cls_inputs, "priority") or 0
        if preemptible is None:
            preemptible = inputs.get("preemptible", cls_inputs.get("preemptible")) is True
        min_mib = _int_input(inputs, "min_mib")
        if min_mib is None and spec.min is not None:
            min_mib = spec.min.mib
        ttl = _int_input(inputs, "ttl_s")
        if ttl is None:
            ttl = spec.ttl_s
        gpus = decision.gpus or ((request.gpu,) if request.gpu is not None else ())
        return Lease(
            id=new_lease_id(), node=request.node, gpus=gpus, vram_mib=decision.granted_mib, prio=decision.prio,
            priority=priority, preemptible=preemptible, state=LeaseState.GRANTED, created_at=request.now,
            spec=spec_text, min_mib=min_mib, mig_uuid=decision.mig_uuid, job_id=request.job_id,
            restart_count=request.restart_count, owner_uid=request.owner_uid, pid=request.pid,
            expires_at=request.now + ttl if ttl else None, holds=request.holds)

    # ------------------------------------------------------------------ ending leases

    def _end(self, cur: Any, filters: tuple[str, ...], params: dict[str, Any], state: str, now: float, plane: str,
             reason: str, inputs: str | None = None) -> tuple[list[Lease], list[dict[str, Any]]]:
        """Move the live leases matching ``filters`` to ``state``; returns them and their decision rows
        (not yet inserted). Only leases this UPDATE matched get a row, so of two transactions ending one
        lease at once, one writes it."""
        cur.execute(self._sql.end_leases(filters), {**params, "e_state": state, "e_now": now, "e_reason": reason})
        action, outcome = _END_ACTIONS[state]
        ended, rows = [], []
        for r in cur.fetchall():
            le = lease_from_tuple(r)
            ended.append(le)
            why = reason
            if state == EXPIRED and reason == "ttl":
                why = f"TTL ran out at {le.expires_at:.0f} (lease {le.id}, job {le.job_id or '-'})"
            rows.append(_row(now, plane, action, outcome, le.node, why, lease_id=le.id, job_id=le.job_id,
                             restart_count=le.restart_count, prio=le.prio, granted_mib=le.vram_mib, inputs=inputs))
        return ended, rows

    def _end_leases(self, filters: tuple[str, ...], params: dict[str, Any], state: str, now: float, plane: str,
                    reason: str, what: str, lease_id: str | None = None,
                    inputs: Mapping[str, Any] | None = None) -> list[Lease]:
        sql = self._sql
        with self._txn(what) as cur:
            ended, rows = self._end(cur, filters, params, state, now, plane, reason, _dumps(inputs))
            if not ended:
                if lease_id is not None:
                    cur.execute(sql.lease_exists, {"id": lease_id})
                    if cur.fetchone() is None:
                        raise NotFoundError(
                            f"the ledger has no lease {lease_id!r}: `gpuarb lease list --all` lists leases")
                return []
            if len(rows) == 1:
                cur.execute(sql.insert_decision, rows[0])
            else:
                cur.executemany(sql.insert_decision, rows)
        return ended

    def release(self, lease_id: str | None = None, *, job_id: str | None = None, restart_count: int | None = None,
                node: str | None = None, reason: str = "released", plane: str = "host",
                now: float | None = None, inputs: Mapping[str, Any] | None = None) -> list[Lease]:
        """Release one lease by id, or a job's live leases (filtered by ``restart_count`` and ``node`` when
        given, so a late Epilog of run 0 leaves run 1's lease alone). Idempotent: leases that already
        ended are left as they are and get no new row. Returns the leases this call released.
        ``inputs`` is stored with each release row (the Epilog's observed peak, exit code)."""
        ts = time.time() if now is None else now
        if lease_id is not None:
            return self._end_leases(("id",), {"f_id": lease_id}, RELEASED, ts, plane, reason,
                                    f"release lease {lease_id}", lease_id=lease_id, inputs=inputs)
        if job_id is None:
            raise ValueError("release() needs a lease id or a job id")
        params: dict[str, Any] = {"f_job_id": job_id, "f_restart_count": restart_count, "f_node": node}
        filters = tuple(f for f in ("job_id", "restart_count", "node") if params[f"f_{f}"] is not None)
        return self._end_leases(filters, params, RELEASED, ts, plane, reason, f"release job {job_id}'s leases",
                                inputs=inputs)

    def revoke(self, lease_id: str, *, reason: str, plane: str, now: float | None = None) -> Lease | None:
        """Take a live lease back (admin, reconcile). Returns it, or None if it had already ended."""
        ts = time.time() if now is None else now
        ended = self._end_leases(("id",), {"f_id": lease_id}, REVOKED, ts, plane, reason, f"revoke lease {lease_id}",
                                 lease_id=lease_id)
        return ended[0] if ended else None

    def revoke_ended(self, lease_id: str, *, reason: str, plane: str = "agent", now: float | None = None,
                     inputs: Mapping[str, Any] | None = None) -> Lease | None:
        """Correct how a lease ended: one the Epilog *released* (or a reconcile *expired*) was in truth
        taken back, because Slurm preempted and requeued its job (the Epilog cannot tell a preemption from
        an ordinary end). The lease becomes ``revoked`` with ``reason``; its ``ended_at`` stays (the memory
        was given back then), and one ``revoke`` decision row says why.

        This is the one move between final states, and only this one (released | expired → revoked):
        a live lease is revoked with :meth:`revoke`. Returns the corrected lease, or None when it is
        not released or expired (still live, or already revoked: no row is written then).
        NotFoundError when the ledger never had it.
        """
        ts = time.time() if now is None else now
        ended = sa.and_(L.c.id == lease_id, L.c.state.in_((RELEASED, EXPIRED)))
        with self._write(f"record lease {lease_id} as revoked") as conn:
            row = conn.execute(sa.update(L).where(ended).values(state=REVOKED, end_reason=reason)
                               .returning(*L.c)).first()
            if row is not None:
                lease = lease_from_tuple(row)
                conn.execute(D.insert(), _row(
                    ts, plane, "revoke", "revoke", lease.node, reason, lease_id=lease.id, job_id=lease.job_id,
                    restart_count=lease.restart_count, prio=lease.prio, granted_mib=lease.vram_mib,
                    inputs=_dumps(inputs)))
                return lease
        self.get(lease_id)  # NotFoundError when it never existed
        return None

    def expire(self, now: float, *, node: str | None = None, plane: str = "agent") -> list[Lease]:
        """End every live lease (of ``node``, or all) whose TTL ran out by ``now``; a decision row each."""
        filters = ("expires_by", "node") if node is not None else ("expires_by",)
        return self._end_leases(filters, {"f_expires_by": now, "f_node": node}, EXPIRED, now, plane, "ttl",
                                "expire leases")

    def expire_lease(self, lease_id: str, *, reason: str, plane: str = "agent", now: float | None = None,
                     inputs: Mapping[str, Any] | None = None) -> Lease | None:
        """End one live lease as expired for ``reason`` (reconcile: its job no longer runs). Returns it,
        or None when it had already ended (no row is written then)."""
        ts = time.time() if now is None else now
        ended = self._end_leases(("id",), {"f_id": lease_id}, EXPIRED, ts, plane, reason, f"expire lease {lease_id}",
                                 lease_id=lease_id, inputs=inputs)
        return ended[0] if ended else None

    def renew(self, lease_id: str, ttl_s: int, now: float | None = None, *, plane: str = "host") -> Lease:
        """Extend a live lease: it now expires ``ttl_s`` seconds after ``now``; one decision row.

        NotFoundError when the ledger has no such lease, or when it is no longer live (ended, or its
        TTL already ran out: its memory may be someone else's by now; ask for a new lease).
        """
        if ttl_s <= 0:
            raise ValueError("renew() needs ttl_s > 0")
        ts = time.time() if now is None else now
        live = sa.and_(L.c.id == lease_id, L.c.state == schema.GRANTED,
                       sa.or_(L.c.expires_at.is_(None), L.c.expires_at > ts))
        with self._write(f"renew lease {lease_id}") as conn:
            row = conn.execute(sa.update(L).where(live).values(expires_at=ts + ttl_s).returning(*L.c)).first()
            if row is not None:
                lease = lease_from_tuple(row)
                conn.execute(D.insert(), _row(
                    ts, plane, "renew", "renewed", lease.node, f"TTL renewed: expires {ttl_s}s from now",
                    lease_id=lease.id, job_id=lease.job_id, restart_count=lease.restart_count, prio=lease.prio,
                    granted_mib=lease.vram_mib, inputs=_dumps({"ttl_s": ttl_s, "expires_at": ts + ttl_s})))
                return lease
        old = self.get(lease_id)  # NotFoundError when it never existed
        if old.state is LeaseState.GRANTED:
            raise NotFoundError(f"lease {lease_id}'s TTL ran out at {old.expires_at:.0f}: it cannot be renewed; "
                                "request a new lease")
        raise NotFoundError(f"lease {lease_id} is no longer live ({old.state.value}): it cannot be renewed; "
                            "request a new lease")

    # ------------------------------------------------------------------ observed peaks

    def record_peaks(self, peaks: Mapping[str, int], *, now: float | None = None) -> None:
        """Remember, per lease id, the most MiB its processes were seen holding (kept if higher)."""
        if not peaks:
            return
        ts = time.time() if now is None else now
        table = schema.lease_peaks
        stmt: Any  # both dialects' Insert have the same on_conflict_do_update API
        if self._pg:
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(table)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table)
        stmt = stmt.on_conflict_do_update(index_elements=[table.c.lease_id], set_={
            "peak_mib": sa.case((stmt.excluded.peak_mib > table.c.peak_mib, stmt.excluded.peak_mib),
                                else_=table.c.peak_mib),
            "sampled_at": stmt.excluded.sampled_at})
        rows = [{"lease_id": k, "peak_mib": int(v), "sampled_at": ts} for k, v in sorted(peaks.items())]
        with self._write("record observed peaks") as conn:
            conn.execute(stmt, rows)

    def peaks(self, lease_ids: Iterable[str]) -> dict[str, int]:
        """The recorded peak MiB of each lease id that has one."""
        ids = sorted(set(lease_ids))
        if not ids:
            return {}
        table = schema.lease_peaks
        with self._read("read observed peaks") as conn:
            rows = conn.execute(sa.select(table.c.lease_id, table.c.peak_mib).where(table.c.lease_id.in_(ids)))
            return {r[0]: int(r[1]) for r in rows}

    # ------------------------------------------------------------------ reading leases

    def get(self, lease_id: str) -> Lease:
        """The lease ``lease_id`` in any state (NotFoundError if the ledger never had it)."""
        with self._read(f"read lease {lease_id}") as conn:
            row = conn.execute(sa.select(L).where(L.c.id == lease_id)).first()
        if row is None:
            raise NotFoundError(f"the ledger has no lease {lease_id!r}: `gpuarb lease list --all` lists leases")
        return lease_from_tuple(row)

    def leases(self, *, state: LeaseState | None = None, node: str | None = None, job_id: str | None = None,
               limit: int | None = None) -> list[Lease]:
        """Leases matching every filter given, oldest first (with ``limit``: the newest ``limit``)."""
        stmt = sa.select(L)
        if state is not None:
            stmt = stmt.where(L.c.state == LeaseState(state).value)
        if node is not None:
            stmt = stmt.where(L.c.node == node)
        if job_id is not None:
            stmt = stmt.where(L.c.job_id == job_id)
        stmt = stmt.order_by(L.c.created_at.desc(), L.c.id.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read("list leases") as conn:
            found = [lease_from_tuple(r) for r in conn.execute(stmt)]
        found.reverse()
        return found

    def live(self, node: str | None = None) -> list[Lease]:
        """Granted leases (of ``node``, or everywhere), oldest first. TTLs are not checked here."""
        return self.leases(state=LeaseState.GRANTED, node=node)

    # ------------------------------------------------------------------ decision log

    def record(self, *, plane: str, action: str, outcome: str, node: str | None, reason: str,
               lease_id: str | None = None, job_id: str | None = None, restart_count: int = 0,
               prio: str | None = None, requested_mib: int | None = None, granted_mib: int | None = None,
               inputs: Mapping[str, Any] | None = None, now: float | None = None) -> int:
        """Append one decision row (a decision made outside :meth:`acquire`); returns its id."""
        row = _row(time.time() if now is None else now, plane, action, outcome, node, reason, lease_id=lease_id,
                   job_id=job_id, restart_count=restart_count, prio=prio, requested_mib=requested_mib,
                   granted_mib=granted_mib, inputs=_dumps(inputs))
        with self._write("append a decision") as conn:
            key = conn.execute(D.insert(), row).inserted_primary_key
        assert key is not None
        return int(key[0])

    def decisions(self, *, lease_id: str | None = None, job_id: str | None = None, node: str | None = None,
                  limit: int | None = None, plane: str | None = None,
                  action: str | None = None) -> list[DecisionRecord]:
        """Decision rows matching every filter given, oldest first (with ``limit``: the newest ``limit``)."""
        stmt = sa.select(D)
        if plane is not None:
            stmt = stmt.where(D.c.plane == plane)
        if action is not None:
            stmt = stmt.where(D.c.action == action)
        if lease_id is not None:
            stmt = stmt.where(D.c.lease_id == lease_id)
        if job_id is not None:
            stmt = stmt.where(D.c.job_id == job_id)
        if node is not None:
            stmt = stmt.where(D.c.node == node)
        stmt = stmt.order_by(D.c.id.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._read("read the decision log") as conn:
            found = [_record(r) for r in conn.execute(stmt)]
        found.reverse()
        return found

    def decision(self, decision_id: int) -> DecisionRecord | None:
        """One decision row by id (``gpuarb explain D17``), or None."""
        with self._read(f"read decision {decision_id}") as conn:
            row = conn.execute(sa.select(D).where(D.c.id == decision_id)).first()
        return None if row is None else _record(row)

    # ------------------------------------------------------------------ snapshots

    def sync_reservations(self, reservations: Sequence[Reservation], node: str, *, now: float | None = None) -> None:
        """Replace ``node``'s rows in ``reservations`` with the configured ones that apply to it."""
        ts = time.time() if now is None else now
        rows = []
        for r in reservations:
            if r.node not in (None, node):
                continue
            match = {k: v for k, v in (("process", r.match.process), ("user", r.match.user),
                                       ("pidfile", r.match.pidfile)) if v is not None}
            rows.append({"node": node, "name": r.name, "gpu": r.gpu, "size_mib": r.size_mib,
                         "match": json.dumps(match, sort_keys=True), "mode": r.mode, "updated_at": ts})
        table = schema.reservations
        with self._write(f"store {node}'s standing reservations") as conn:
            conn.execute(sa.delete(table).where(table.c.node == node))
            if rows:
                conn.execute(table.insert(), rows)

    def reservations(self, node: str | None = None) -> list[Reservation]:
        """Stored standing reservations (of ``node``, or all), ordered by node and name."""
        table = schema.reservations
        stmt = sa.select(table).order_by(table.c.node, table.c.name)
        if node is not None:
            stmt = stmt.where(table.c.node == node)
        with self._read("read standing reservations") as conn:
            return [Reservation(name=r.name, size_mib=r.size_mib, gpu=r.gpu, node=r.node, mode=r.mode,
                                match=Matcher(**json.loads(r.match))) for r in conn.execute(stmt)]

    def snapshot_inventory(self, node: str, gpus: Sequence[GpuInfo], *, now: float | None = None) -> None:
        """Replace ``node``'s inventory rows with ``gpus`` (what the GPUs are, not how full they are)."""
        ts = time.time() if now is None else now
        rows = [{"node": node, "gpu_index": g.index, "uuid": g.uuid, "name": g.name, "total_mib": g.total_mib,
                 "reserved_mib": g.reserved_mib, "minor": g.minor, "updated_at": ts} for g in gpus]
        table = schema.inventory
        with self._write(f"store {node}'s GPU inventory") as conn:
            conn.execute(sa.delete(table).where(table.c.node == node))
            if rows:
                conn.execute(table.insert(), rows)

    def inventory(self, node: str | None = None) -> dict[str, list[GpuInfo]]:
        """The stored inventory by node, GPUs by index. ``used_mib`` is 0: a snapshot holds no usage."""
        table = schema.inventory
        stmt = sa.select(table).order_by(table.c.node, table.c.gpu_index)
        if node is not None:
            stmt = stmt.where(table.c.node == node)
        found: dict[str, list[GpuInfo]] = {}
        with self._read("read the GPU inventory") as conn:
            for r in conn.execute(stmt):
                found.setdefault(r.node, []).append(GpuInfo(
                    index=r.gpu_index, uuid=r.uuid, name=r.name, total_mib=r.total_mib,
                    reserved_mib=r.reserved_mib, used_mib=0, minor=r.minor))
        return found
