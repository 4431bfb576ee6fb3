"""The controller's loop: one listing per tick, steps isolated from each other's failures, SIGTERM, --role."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from slurm_gpuarb.config import Config
from slurm_gpuarb.controller import Controller, settings_of
from slurm_gpuarb.errors import GpuArbError, LedgerError
from slurm_gpuarb.ledger import Ledger
from slurm_gpuarb.model import ControllerConfig, Reservation
from slurm_gpuarb.slurm.base import SlurmError

from .conftest import AGENT_UID, T0, Clock, FakeSlurm, Probe, Status, make_job

REPO = Path(__file__).resolve().parents[2]


class CountingSlurm(FakeSlurm):
    listings: int = 0

    def jobs(self, job_ids: object = None) -> list[object]:  # type: ignore[override]
        self.listings += 1
        return super().jobs()  # type: ignore[return-value]


def test_one_listing_per_tick(cfg: Config, ledger: Ledger, clock: Clock, probe: Probe) -> None:
    slurm = CountingSlurm(clock=clock)
    slurm.add(make_job("42", comment="gpuarb/1: vram=8192MiB prio=batch min=4096MiB shards=16", reason="Resources",
                       tres="gres:shard:16"))
    tick = Controller(cfg, ledger=ledger, slurm=slurm, probe_fn=probe, clock=clock, uid=AGENT_UID).tick()
    assert sorted(tick.actions) == ["hold ollama job 100", "shrink job 42"]
    assert (tick.jobs, slurm.listings) == (1, 1)


def test_slurm_down_skips_the_tick_and_the_next_one_retries(controller: Controller, slurm: FakeSlurm,
                                                            ledger: Ledger, probe: Probe) -> None:
    slurm.fail = SlurmError("could not list Slurm's jobs: slurmctld does not answer")
    tick = controller.tick()
    assert tick.jobs is None and tick.actions == []
    assert tick.errors == ["slurm: could not list Slurm's jobs: slurmctld does not answer"]
    assert probe.calls == [] and slurm.submitted == [] and ledger.decisions() == []
    slurm.fail = None
    assert controller.tick().actions == ["hold ollama job 100"]


def test_a_failing_step_does_not_stop_the_others(controller: Controller, slurm: FakeSlurm, clock: Clock,
                                                 ledger: Ledger) -> None:
    def broken(res: Reservation) -> Status:
        raise RuntimeError("probe bug")

    agent = Controller(controller.cfg, ledger=ledger, slurm=slurm, probe_fn=broken, clock=clock, uid=AGENT_UID)
    slurm.add(make_job("42", comment="gpuarb/1: vram=8192MiB prio=batch min=4096MiB shards=16", reason="Resources",
                       tres="gres:shard:16"))
    tick = agent.tick()
    assert tick.errors == ["holders: RuntimeError: probe bug"]
    assert tick.actions == ["shrink job 42"]


def test_a_ledger_failure_in_one_step_is_reported(controller: Controller, ledger: Ledger,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def down(*args: object, **kwargs: object) -> list[object]:
        raise LedgerError("could not list leases: database is locked")

    monkeypatch.setattr(ledger, "live", down)
    tick = controller.tick()
    assert tick.errors == ["reconcile: could not list leases: database is locked"]
    assert tick.actions == ["hold ollama job 100"]


def test_run_ticks_until_stopped(cfg: Config, ledger: Ledger, slurm: FakeSlurm, probe: Probe) -> None:
    agent = Controller(cfg, ledger=ledger, slurm=slurm, probe_fn=probe, uid=AGENT_UID,
                       settings=ControllerConfig(interval_s=0.01))
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while agent.ticks < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.ticks >= 3
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()
    assert len(slurm.submitted) == 1  # a holder, found again on every later tick


def test_settings_of() -> None:
    cfg = Config(version=1, path=None, node="n1", ledger_url="sqlite://", pg_password_file=None, telemetry="auto",
                 policy=None, controller=ControllerConfig(interval_s=30.0, shrink=False))  # type: ignore[arg-type]
    assert settings_of(cfg) == ControllerConfig(interval_s=30.0, shrink=False)
    assert settings_of(cfg, interval_s=2) == ControllerConfig(interval_s=2.0, shrink=False)


def test_interval_override(cfg: Config, ledger: Ledger, slurm: FakeSlurm) -> None:
    assert Controller(cfg, ledger=ledger, slurm=slurm, interval_s=2.5).settings.interval_s == 2.5
    assert Controller(cfg, ledger=ledger, slurm=slurm).settings.interval_s == 15.0


# --------------------------------------------------------------------------- gpuarbd --role controller


def test_gpuarbd_role_controller_runs_and_stops_on_sigterm(cfg: Config, tmp_path: Path) -> None:
    """The real entry point, kept away from any real cluster: its Slurm client commands read an empty
    slurm.conf (or are not installed), so every tick is skipped and logged; SIGTERM ends it cleanly."""
    assert cfg.path is not None
    (tmp_path / "slurm.conf").write_text("", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUARB_", "SLURM_"))}
    env.update(PYTHONPATH=str(REPO), SLURM_CONF=str(tmp_path / "slurm.conf"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "slurm_gpuarb.daemon.server", "--role", "controller", "--foreground",
         "--config", str(cfg.path), "--interval", "0.05", "--slurm", "cli"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "gpuarb.log"
    pid_file = tmp_path / "run" / "gpuarbd-controller.pid"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text(encoding="utf-8") if log.exists() else ""
            if text.count("tick skipped") >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        assert log.read_text(encoding="utf-8").count("tick skipped") >= 2, log.read_text(encoding="utf-8")
        assert pid_file.read_text().strip() == str(proc.pid)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    text = log.read_text(encoding="utf-8")
    assert "gpuarbd-controller: running" in text and "gpuarbd-controller: stopped" in text
    assert "could not list Slurm's jobs" in text  # the adapter's own words, in the skipped tick's line
    assert not pid_file.exists()


def test_gpuarbd_role_controller_refuses_slurm_none(cfg: Config) -> None:
    from slurm_gpuarb.daemon.server import main

    assert cfg.path is not None
    assert main(["--role", "controller", "--foreground", "--config", str(cfg.path), "--slurm", "none"]) == 1


def test_gpuarbd_help_names_the_role(capsys: pytest.CaptureFixture[str]) -> None:
    from slurm_gpuarb.daemon.server import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "--role {node,controller}" in out and "gpuarbd --role controller" in out


def test_a_ledger_that_cannot_be_opened_stops_the_start(cfg: Config, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    bad = dataclasses.replace(cfg, ledger_url=f"sqlite:///{tmp_path}/a-file/ledger.db")
    agent = Controller(bad, slurm=FakeSlurm(), probe_fn=lambda r: None, clock=lambda: T0)
    agent.stop_requested.set()  # had it started, serve() would return at once instead of running on
    with pytest.raises(GpuArbError):
        agent.serve()
    assert not (tmp_path / "run" / "gpuarbd-controller.pid").exists()
