"""hooks.common: the tiny settings reader (kept equal to config.load), the deadline, Slurm's environment,
and ask() with its in-process fallback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from slurm_gpuarb import config, protocol
from slurm_gpuarb.errors import ConfigError, LeaseSpecError, NodeFault
from slurm_gpuarb.hooks import common

from .conftest import HANG, Cluster, FakeDaemon, Respond, err, ok

REPO = Path(__file__).resolve().parents[2]
CLUSTER_TOML = REPO / "docker-slurm" / "inventory.toml"
DEFAULT_CONFIG_PATH = common.DEFAULT_CONFIG_PATH  # before conftest points it into a temp dir
Factory = Callable[[Respond], FakeDaemon]


def _values(s: common.Settings) -> tuple[object, ...]:
    return (s.socket_path, s.state_dir, s.log_file, s.fail_mode, s.deadline_s, s.quantum_mib, s.error)


def _same_as_config(env: dict[str, str]) -> None:
    """read_settings agrees with config.load, both when it parses the TOML (and writes the cache) and
    when the next call reads the cache instead."""
    s = common.read_settings(env)
    assert s.error is None
    cfg = config.load(env=env)
    assert (s.socket_path, s.state_dir, s.log_file, s.fail_mode, s.deadline_s, s.quantum_mib) == (
        str(cfg.socket_path), str(cfg.state_dir), str(cfg.log_file), cfg.fail_mode, cfg.hook_deadline_s,
        cfg.policy.quantum_mib)
    assert Path(common.SETTINGS_CACHE).is_file()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "_parse_toml", _no_parse)
        assert _values(common.read_settings(env)) == _values(s)


def _no_parse(path: str, raw: bytes) -> dict[str, Any]:
    raise AssertionError("parsed the TOML although the settings cache should have answered")


def test_defaults_equal_config_defaults(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text("version = 1\n")
    _same_as_config({"GPUARB_CONFIG": str(f)})
    assert DEFAULT_CONFIG_PATH == config.DEFAULT_CONFIG_PATH


def test_file_values_equal_config(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('version = 1\n[daemon]\nsocket = "/s/g.sock"\nstate_dir = "/s/run"\nlog_file = "/s/g.log"\n'
                 '[hooks]\nfail_mode = "closed"\ndeadline = "1m30s"\n[policy]\nquantum = "1GiB"\n')
    _same_as_config({"GPUARB_CONFIG": str(f)})


def test_environment_twins_win_like_config(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('version = 1\n[daemon]\nsocket = "/s/g.sock"\n[hooks]\nfail_mode = "closed"\n')
    env = {"GPUARB_CONFIG": str(f), "GPUARB_SOCKET": "/e/x.sock", "GPUARB_STATE_DIR": "/e/run",
           "GPUARB_LOG_FILE": "/e/log", "GPUARB_FAIL_MODE": "open", "GPUARB_HOOK_DEADLINE": "4s",
           "GPUARB_STATE_EMPTY": ""}
    _same_as_config(env)
    assert common.read_settings(env).socket_path == "/e/x.sock"


def test_the_test_clusters_inventory_reads_the_same(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text(CLUSTER_TOML.read_text() + '\n[daemon]\nsocket = "/c/s.sock"\n')
    _same_as_config({"GPUARB_CONFIG": str(f)})


@pytest.mark.parametrize(("text", "problem"), [
    ('version = 1\n[hooks]\nfail_mode = "sometimes"\n', "open or closed"),
    ('version = 1\n[daemon]\nsocket = "relative.sock"\n', "absolute path"),
    ('version = 1\n[hooks]\ndeadline = "10"\n', "duration"),
    ('version = 2\n', "version"),
    ("version = 1\n[daemon\n", "TOML"),
    ('version = 1\ndaemon = "x"\n', "table"),
])
def test_broken_config_gives_defaults_and_an_error(tmp_path: Path, text: str, problem: str) -> None:
    f = tmp_path / "g.toml"
    f.write_text(text)
    s = common.read_settings({"GPUARB_CONFIG": str(f)})
    assert s.error is not None and problem in s.error
    assert (s.socket_path, s.fail_mode, s.deadline_s) == ("/run/gpuarb/gpuarb.sock", "open", 10)
    with pytest.raises(ConfigError):
        config.load(env={"GPUARB_CONFIG": str(f)})
    assert _values(common.read_settings({"GPUARB_CONFIG": str(f)})) == _values(s)  # cached or not: the same


def test_group_writable_config_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "g.toml"
    f.write_text('version = 1\n[daemon]\nsocket = "/evil.sock"\n')
    assert common.read_settings({"GPUARB_CONFIG": str(f)}).socket_path == "/evil.sock"  # cached now
    f.chmod(0o664)
    s = common.read_settings({"GPUARB_CONFIG": str(f)})
    assert s.error is not None and "chmod go-w" in s.error
    assert s.socket_path == "/run/gpuarb/gpuarb.sock"


def test_missing_named_config_is_an_error(tmp_path: Path) -> None:
    s = common.read_settings({"GPUARB_CONFIG": str(tmp_path / "none.toml")})
    assert s.error is not None and "cannot read" in s.error


# --------------------------------------------------------------------------- the settings cache


def _config(tmp_path: Path, socket: str = "/s/g.sock") -> dict[str, str]:
    f = tmp_path / "g.toml"
    f.write_text(f'version = 1\n[daemon]\nsocket = "{socket}"\n[hooks]\ndeadline = "4s"\n')
    f.chmod(0o644)
    return {"GPUARB_CONFIG": str(f)}


def _cache() -> Path:
    return Path(common.SETTINGS_CACHE)


def test_cache_holds_the_key_and_the_settings_as_text(tmp_path: Path) -> None:
    env = _config(tmp_path)
    common.read_settings(env)
    st = os.stat(env["GPUARB_CONFIG"])
    key = [env["GPUARB_CONFIG"], st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode,
           st.st_uid]
    assert _cache().read_text().split("\n") == [
        "\t".join(["gpuarb-hook-settings-1", *map(str, key)]), "daemon.socket\t/s/g.sock", "hooks.deadline\t4s",
        "end", ""]
    assert _cache().stat().st_mode & 0o777 == 0o644
    assert list(_cache().parent.iterdir()) == [_cache()]  # no temp file left behind


def test_an_edited_config_is_parsed_again_and_the_cache_rewritten(tmp_path: Path) -> None:
    env = _config(tmp_path)
    assert common.read_settings(env).socket_path == "/s/g.sock"
    _config(tmp_path, socket="/s/edited.sock")
    assert common.read_settings(env).socket_path == "/s/edited.sock"
    assert "daemon.socket\t/s/edited.sock\n" in _cache().read_text()


def test_environment_twins_still_win_over_a_cached_value(tmp_path: Path) -> None:
    env = _config(tmp_path)
    common.read_settings(env)
    assert common.read_settings({**env, "GPUARB_SOCKET": "/e/x.sock"}).socket_path == "/e/x.sock"


def _tamper() -> None:
    """Point the cached socket elsewhere, keeping the key: only a trusted cache may say so."""
    _cache().write_text(_cache().read_text().replace("/s/g.sock", "/evil.sock"))


def _unsafe_owner() -> None:
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    os.chown(_cache(), 1000, 0)


def _group_writable() -> None:
    _cache().chmod(0o664)


def _symlink() -> None:
    real = _cache().with_name("real")
    _cache().rename(real)
    _cache().symlink_to(real)


def _cut_short() -> None:
    _cache().write_text(_cache().read_text().replace("end\n", ""))


@pytest.mark.parametrize(("spoil", "trusted"), [
    (lambda: None, True),  # the control: a root-owned, 0644 cache is believed
    (_unsafe_owner, False),
    (_group_writable, False),
    (_symlink, False),
    (_cut_short, False),
])
def test_only_a_trusted_complete_cache_is_believed(tmp_path: Path, spoil: Callable[[], None], trusted: bool
                                                   ) -> None:
    env = _config(tmp_path)
    common.read_settings(env)
    _tamper()
    spoil()
    assert common.read_settings(env).socket_path == ("/evil.sock" if trusted else "/s/g.sock")


def test_a_value_with_a_tab_is_read_but_not_cached(tmp_path: Path) -> None:
    env = _config(tmp_path, socket="/s/a\\tb.sock")  # a TOML escape: the value holds a real tab
    s = common.read_settings(env)
    assert (s.socket_path, s.error) == ("/s/a\tb.sock", None)
    assert not _cache().exists()


def test_only_root_writes_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert common.read_settings(_config(tmp_path)).socket_path == "/s/g.sock"
    assert not _cache().exists()


def test_a_cache_that_cannot_be_written_is_no_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(common, "SETTINGS_CACHE", str(tmp_path / "a-file" / "hook-settings.cache"))
    s = common.read_settings(_config(tmp_path))
    assert (s.socket_path, s.error) == ("/s/g.sock", None)


# --------------------------------------------------------------------------- environment


def test_job_from_env() -> None:
    job = common.job_from_env({"SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1", "SLURM_JOB_GPUS": "0,1",
                               "SLURM_JOB_UID": "1000", "SLURM_JOB_GID": "100", "SLURM_JOB_USER": "alice",
                               "SLURM_JOB_PARTITION": "batch", "SLURM_JOB_COMMENT": "gpuarb: vram=6GiB",
                               "SLURM_JOB_RESTART_COUNT": "2", "SLURM_JOB_EXIT_CODE": "256"})
    assert (job.job_id, job.node, job.restart_count, job.uid, job.gid, job.user, job.partition, job.comment,
            job.gres, job.exit_code) == ("12", "n1", 2, 1000, 100, "alice", "batch", "gpuarb: vram=6GiB", "0,1", 256)


def test_restart_count_absent_is_zero_and_odd_numbers_are_dropped() -> None:
    job = common.job_from_env({"SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1", "SLURM_JOB_UID": "x",
                               "SLURM_JOB_EXIT_CODE": "-1"})
    assert (job.restart_count, job.uid, job.exit_code, job.comment) == (0, None, None, None)


@pytest.mark.parametrize("env", [
    {"SLURMD_NODENAME": "n1"},
    {"SLURM_JOB_ID": "12; rm -rf /", "SLURMD_NODENAME": "n1"},
    {"SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1/../x"},
    {"SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1", "SLURM_JOB_RESTART_COUNT": "-1"},
])
def test_bad_environment(env: dict[str, str]) -> None:
    with pytest.raises(common.SlurmEnvError):
        common.job_from_env(env)


def test_comment_is_cut_and_made_valid_text() -> None:
    raw = os.fsdecode(b"gpuarb: vram=6GiB \xff") + "x" * 10_000
    text = common.clean_comment(raw)
    assert text is not None and len(text) == common.MAX_COMMENT_CHARS
    assert text.startswith("gpuarb: vram=6GiB \ufffd")
    text.encode("utf-8")  # no lone surrogates left
    assert common.MAX_COMMENT_CHARS <= protocol.MAX_COMMENT_CHARS


# --------------------------------------------------------------------------- deadline


def test_deadline_raises_in_the_main_thread() -> None:
    d = common.Deadline(0.05).arm()
    try:
        with pytest.raises(common.DeadlineExceeded, match=r"deadline of 0\.05s"):
            for _ in range(1000):
                time.sleep(0.01)
    finally:
        d.disarm()
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_deadline_is_not_an_exception_a_handler_could_swallow() -> None:
    assert not issubclass(common.DeadlineExceeded, Exception)


def test_watchdog_exits_the_process_with_the_callbacks_code(tmp_path: Path) -> None:
    # A fallback stuck in C (SQLite's busy wait) never runs a signal handler: the watchdog thread ends it.
    marker = tmp_path / "expired"
    code = (
        "import time, sys\n"
        "from slurm_gpuarb.hooks import common\n"
        "common.WATCHDOG_GRACE_S = 0.05\n"
        "d = common.Deadline(0.1)\n"
        f"d.watchdog(lambda: (open({str(marker)!r}, 'w').write('x'), 7)[1])\n"
        "time.sleep(30)\n"
        "sys.exit(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=20, capture_output=True)
    assert proc.returncode == 7
    assert marker.read_text() == "x"


# --------------------------------------------------------------------------- ask


def test_ask_returns_the_daemons_answer(cluster: Cluster, daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: ok("ping"))
    s = common.read_settings(cluster.env())
    assert common.ask(s, {"v": 1, "op": "ping"}, common.Deadline(5), {}, hook="test")["op"] == "ping"
    assert len(d.requests) == 1 and cluster.fallback_calls == []


def test_ask_falls_back_in_process_when_the_daemon_is_down(cluster: Cluster, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    seen: list[Any] = []

    def fallback(msg: dict[str, Any], env: Any) -> dict[str, Any]:
        seen.append(msg)
        return ok("ping", via="fallback")

    monkeypatch.setattr(common, "in_process", fallback)
    s = common.read_settings(cluster.env())
    from slurm_gpuarb import logsink

    logsink.configure(log_file=cluster.log_file, syslog=False)
    answer = common.ask(s, {"v": 1, "op": "ping"}, common.Deadline(5), {}, hook="test", job="12")
    assert answer["via"] == "fallback" and seen == [{"v": 1, "op": "ping"}]
    assert "test: gpuarbd unavailable; deciding in-process job=12 error=" in cluster.log()


def test_ask_falls_back_when_the_daemon_hangs(cluster: Cluster, daemon_factory: Factory,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    daemon_factory(lambda req: HANG)
    monkeypatch.setattr(common, "in_process", lambda msg, env: ok("ping", via="fallback"))
    s = common.read_settings(cluster.env())
    assert common.ask(s, {"v": 1, "op": "ping"}, common.Deadline(0.5), {}, hook="test")["via"] == "fallback"


def test_ask_raises_what_the_fallback_answers(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    s = common.read_settings(cluster.env())
    monkeypatch.setattr(common, "in_process", lambda msg, env: protocol.error(NodeFault("gpu 0 missing")))
    with pytest.raises(NodeFault, match="gpu 0 missing"):
        common.ask(s, {"v": 1, "op": "ping"}, common.Deadline(5), {}, hook="test")


def test_ask_wraps_a_crashing_fallback(cluster: Cluster) -> None:
    s = common.read_settings(cluster.env())
    with pytest.raises(common.LedgerUnavailable) as info:
        common.ask(s, {"v": 1, "op": "ping"}, common.Deadline(5), {}, hook="test")
    assert "ledger is down too" in str(info.value)


def test_ask_does_not_fall_back_when_the_daemon_said_no(cluster: Cluster, daemon_factory: Factory) -> None:
    daemon_factory(lambda req: err("LeaseSpecError", "bad prio 'urgent'"))
    s = common.read_settings(cluster.env())
    with pytest.raises(LeaseSpecError):
        common.ask(s, {"v": 1, "op": "ping"}, common.Deadline(5), {}, hook="test")
    assert cluster.fallback_calls == []
