"""Fixtures for the ledger tests: a fresh ledger URL on SQLite (a file under tmp_path) and, in the
``postgres`` tier, on PostgreSQL (a schema of its own in ``$GPUARB_TEST_PG_URL``'s database,
created before and dropped after each test). Start that server with ``eval "$(scripts/pg-up.sh)"``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence

import pytest
import sqlalchemy as sa

from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.model import Decision, Lease, LeaseSpec, Outcome, Request, Vram

PG_ENV = "GPUARB_TEST_PG_URL"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    """An engine on the test PostgreSQL database (skips the test when none is configured)."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"${PG_ENV} is not set: start a test server with `eval \"$(scripts/pg-up.sh)\"`")
    engine = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    yield engine
    engine.dispose()


def pg_schema_url(base: str, schema: str) -> str:
    """``base`` with ``schema`` first on every connection's search_path."""
    url = sa.make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture
def pg_url(pg_admin: sa.Engine) -> Iterator[str]:
    """A URL whose connections work in a fresh, empty schema, dropped after the test."""
    schema = "gpuarb_test_" + secrets.token_hex(6)
    with pg_admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield pg_schema_url(pg_admin.url.render_as_string(hide_password=False), schema)
    finally:
        with pg_admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: os.PathLike[str]) -> str:
    """A URL for a brand-new, empty ledger database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/ledger.db"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    """An open ledger at the head revision."""
    with Ledger.open(ledger_url) as opened:
        yield opened


def _request_for(node: str = "n1", mib: int = 4096, *, now: float = 1000.0, job_id: str | None = None,
                restart_count: int = 0, ttl_s: int | None = None, prio: str = "batch") -> Request:
    """A lease request for ``mib`` on ``node``."""
    return Request(spec=LeaseSpec(vram=Vram(mib=mib), prio=prio, ttl_s=ttl_s), node=node, now=now, job_id=job_id,
                   restart_count=restart_count)


def _fit_within(capacity_mib: int, mib: int, *, prio: str = "batch",
               calls: list[Sequence[Lease]] | None = None) -> Callable[[Sequence[Lease]], Decision]:
    """A decide callback: grant ``mib`` while the live leases plus it fit in ``capacity_mib``, else wait.
    Appends each ``live`` it is called with to ``calls`` when given."""

    def decide(live: Sequence[Lease]) -> Decision:
        if calls is not None:
            calls.append(live)
        node = live[0].node if live else "n?"
        used = sum(le.vram_mib for le in live)
        if used + mib <= capacity_mib:
            return Decision(Outcome.GRANT, node, f"{mib}MiB fits ({used}MiB held)", prio, mib, mib, (0,),
                            inputs={"used_mib": used, "capacity_mib": capacity_mib})
        return Decision(Outcome.WAIT, node, f"{mib}MiB does not fit ({used}MiB held)", prio, mib,
                        inputs={"used_mib": used, "capacity_mib": capacity_mib})

    return decide


@pytest.fixture
def make_request() -> Callable[..., Request]:
    """``make_request(node="n1", mib=4096, *, now=1000.0, job_id=None, restart_count=0, ttl_s=None, prio="batch")``."""
    return _request_for


@pytest.fixture
def fit_within() -> Callable[..., Callable[[Sequence[Lease]], Decision]]:
    """``fit_within(capacity_mib, mib, *, prio="batch", calls=None)``: a decide callback that grants
    ``mib`` while the live leases plus it fit in ``capacity_mib``, else answers WAIT."""
    return _fit_within
