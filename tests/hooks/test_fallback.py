"""The real in-process fallback (no daemon): Handlers(load()) behind the Prolog and the Epilog, on the
test cluster's inventory with fake telemetry and a SQLite ledger. Slower than the other hook tests
(it imports SQLAlchemy and opens a ledger), and the only ones that need the daemon package."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from slurm_gpuarb.hooks import common, epilog, grants, prolog, task_prolog
from slurm_gpuarb.ledger import Ledger

from .conftest import Cluster

REPO = Path(__file__).resolve().parents[2]
REAL_IN_PROCESS = common.in_process  # before the cluster fixture replaces it


@pytest.fixture
def real_fallback(cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    monkeypatch.setattr(common, "in_process", REAL_IN_PROCESS)
    inventory = (REPO / "docker-slurm" / "inventory.toml").read_text().replace("version = 1\n", "", 1)
    (tmp_path / "fake").mkdir()
    cluster.write_config(quantum=None, extra=f'[ledger]\nurl = "sqlite:///{tmp_path}/ledger.db"\n'
                               f'[telemetry]\nfake_state = "{tmp_path}/fake"\n' + inventory)
    return cluster


def _leases(tmp_path: Path) -> list[tuple[str | None, int, str, str]]:
    with Ledger.open(f"sqlite:///{tmp_path}/ledger.db") as ledger:
        return [(le.job_id, le.restart_count, le.node, le.state.value) for le in ledger.leases()]


def test_prolog_and_epilog_without_a_daemon(real_fallback: Cluster, tmp_path: Path) -> None:
    env = real_fallback.env(SLURM_JOB_COMMENT="gpuarb: vram=6GiB prio=batch", SLURM_JOB_GPUS="0")
    assert prolog.main(env) == 0
    g = grants.read_grant(str(real_fallback.state_dir), "n1", "12")
    assert g is not None, real_fallback.log()
    assert (g.status, g.vram_mib) == ("granted", 6144), real_fallback.log()
    assert g.exports["GPUARB_VRAM_MB"] == "6144" and g.exports["GPUARB_LEASE_ID"] == g.lease_id
    assert _leases(tmp_path) == [("12", 0, "n1", "granted")]
    assert "gpuarbd unavailable; deciding in-process" in real_fallback.log()

    out = io.StringIO()
    task_env = {"GPUARB_CONFIG": env["GPUARB_CONFIG"], "SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1",
                "SLURM_JOB_GPUS": "0"}
    assert task_prolog.main(task_env, out) == 0
    assert "export GPUARB_VRAM_MB=6144\n" in out.getvalue()

    assert epilog.main(env) == 0
    assert epilog.main(env) == 0  # replayed: releases nothing more
    assert _leases(tmp_path) == [("12", 0, "n1", "released")]
    assert not real_fallback.grant_file().exists()


def test_bad_spec_without_a_daemon_is_a_refusal(real_fallback: Cluster) -> None:
    assert prolog.main(real_fallback.env(SLURM_JOB_COMMENT="gpuarb: vrm=6GiB")) == 0
    g = grants.read_grant(str(real_fallback.state_dir), "n1", "12")
    assert g is not None and g.status == "refused" and "vram" in (g.reason or "")
