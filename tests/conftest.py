"""Fixtures shared across tiers: an isolated environment for CLI runs, and PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "templates" / "examples"


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment with no trace of the machine's own gpuarb config: the 3090 Ti workstation
    example, fake telemetry and a fresh SQLite ledger under tmp_path."""
    for key in list(os.environ):
        if key.startswith("GPUARB_") and key != "GPUARB_TEST_PG_URL":
            monkeypatch.delenv(key)
    fake_state = tmp_path / "fake"
    fake_state.mkdir()
    env = {
        "GPUARB_CONFIG": str(EXAMPLES / "workstation-3090ti.toml"),
        "GPUARB_TELEMETRY": "fake:rtx3090ti-24g",
        "GPUARB_LEDGER": f"sqlite:///{tmp_path / 'ledger.db'}",
        "GPUARB_FAKE_STATE": str(fake_state),
        "GPUARB_NODE": "ws1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    full = dict(os.environ)
    full["PYTHONPATH"] = str(REPO) + os.pathsep + full.get("PYTHONPATH", "")
    return full


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the test server, dropped afterwards."""
    base = os.environ.get("GPUARB_TEST_PG_URL")
    if not base:
        pytest.skip("GPUARB_TEST_PG_URL is not set: start PostgreSQL with scripts/pg-up.sh")
    import psycopg

    name = f"gpuarb_t_{uuid.uuid4().hex[:10]}"
    admin = base.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    head, _, _ = base.rpartition("/")
    try:
        yield f"{head}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
