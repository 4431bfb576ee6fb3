"""The ledger's write path as SQL compiled once per dialect, run straight on the driver's cursor.

Every Slurm job acquires and releases a lease, so these statements are the ledger's hot path.
Executing a Core statement costs SQLAlchemy a cache-key walk, parameter processing and a result
wrapper per call — several times what SQLite itself spends on a small transaction. So the write
statements are still *written* in SQLAlchemy Core (from :mod:`.schema`, one source of truth for
both dialects), but compiled here once into driver-ready strings with named parameters
(``:name`` for sqlite3, ``%(name)s`` for psycopg) and executed on the DBAPI cursor inside one
explicit transaction. Reads and rare writes go through SQLAlchemy as usual.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Dialect

from ..model import Lease, LeaseState
from . import schema

L, D = schema.leases, schema.decisions

LEASE_KEYS: tuple[str, ...] = tuple(c.name for c in L.c)
DECISION_KEYS: tuple[str, ...] = tuple(c.name for c in D.c if c.name != "id")
_EXPECTED_LEASE_KEYS = (
    "id", "node", "gpus", "vram_mib", "min_mib", "prio", "priority", "preemptible", "state", "spec", "mig_uuid",
    "job_id", "restart_count", "owner_uid", "pid", "created_at", "expires_at", "ended_at", "end_reason", "holds")
if LEASE_KEYS != _EXPECTED_LEASE_KEYS:  # lease_from_tuple reads columns by position
    raise ImportError("schema.leases columns changed: update statements.lease_from_tuple")

_GRANTED: sa.ColumnElement[str] = sa.literal_column(f"'{schema.GRANTED}'")
_STATES = {s.value: s for s in LeaseState}

# Filters a caller may combine when ending leases (release by job, TTL expiry): name → condition.
_END_FILTERS: dict[str, sa.ColumnElement[bool]] = {
    "id": L.c.id == sa.bindparam("f_id"),
    "job_id": L.c.job_id == sa.bindparam("f_job_id"),
    "restart_count": L.c.restart_count == sa.bindparam("f_restart_count"),
    "node": L.c.node == sa.bindparam("f_node"),
    "expires_by": L.c.expires_at <= sa.bindparam("f_expires_by"),
}


_gpus_cache: dict[str, tuple[int, ...]] = {}
# Building a frozen dataclass calls object.__setattr__ once per field (20 for a Lease): filling its
# __dict__ directly makes the same object several times faster, and acquire builds one per live
# lease of the node. Falls back to the constructor should Lease ever use __slots__ or gain a field.
_FAST_LEASE = "__slots__" not in vars(Lease) and {f.name for f in dataclasses.fields(Lease)} == set(LEASE_KEYS)


def _parse_gpus(text: str) -> tuple[int, ...]:
    gpus = _gpus_cache.get(text)
    if gpus is None:
        gpus = tuple(int(g) for g in text.split(",")) if text else ()
        if len(_gpus_cache) < 4096:
            _gpus_cache[text] = gpus
    return gpus


def lease_from_tuple(r: Sequence[Any]) -> Lease:
    """A :class:`Lease` from a row of ``leases`` columns in table order."""
    expires_at, ended_at = r[16], r[17]
    fields = {
        "id": r[0], "node": r[1], "gpus": _parse_gpus(r[2]), "vram_mib": r[3], "prio": r[5], "priority": r[6],
        "preemptible": bool(r[7]), "state": _STATES[r[8]],
        # SQLite may return a whole REAL as an int (notably from RETURNING): times are always floats here.
        "created_at": float(r[15]), "spec": r[9], "min_mib": r[4], "mig_uuid": r[10], "job_id": r[11],
        "restart_count": r[12], "owner_uid": r[13], "pid": r[14],
        "expires_at": None if expires_at is None else float(expires_at),
        "ended_at": None if ended_at is None else float(ended_at), "end_reason": r[18], "holds": r[19],
    }
    if not _FAST_LEASE:
        return Lease(**fields)
    lease: Lease = object.__new__(Lease)
    lease.__dict__.update(fields)
    return lease


def lease_params(le: Lease) -> dict[str, Any]:
    """Insert parameters for ``le`` (keys :data:`LEASE_KEYS`)."""
    return {"id": le.id, "node": le.node, "gpus": ",".join(map(str, le.gpus)), "vram_mib": le.vram_mib,
            "min_mib": le.min_mib, "prio": le.prio, "priority": le.priority, "preemptible": le.preemptible,
            "state": le.state.value, "spec": le.spec, "mig_uuid": le.mig_uuid, "job_id": le.job_id,
            "restart_count": le.restart_count, "owner_uid": le.owner_uid, "pid": le.pid,
            "created_at": le.created_at, "expires_at": le.expires_at, "ended_at": le.ended_at,
            "end_reason": le.end_reason, "holds": le.holds}


class Statements:
    """Driver-ready SQL for one dialect. Parameter names are the dict keys the caller passes."""

    def __init__(self, dialect: Dialect) -> None:
        self.postgresql = dialect.name == "postgresql"
        # sqlite3 takes ":name" parameters from a dict; SQLAlchemy's default for it is positional.
        self._dialect: Dialect = dialect if self.postgresql else sqlite.dialect(paramstyle="named")
        self.live_on_node = self._compile(
            sa.select(*L.c).where(L.c.node == sa.bindparam("node"), L.c.state == _GRANTED))
        self.insert_lease = self._compile(L.insert().inline(), LEASE_KEYS)
        self.insert_decision = self._compile(D.insert().inline(), DECISION_KEYS)
        # The request's own row: its id is what `gpuarb explain D<id>` takes for a refused request.
        self.insert_decision_id = self._compile(D.insert().inline().returning(D.c.id), DECISION_KEYS)
        # PostgreSQL only: its acquires lock the node's row (SQLite's BEGIN IMMEDIATE locks everything).
        self.lock_node = self.insert_node = ""
        if self.postgresql:
            from sqlalchemy.dialects import postgresql  # imported only where used: it costs a hook ~30 ms

            nodes = schema.nodes
            self.lock_node = self._compile(
                sa.select(nodes.c.name).where(nodes.c.name == sa.bindparam("node")).with_for_update())
            self.insert_node = self._compile(
                postgresql.insert(nodes).values(name=sa.bindparam("node")).on_conflict_do_nothing())
        self.lease_exists = self._compile(sa.select(L.c.id).where(L.c.id == sa.bindparam("id")))
        self._end: dict[tuple[str, ...], str] = {}

    def _compile(self, stmt: sa.ClauseElement, keys: Sequence[str] | None = None) -> str:
        compiled = stmt.compile(dialect=self._dialect, column_keys=list(keys) if keys is not None else None)
        return str(compiled.string)

    def end_leases(self, filters: tuple[str, ...]) -> str:
        """``UPDATE leases … RETURNING *`` moving the live leases that match every filter in ``filters``
        (names from ``_END_FILTERS``, parameters ``f_<name>``) to state ``e_state``, ended at ``e_now``
        for reason ``e_reason``. The ``state = 'granted'`` guard makes it idempotent under concurrency."""
        sql = self._end.get(filters)
        if sql is None:
            stmt = (sa.update(L).where(L.c.state == _GRANTED, *(_END_FILTERS[f] for f in filters))
                    .values(state=sa.bindparam("e_state"), ended_at=sa.bindparam("e_now"),
                            end_reason=sa.bindparam("e_reason"))
                    .returning(*L.c))
            sql = self._end[filters] = self._compile(stmt)
        return sql
