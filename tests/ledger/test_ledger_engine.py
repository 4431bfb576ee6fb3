"""Connecting: URLs, SQLite files and pragmas, network filesystems, password files, error messages."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
import sqlalchemy as sa

from slurm_gpuarb.errors import LedgerError
from slurm_gpuarb.ledger import Ledger, engine
from slurm_gpuarb.ledger.engine import check_local_filesystem, create_engines, filesystem_type, parse_url

# --------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(("url", "message"), [
    ("not a url", "is not a database URL"),
    ("mysql://gpuarb@db/gpuarb", "unsupported database 'mysql'"),
    ("sqlite+aiosqlite:///x.db", "SQLite driver 'aiosqlite' is not supported"),
    ("postgresql+psycopg2://gpuarb@db/gpuarb", "PostgreSQL driver 'psycopg2' is not supported"),
    ("postgresql+psycopg://gpuarb@db", "names no database"),
    ("sqlite:///file:x.db?mode=ro&uri=true", "URI filenames are not supported"),
])
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(LedgerError, match=message):
        Ledger.open(url)


def test_url_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = parse_url("sqlite:///rel/ledger.db")
    assert relative.path == str(tmp_path / "rel" / "ledger.db")
    assert parse_url("sqlite://").path is None
    pg = parse_url("postgres://gpuarb:secret@db:5433/gpuarb")
    assert pg.url.drivername == "postgresql+psycopg" and pg.path is None
    assert "secret" not in pg.display and "***" in pg.display


def test_in_memory_ledger_works() -> None:
    with Ledger.open("sqlite://") as ledger:
        ledger.record(plane="cli", action="note", outcome="noop", node=None, reason="hello")
        assert [r.reason for r in ledger.decisions()] == ["hello"]


# --------------------------------------------------------------------------- SQLite files


def test_sqlite_file_directory_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "new" / "dir" / "ledger.db"
    Ledger.open(f"sqlite:///{path}").close()
    assert stat.S_IMODE(path.stat().st_mode) & 0o137 == 0  # at most 0640
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o027 == 0  # at most 0750


def test_sqlite_connection_pragmas_and_begin_modes(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    Ledger.open(f"sqlite:///{path}").close()
    reader, writer = create_engines(parse_url(f"sqlite:///{path}"))
    with reader.connect() as conn:
        pragmas = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar()
                   for p in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")}
    assert pragmas == {"journal_mode": "wal", "synchronous": 1, "busy_timeout": 30000, "foreign_keys": 1}

    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with reader.connect() as conn:
        conn.exec_driver_sql("SELECT count(*) FROM leases").scalar()  # a reader holds no write lock …
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
    with writer.begin() as conn:
        conn.exec_driver_sql("SELECT 1")  # … a writer takes it at BEGIN, before any write
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.close()
    reader.dispose()


def test_garbage_file_is_not_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is not a SQLite database, it is a shopping list\n" * 100)
    with pytest.raises(LedgerError, match="is not a SQLite database") as info:
        Ledger.open(f"sqlite:///{path}")
    assert "\n" not in str(info.value) and "file is not a database" in str(info.value)


def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LedgerError, match="cannot create the SQLite ledger"):
        Ledger.open(f"sqlite:///{blocker}/ledger.db")


# --------------------------------------------------------------------------- network filesystems


def _mountinfo(tmp_path: Path) -> Path:
    tmp_path = tmp_path.resolve()  # the mount table holds real paths
    nfs = tmp_path / "nfs"
    lines = [
        "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw",
        f"100 22 0:50 / {tmp_path} rw,relatime shared:5 - tmpfs tmpfs rw",
        f"101 100 0:51 / {nfs} rw,relatime shared:6 master:2 - nfs4 fileserver:/export rw,vers=4.2",
        f"102 101 0:52 / {nfs}/local\\040disk rw,relatime - xfs /dev/sdb1 rw",
        f"103 100 0:53 / {tmp_path}/lus rw - lustre 10.0.0.1@tcp:/fs rw",
    ]
    path = tmp_path / "mountinfo"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_filesystem_type_takes_the_longest_mount_point(tmp_path: Path) -> None:
    info = str(_mountinfo(tmp_path))
    assert filesystem_type(str(tmp_path / "nfs" / "a" / "b.db"), info) == (str(tmp_path / "nfs"), "nfs4")
    assert filesystem_type(str(tmp_path / "nfs" / "local disk" / "b.db"), info)[1] == "xfs"  # type: ignore[index]
    assert filesystem_type(str(tmp_path / "nfsx" / "b.db"), info)[1] == "tmpfs"  # type: ignore[index]
    assert filesystem_type("/elsewhere/b.db", info) == ("/", "ext4")
    assert filesystem_type("/x", str(tmp_path / "missing")) is None


@pytest.mark.parametrize(("subdir", "fstype"), [("nfs/sub", "nfs4"), ("lus", "lustre")])
def test_network_filesystem_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, subdir: str,
                                       fstype: str) -> None:
    monkeypatch.setattr(engine, "MOUNTINFO", str(_mountinfo(tmp_path)))
    target = tmp_path / subdir / "ledger.db"
    with pytest.raises(LedgerError, match=f"network filesystem \\({fstype} mounted at .*use PostgreSQL"):
        Ledger.open(f"sqlite:///{target}")
    assert not target.parent.exists()  # refused before anything was created


def test_local_mount_inside_a_network_mount_is_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "MOUNTINFO", str(_mountinfo(tmp_path)))
    check_local_filesystem(str(tmp_path / "nfs" / "local disk" / "ledger.db"))
    Ledger.open(f"sqlite:///{tmp_path}/ok/ledger.db").close()


def test_symlink_into_a_network_mount_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine, "MOUNTINFO", str(_mountinfo(tmp_path)))
    (tmp_path / "nfs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nfs")
    with pytest.raises(LedgerError, match="nfs4"):
        Ledger.open(f"sqlite:///{tmp_path}/link/ledger.db")


# --------------------------------------------------------------------------- PostgreSQL connections


def _password_file(tmp_path: Path, text: str, mode: int) -> str:
    path = tmp_path / "pgpass"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def test_password_file_must_be_private(tmp_path: Path) -> None:
    url = "postgresql+psycopg://gpuarb@db/gpuarb"
    with pytest.raises(LedgerError, match=r"mode 0644: .*chmod 600"):
        Ledger.open(url, password_file=_password_file(tmp_path, "secret\n", 0o644))
    with pytest.raises(LedgerError, match="is empty"):
        Ledger.open(url, password_file=_password_file(tmp_path, "\n", 0o600))
    with pytest.raises(LedgerError, match="cannot read PostgreSQL password file"):
        Ledger.open(url, password_file=str(tmp_path / "missing"))
    with pytest.raises(LedgerError, match="only for PostgreSQL"):
        Ledger.open(f"sqlite:///{tmp_path}/l.db", password_file=_password_file(tmp_path, "x", 0o600))
    target = parse_url(url, password_file=_password_file(tmp_path, "s3cret\nignored\n", 0o600))
    assert target.url.password == "s3cret"


def test_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match=r"127.0.0.1:1 is unreachable") as info:
        Ledger.open("postgresql+psycopg://gpuarb@127.0.0.1:1/gpuarb?connect_timeout=2")
    assert "Traceback" not in str(info.value)


@pytest.mark.postgres
def test_password_authentication(pg_admin: sa.Engine, pg_url: str, tmp_path: Path) -> None:
    # pg-up.sh's cluster lets only `gpuarb` in without a password over loopback.
    role = "gpuarb_pw_" + os.urandom(4).hex()
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN PASSWORD 'right-password'")
    try:
        url = sa.make_url(pg_url).set(username=role).render_as_string(hide_password=False)
        with pytest.raises(LedgerError, match=f"refused user '{role}'.*password file"):
            Ledger.open(url, password_file=_password_file(tmp_path, "wrong-password\n", 0o600))
        # Connected and read the catalog; owns nothing, so the role can be dropped afterwards.
        with Ledger.open(url, create=False, check=False,
                         password_file=_password_file(tmp_path, "right-password\n", 0o600)) as ledger:
            assert ledger.revision() is None
            assert "right-password" not in ledger.url
    finally:
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f"DROP ROLE {role}")


@pytest.mark.postgres
def test_missing_database(pg_admin: sa.Engine) -> None:
    url = pg_admin.url.set(database="gpuarb_no_such_db").render_as_string(hide_password=False)
    with pytest.raises(LedgerError, match="no database 'gpuarb_no_such_db'"):
        Ledger.open(url)
