"""Connecting to the ledger database: URL checks, SQLite pragmas and locking, PostgreSQL passwords,
and turning driver errors into :class:`~slurm_gpuarb.errors.LedgerError`.

SQLite (the single-host default):

* WAL journal, ``synchronous=NORMAL`` (a commit is durable once the WAL is checkpointed; a power
  cut may lose the last transactions but never corrupts the file), ``busy_timeout`` 30 s, foreign
  keys on.
* pysqlite's own transaction handling is switched off (``isolation_level = None``) and SQLAlchemy's
  ``begin`` event issues the ``BEGIN`` itself, as SQLAlchemy's pysqlite docs recommend
  ("Enabling Non-Legacy SQLite Transactional Modes"). Writers run on an engine carrying the
  execution option ``gpuarb_write`` and get ``BEGIN IMMEDIATE``: they take the write lock *before*
  reading, so two writers never both read the same free memory and then collide on upgrade from a
  shared to a write lock (which SQLite answers with SQLITE_BUSY without waiting). Readers get a
  deferred ``BEGIN`` and a consistent WAL snapshot.
* The file's directory is created if missing; the file is created 0640 (less if the umask says so)
  before SQLite opens it, and SQLite gives its ``-wal``/``-shm`` files the same mode.
* A database on a network filesystem is refused: SQLite's locks are unreliable there (SQLite FAQ
  "Can multiple applications … access the same database file at the same time?"). Use PostgreSQL.

PostgreSQL (clusters): ``postgresql+psycopg://user@host/db``; a password comes from a file of
mode 0600 (the slurm.conf directory is world-readable, so the URL must not carry it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sqlite3
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Engine
from sqlalchemy.pool import StaticPool

from ..errors import GpuArbError, LedgerError

MOUNTINFO = "/proc/self/mountinfo"
BUSY_TIMEOUT_MS = 30_000
WAL_AUTOCHECKPOINT_PAGES = 16384
CONNECT_TIMEOUT_S = 10

# Filesystems on which SQLite's POSIX/OFD locks are absent, advisory-only or unreliable.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "lustre", "gpfs", "beegfs", "ceph",
    "glusterfs", "ocfs2", "gfs2", "panfs", "pvfs2", "orangefs", "9p", "davfs", "sshfs",
    "fuse.sshfs", "fuse.glusterfs", "fuse.ceph", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.rclone", "fuse.juicefs", "fuse.beegfs",
})

_WRITE_OPTION = "gpuarb_write"
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Target:
    """Where a ledger lives, as parsed from its URL."""

    url: URL
    dialect: str  # "sqlite" | "postgresql"
    path: str | None  # SQLite file (absolute); None for in-memory SQLite and PostgreSQL
    display: str  # the URL as given, without a password, for messages


# --------------------------------------------------------------------------- URLs


def parse_url(text: str, *, password_file: str | None = None) -> Target:
    """Check a ledger URL and resolve it: SQLite paths become absolute, a PostgreSQL password is read
    from ``password_file``. Raises LedgerError naming what is wrong and what a valid URL looks like."""
    try:
        url = sa.make_url(text)
    except (sa_exc.ArgumentError, ValueError) as e:
        raise LedgerError(
            f"ledger URL {text!r} is not a database URL: expected sqlite:////var/lib/gpuarb/ledger.db or "
            "postgresql+psycopg://gpuarb@dbhost/gpuarb") from e
    display = url.render_as_string(hide_password=True)
    backend, _, driver = url.drivername.partition("+")
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise LedgerError(f"ledger URL {text!r}: SQLite driver {driver!r} is not supported; use sqlite:///PATH")
        if password_file is not None:
            raise LedgerError(f"ledger URL {text!r}: a password file is only for PostgreSQL; drop it for SQLite")
        db = url.database or ""
        if db in ("", ":memory:"):
            return Target(url=url.set(drivername="sqlite+pysqlite", database=":memory:"), dialect="sqlite", path=None,
                          display=display)
        if db.startswith("file:"):
            raise LedgerError(f"ledger URL {text!r}: SQLite URI filenames are not supported; use sqlite:///PATH")
        path = os.path.abspath(db)
        return Target(url=url.set(drivername="sqlite+pysqlite", database=path), dialect="sqlite", path=path,
                      display=display)
    if backend in ("postgresql", "postgres"):
        if driver not in ("", "psycopg"):
            raise LedgerError(
                f"ledger URL {text!r}: PostgreSQL driver {driver!r} is not supported; use postgresql+psycopg://…")
        if not url.database:
            raise LedgerError(f"ledger URL {text!r} names no database: use postgresql+psycopg://USER@HOST/DBNAME")
        url = url.set(drivername="postgresql+psycopg")
        if password_file is not None:
            url = url.set(password=read_password_file(password_file))
        return Target(url=url, dialect="postgresql", path=None, display=display)
    raise LedgerError(
        f"ledger URL {text!r}: unsupported database {backend!r}; use sqlite:///PATH (one host) or "
        "postgresql+psycopg://USER@HOST/DB (a cluster)")


def read_password_file(path: str) -> str:
    """The first line of a PostgreSQL password file, which must be readable by its owner only."""
    try:
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise LedgerError(
                f"PostgreSQL password file {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must be readable by its "
                f"owner only (chmod 600 {path})")
        with open(path, encoding="utf-8") as fh:
            password = fh.readline().rstrip("\r\n")
    except OSError as e:
        raise LedgerError(f"cannot read PostgreSQL password file {path}: check the path and its owner") from e
    except UnicodeDecodeError as e:
        raise LedgerError(f"PostgreSQL password file {path} is not UTF-8 text") from e
    if not password:
        raise LedgerError(f"PostgreSQL password file {path} is empty: put the password on its first line")
    return password


# --------------------------------------------------------------------------- filesystems


def _unescape_mount(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def filesystem_type(path: str, mountinfo: str | None = None) -> tuple[str, str] | None:
    """``(mount point, fstype)`` of the mount holding ``path`` (the longest matching mount point in
    ``mountinfo``, default :data:`MOUNTINFO`), or None when the mount table cannot be read."""
    try:
        with open(mountinfo or MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    best: tuple[str, str] | None = None
    for line in lines:
        fields = line.split(" ")
        # mountinfo(5): ID parent major:minor root MOUNT_POINT options [optional…] - FSTYPE source super
        if len(fields) < 7 or "-" not in fields[6:]:
            continue
        point = _unescape_mount(fields[4])
        fstype = fields[fields.index("-", 6) + 1]
        inside = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best[0])):
            best = (point, fstype)  # later lines win ties: they are mounted over earlier ones
    return best


def check_local_filesystem(path: str, mountinfo: str | None = None) -> None:
    """Refuse a SQLite database on a network filesystem (LedgerError says why and what to use).
    ``path`` need not exist yet: symlinks in the part that exists are resolved."""
    found = filesystem_type(os.path.realpath(path), mountinfo)
    if found is None:
        return
    point, fstype = found
    if fstype in NETWORK_FILESYSTEMS or fstype.startswith(("nfs", "fuse.sshfs")):
        raise LedgerError(
            f"SQLite ledger {path} is on a network filesystem ({fstype} mounted at {point}): SQLite's file locking "
            "is unsafe there and concurrent writers could double-grant; put the ledger on a local disk "
            "(e.g. sqlite:////var/lib/gpuarb/ledger.db) or use PostgreSQL for a shared ledger")


def prepare_sqlite_file(path: str, *, create: bool) -> None:
    """Check that ``path`` is on a local filesystem, then (unless ``create`` is False) create its
    directory and an empty 0640 database file."""
    check_local_filesystem(path)  # before creating anything: nothing is left behind on an NFS mount
    directory = os.path.dirname(path)
    try:
        if os.path.exists(path):
            return
        if not create:
            raise LedgerError(f"no ledger at {path}: create it with `gpuarb db upgrade`, or fix the ledger URL")
        os.makedirs(directory, mode=0o750, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    except OSError as e:
        raise LedgerError(f"cannot create the SQLite ledger {path}: check that {directory} is writable by this "
                          "user (hooks run as root, the CLI as you)") from e


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created 0640), held for the ``with`` block."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    except OSError as e:
        raise LedgerError(f"cannot create the ledger's lock file {path}: check the directory's permissions") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


# --------------------------------------------------------------------------- engines


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # SQLAlchemy's "begin" event emits BEGIN from now on
    cur = dbapi_conn.cursor()
    try:
        # busy_timeout first: switching to WAL needs a lock that another opener may hold.
        cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA journal_mode = WAL")
        cur.execute("PRAGMA synchronous = NORMAL")
        # Checkpoint (copy the WAL back into the file, with an fsync) every 64 MiB of WAL instead of
        # SQLite's 4 MiB: a lease acquire+release writes ~14 pages, and at the default a checkpoint
        # and its fsync came every ~70 pairs, a third of the ledger's time (measured).
        cur.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
        cur.execute(f"PRAGMA journal_size_limit = {WAL_AUTOCHECKPOINT_PAGES * 4096}")
        cur.execute("PRAGMA foreign_keys = ON")
    finally:
        cur.close()


def _sqlite_on_begin(conn: sa.Connection) -> None:
    if conn.get_execution_options().get(_WRITE_OPTION):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def create_engines(target: Target) -> tuple[Engine, Engine]:
    """``(reader, writer)`` engines sharing one pool; on SQLite the writer begins with BEGIN IMMEDIATE."""
    if target.dialect == "sqlite":
        # SQLite connections are cheap file handles: never make a thread wait for one.
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}, "max_overflow": -1}
        if target.path is None:
            kwargs = {"connect_args": {"check_same_thread": False}, "poolclass": StaticPool}  # one shared database
        engine = sa.create_engine(target.url, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
    else:
        connect_args: dict[str, Any] = {"application_name": "gpuarb"}
        if "connect_timeout" not in target.url.query:
            connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        engine = sa.create_engine(target.url, connect_args=connect_args, pool_pre_ping=True)
    return engine, engine.execution_options(**{_WRITE_OPTION: True})


# --------------------------------------------------------------------------- errors


def _hint(target: Target, message: str) -> str:
    m = message.lower()
    if target.dialect == "sqlite":
        where = target.path or "the in-memory database"
        if "not a database" in m or "malformed" in m:
            return (f"{where} is not a SQLite database (or is damaged): point the ledger URL at a gpuarb ledger, or at "
                    "a path that does not exist yet to create one")
        if "locked" in m or "busy" in m:
            return (f"another process holds the write lock on {where} (waited up to {BUSY_TIMEOUT_MS // 1000}s): "
                    f"look for a hung gpuarb process (fuser {where})")
        if "readonly" in m or "read-only" in m:
            return f"this user cannot write {where}: run as the ledger's owner (root for hooks) or fix its mode"
        if "unable to open" in m:
            return f"cannot open {where}: check that the file and its directory exist and are accessible"
        if "disk i/o" in m or "full" in m:
            return f"the disk holding {where} failed or is full"
    else:
        host = f"{target.url.host or 'localhost'}:{target.url.port or 5432}"
        if "password authentication failed" in m or "no password supplied" in m:
            return (f"PostgreSQL at {host} refused user {target.url.username!r}: check the user in the URL and the "
                    "password file")
        if "does not exist" in m and "database" in m:
            return f"PostgreSQL at {host} has no database {target.url.database!r}: create it (createdb) or fix the URL"
        if "pg_hba.conf" in m:
            return f"PostgreSQL at {host} does not accept this host/user: add a line to its pg_hba.conf"
        if any(s in m for s in ("connection refused", "could not connect", "timeout", "timed out",
                                "name or service not known", "no route", "connection failed",
                                "server closed the connection")):
            return f"PostgreSQL at {host} is unreachable: is the server running and reachable from this node?"
    if "no such table" in m or ("relation" in m and "does not exist" in m):
        return "the ledger's tables are missing: run `gpuarb db upgrade`"
    if "append-only" in m:
        return "the decision log is append-only"
    return "database error"


@contextlib.contextmanager
def translate_errors(target: Target, what: str) -> Iterator[None]:
    """Turn SQLAlchemy and driver errors raised in the block into LedgerErrors that say which ledger,
    what was being done, and what to check. Our own errors, and anything else (a bug in a ``decide``
    callback, say), pass through unchanged."""
    try:
        yield
    except GpuArbError:
        raise
    except Exception as e:
        if not isinstance(e, _database_errors()):
            raise
        cause: BaseException = e
        if isinstance(e, sa_exc.DBAPIError) and e.orig is not None:
            cause = e.orig  # the driver's one-line message, not SQLAlchemy's statement dump
        raise LedgerError(f"ledger {target.display}: could not {what}: {_hint(target, str(cause))}") from cause


def _database_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [sa_exc.SQLAlchemyError, sqlite3.Error]
    psycopg = sys.modules.get("psycopg")  # only loaded when a PostgreSQL ledger is in use
    if psycopg is not None:
        errors.append(psycopg.Error)
    return tuple(errors)
