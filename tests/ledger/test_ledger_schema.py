"""Schema revisions: create-on-open, version checks, the upgrade from 0001, append-only decisions."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from slurm_gpuarb.errors import LedgerError, SchemaVersionError
from slurm_gpuarb.ledger import HEAD_REVISION, REVISIONS, Ledger, migrate, schema
from slurm_gpuarb.model import LeaseState


@pytest.fixture
def raw(ledger_url: str) -> Iterator[sa.Engine]:
    """A plain SQLAlchemy engine on the same database, to do what the Ledger API never does."""
    engine = sa.create_engine(ledger_url)
    yield engine
    engine.dispose()


def test_open_creates_an_empty_database_at_head(ledger_url: str, raw: sa.Engine) -> None:
    with Ledger.open(ledger_url) as ledger:
        assert ledger.revision() == HEAD_REVISION
    with raw.connect() as conn:
        tables = migrate.table_names(conn)
    assert set(schema.metadata.tables) | {"alembic_version"} == tables
    with Ledger.open(ledger_url, create=False) as again:  # an existing ledger needs no create
        assert again.revision() == HEAD_REVISION


def test_open_without_create_refuses_an_empty_database(ledger_url: str, raw: sa.Engine) -> None:
    if ledger_url.startswith("sqlite"):
        with pytest.raises(LedgerError, match=r"no ledger at .*gpuarb db upgrade"):
            Ledger.open(ledger_url, create=False)
        with raw.connect():
            pass  # SQLite creates the (empty) file
    with pytest.raises(SchemaVersionError, match="no schema yet: run `gpuarb db upgrade`"):
        Ledger.open(ledger_url, create=False)
    with Ledger.open(ledger_url, create=False, check=False) as ledger:  # what `gpuarb db upgrade` does
        assert ledger.revision() is None
        assert ledger.upgrade() == (None, HEAD_REVISION)
        assert ledger.upgrade() == (HEAD_REVISION, HEAD_REVISION)


def test_open_refuses_a_database_of_something_else(ledger_url: str, raw: sa.Engine) -> None:
    with raw.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
    with pytest.raises(LedgerError, match="not a gpuarb ledger"):
        Ledger.open(ledger_url)
    with Ledger.open(ledger_url, check=False) as ledger, pytest.raises(LedgerError, match="not a gpuarb ledger"):
        ledger.upgrade()


def _ledger_at_0001_with_rows(url: str, raw: sa.Engine) -> None:
    with Ledger.open(url, create=False, check=False) as ledger:
        assert ledger.upgrade("0001") == (None, "0001")
    with raw.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO leases (id, node, gpus, vram_mib, prio, priority, preemptible, state, spec, job_id, "
            "restart_count, created_at, expires_at) VALUES ('Lold', 'n1', '0,1', 6144, 'batch', 10, TRUE, 'granted', "
            "'gpuarb/1: vram=6144MiB', '12', 0, 1000.0, 1600.0)")
        conn.exec_driver_sql(
            "INSERT INTO decisions (ts, plane, action, outcome, node, lease_id, job_id, restart_count, prio, "
            "requested_mib, granted_mib, reason, inputs) VALUES (1000.0, 'prolog', 'request', 'grant', 'n1', 'Lold', "
            "'12', 0, 'batch', 6144, 6144, 'fits', '{\"free_mib\": 8000}')")


def test_an_old_revision_is_refused_then_upgraded_with_data_intact(ledger_url: str, raw: sa.Engine) -> None:
    _ledger_at_0001_with_rows(ledger_url, raw)
    expected = f"revision 0001, this gpuarb needs {HEAD_REVISION}: run `gpuarb db upgrade`"
    with pytest.raises(SchemaVersionError, match=expected):
        Ledger.open(ledger_url)
    with Ledger.open(ledger_url, check=False) as ledger:  # open() alone never migrates
        assert ledger.revision() == "0001"
        assert ledger.upgrade() == ("0001", HEAD_REVISION)
    with Ledger.open(ledger_url) as ledger:
        old = ledger.get("Lold")
        assert (old.gpus, old.vram_mib, old.preemptible, old.job_id, old.expires_at) == ((0, 1), 6144, True, "12",
                                                                                         1600.0)
        [row] = ledger.decisions(lease_id="Lold")
        assert (row.plane, row.outcome, row.inputs) == ("prolog", "grant", {"free_mib": 8000})
        ledger.snapshot_inventory("n1", [])  # the new tables work
        assert ledger.reservations() == [] and ledger.inventory() == {}
        assert [le.id for le in ledger.release(job_id="12", restart_count=0, node="n1")] == ["Lold"]
        assert ledger.get("Lold").state is LeaseState.RELEASED
    with raw.connect() as conn:
        assert {"reservations", "inventory", "nodes"} <= migrate.table_names(conn)
    with raw.begin() as conn, pytest.raises(sa.exc.DatabaseError, match="append-only"):
        conn.exec_driver_sql("DELETE FROM decisions")  # and so do the triggers


def test_an_unknown_newer_revision_is_refused(ledger_url: str, raw: sa.Engine) -> None:
    Ledger.open(ledger_url).close()
    with raw.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        conn.exec_driver_sql("UPDATE schema_compat SET min_reader = '0099'")  # 0099 broke older readers
    with pytest.raises(SchemaVersionError, match=r"0099, which this gpuarb does not know.*upgrade gpuarb"):
        Ledger.open(ledger_url)
    with Ledger.open(ledger_url, check=False) as ledger, pytest.raises(SchemaVersionError, match="0099"):
        ledger.upgrade()


def test_a_newer_revision_this_gpuarb_can_read_is_used(ledger_url: str, raw: sa.Engine) -> None:
    """A rolling upgrade: the ledger went to 0099 first; this host's gpuarb is older but 0099 says
    (schema_compat) that gpuarb from HEAD_REVISION on can still use it."""
    Ledger.open(ledger_url).close()
    with raw.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        conn.exec_driver_sql(f"UPDATE schema_compat SET min_reader = '{HEAD_REVISION}'")
    with Ledger.open(ledger_url, create=False) as ledger:
        ledger.record(plane="cli", action="note", outcome="noop", node="n1", reason="still works")
        assert ledger.revision() == "0099"
        assert [r.reason for r in ledger.decisions()] == ["still works"]
    with Ledger.open(ledger_url, check=False) as ledger, pytest.raises(SchemaVersionError, match="0099"):
        ledger.upgrade()  # an older gpuarb never migrates a newer ledger


def test_a_fresh_ledger_says_which_gpuarb_can_read_it(ledger_url: str, raw: sa.Engine) -> None:
    Ledger.open(ledger_url).close()
    with raw.connect() as conn:
        # 0005 introduced the row; later migrations move it only when they break older readers.
        assert conn.exec_driver_sql("SELECT min_reader FROM schema_compat").all() == [("0005",)]


@pytest.mark.parametrize("statement", [
    "UPDATE decisions SET reason = 'rewritten'",
    "DELETE FROM decisions",
])
def test_decisions_are_append_only(ledger_url: str, raw: sa.Engine, statement: str) -> None:
    with Ledger.open(ledger_url) as ledger:
        ledger.record(plane="cli", action="note", outcome="noop", node="n1", reason="original")
    with raw.begin() as conn, pytest.raises(sa.exc.DatabaseError, match="append-only"):
        conn.exec_driver_sql(statement)
    with Ledger.open(ledger_url) as ledger:
        assert [r.reason for r in ledger.decisions()] == ["original"]


def test_schema_module_matches_the_migrations(ledger_url: str, raw: sa.Engine) -> None:
    assert migrate.script_revisions() == list(REVISIONS)
    Ledger.open(ledger_url).close()
    inspector = sa.inspect(raw)
    for table in schema.metadata.sorted_tables:
        migrated = {c["name"]: c["nullable"] for c in inspector.get_columns(table.name)}
        declared = {c.name: c.nullable for c in table.columns}
        assert migrated == declared, table.name
    assert {ix["name"] for ix in inspector.get_indexes("leases")} >= {"ix_leases_node_state", "uq_leases_live_job"}


def test_live_job_key_is_unique_in_the_database(ledger_url: str, raw: sa.Engine) -> None:
    Ledger.open(ledger_url).close()
    insert = ("INSERT INTO leases (id, node, gpus, vram_mib, prio, priority, preemptible, state, spec, job_id, "
              "restart_count, created_at) "
              "VALUES ('{id}', 'n1', '0', 1, 'batch', 0, FALSE, '{state}', '', '12', 0, 1.0)")
    with raw.begin() as conn:
        conn.exec_driver_sql(insert.format(id="L1", state="released"))
        conn.exec_driver_sql(insert.format(id="L2", state="released"))  # ended leases may share the key
        conn.exec_driver_sql(insert.format(id="L3", state="granted"))
    with raw.begin() as conn, pytest.raises(sa.exc.IntegrityError):
        conn.exec_driver_sql(insert.format(id="L4", state="granted"))


def test_downgrade_scripts_run(tmp_path: object) -> None:
    from alembic import command

    url = f"sqlite:///{tmp_path}/down.db"
    Ledger.open(url).close()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        command.downgrade(migrate.alembic_config(conn), "0001")
        assert "nodes" not in migrate.table_names(conn)
        command.downgrade(migrate.alembic_config(conn), "base")
        assert migrate.table_names(conn) == {"alembic_version"}
    engine.dispose()


def test_upgrade_from_0003_keeps_leases_and_adds_an_empty_holds_column(ledger_url: str, raw: sa.Engine) -> None:
    with Ledger.open(ledger_url, create=False, check=False) as ledger:
        assert ledger.upgrade("0003") == (None, "0003")
    with raw.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO leases (id, node, gpus, vram_mib, prio, priority, preemptible, state, spec, job_id, "
            "restart_count, created_at) VALUES ('L03', 'n2', '0', 12288, 'llm', 1000, FALSE, 'granted', "
            "'gpuarb/1: vram=12288MiB prio=llm shards=24', '42', 0, 1000.0)")
        conn.exec_driver_sql("INSERT INTO lease_peaks (lease_id, peak_mib, sampled_at) VALUES ('L03', 11059, 1001.0)")
    with pytest.raises(SchemaVersionError, match="revision 0003"):
        Ledger.open(ledger_url)
    with Ledger.open(ledger_url, check=False) as ledger:
        assert ledger.upgrade() == ("0003", HEAD_REVISION)
    with Ledger.open(ledger_url) as ledger:
        old = ledger.get("L03")
        assert (old.node, old.vram_mib, old.prio, old.preemptible, old.job_id, old.holds) == (
            "n2", 12288, "llm", False, "42", None)
        assert ledger.peaks(["L03"]) == {"L03": 11059}
        assert [le.id for le in ledger.live("n2")] == ["L03"]
        assert [le.id for le in ledger.release(job_id="42", restart_count=0, node="n2")] == ["L03"]
    with raw.connect() as conn:
        holds = {c["name"]: c for c in sa.inspect(conn).get_columns("leases")}["holds"]
        assert holds["nullable"] is True
        assert conn.exec_driver_sql("SELECT holds FROM leases WHERE id = 'L03'").scalar_one() is None


def test_the_0004_upgrade_keeps_leases_indexes_and_layout(ledger_url: str, raw: sa.Engine) -> None:
    with Ledger.open(ledger_url, create=False, check=False) as ledger:
        ledger.upgrade("0003")
        ledger.upgrade()
    inspector = sa.inspect(raw)
    assert {ix["name"] for ix in inspector.get_indexes("leases")} >= {"ix_leases_node_state", "uq_leases_live_job",
                                                                       "ix_leases_live_expiry"}
    if ledger_url.startswith("sqlite"):
        with raw.connect() as conn:
            ddl = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'leases'").scalar_one()
        assert "WITHOUT ROWID" in ddl.upper()  # added in place, not copied into a rowid table
