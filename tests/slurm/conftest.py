"""The ``slurm`` tier: real slurmctld + 4 slurmd (``docker-slurm/native-up``) with the real hooks and gpuarbd.

One cluster per session. ``native-up`` installs what is missing (Debian's Slurm 22.05 + munge), renders
the configs from ``docker-slurm/inventory.toml`` with every hook (``GPUARB_CLUSTER_HOOKS=1``), starts
gpuarbd, slurmctld and the four slurmd; at the end ``native-down`` stops them by PID file and the
session asserts that none of the processes native-up recorded is still alive.

The tier skips itself (with the reason) when it cannot run: not root, no Debian ``slurmctld`` to
install, or ``GPUARB_SLURM_TESTS=0``. In CI (root on Debian 12) it runs.

Between tests: the jobs a test submitted are cancelled by id, the fake GPUs' overlays are cleared,
and a daemon a test stopped or killed is continued or restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from slurm_gpuarb.model import GpuProcess
from slurm_gpuarb.slurm import JobInfo, select_adapter
from slurm_gpuarb.telemetry import fake

REPO = Path(__file__).resolve().parents[2]
INVENTORY = REPO / "docker-slurm" / "inventory.toml"  # native-up's default
NATIVE_UP = REPO / "docker-slurm" / "native-up"
NATIVE_DOWN = REPO / "docker-slurm" / "native-down"
NODES = ("n1", "n2", "n3", "n4")
# Job states after which a job never runs again (squeue's %T).
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                      "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT"})
# A job Slurm held after its Prolog failed: it will not run again without help (and its node drained).
LAUNCH_FAILED = re.compile(r"launch_failed|Prolog|JobHeldAdmin")
CLEAN_PATH = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
TEST_USER = "gpuarbtest"
# A job script that waits until the test lets it finish (touch <out>/go-<jobid>): the test inspects
# the running job's lease without racing a sleep. Gives up after 60 s (exit 3).
GATED = ("env; for i in $(seq 600); do if [ -e {out}/go-$SLURM_JOB_ID ]; then exit 0; fi; sleep 0.1; done; "
         "echo gate never opened; exit 3")


class ClusterError(AssertionError):
    """The cluster did something a test did not expect (a job held, a wait ran out)."""


@dataclass
class Cluster:
    """The running test cluster and what tests do with it (all through Slurm's and gpuarb's own commands)."""

    dir: Path
    submitted: list[str] = field(default_factory=list)
    log_offset: int = 0

    # ------------------------------------------------------------------ paths

    @property
    def out(self) -> Path:
        return self.dir / "out"

    @property
    def fake_state(self) -> Path:
        return self.dir / "fake"

    @property
    def gpuarb_bin(self) -> Path:
        return self.dir / "venv" / "bin" / "gpuarb"

    @property
    def python(self) -> Path:
        return self.dir / "venv" / "bin" / "python"

    @property
    def hook_log(self) -> Path:
        return self.dir / "log" / "gpuarb.log"

    @property
    def daemon_pidfile(self) -> Path:
        return self.dir / "run" / "gpuarbd.pid"

    def shim(self, name: str) -> Path:
        """An installed hook shim by its file name (``gpuarb-epilog``), as Slurm runs it."""
        for sub in ("prolog", "epilog"):
            path = self.dir / "hooks" / sub / name
            if path.is_file():
                return path
        raise ClusterError(f"no installed hook shim {name} under {self.dir / 'hooks'}")

    # ------------------------------------------------------------------ commands

    @staticmethod
    def env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment: what an admin's shell has after native-up, nothing of pytest's GPUARB_*."""
        env = {"PATH": CLEAN_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
        env.update(extra or {})
        return env

    def run(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 120,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [str(a) for a in args]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(env or self.env()),
                           check=False)
        if check and p.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} exited {p.returncode}\nstdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def gpuarb(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The installed ``gpuarb`` CLI with no environment: it reads /etc/slurm/gpuarb.toml."""
        return self.run(self.gpuarb_bin, *args, check=check)

    def gpuarb_json(self, *args: str) -> Any:
        return json.loads(self.gpuarb(*args, "--json").stdout)

    # ------------------------------------------------------------------ jobs

    def sbatch(self, *args: str, wrap: str, held: bool = False, user: str | None = None) -> str:
        """Submit a batch job; returns its id (recorded, so the test's cleanup cancels it)."""
        cmd = ["sbatch", "--parsable", "-o", f"{self.out}/slurm-%j.out", "-t", "5", *args]
        if held:
            cmd.append("-H")
        cmd += ["--wrap", wrap]
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        job_id = self.run(*cmd).stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise ClusterError(f"sbatch printed {job_id!r}, not a job id")
        self.submitted.append(job_id)
        return job_id

    def gated(self, *args: str, user: str | None = None) -> str:
        """A job that prints its environment and runs until :meth:`go` lets it finish."""
        return self.sbatch(*args, wrap=GATED.format(out=self.out), user=user)

    def go(self, *job_ids: str) -> None:
        for j in job_ids:
            (self.out / f"go-{j}").touch()

    def states(self, job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """``{job id: (state, reason)}`` from squeue (finished jobs stay listed for MinJobAge)."""
        if not job_ids:
            return {}
        p = self.run("squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%r", check=False)
        found: dict[str, tuple[str, str]] = {}
        for line in p.stdout.splitlines():
            parts = line.strip().split("|")
            if len(parts) == 3:
                found[parts[0]] = (parts[1], parts[2])
        return found

    def job(self, job_id: str) -> dict[str, str]:
        """A few fields of ``scontrol show job -o`` (the first occurrence of each key: Comment= comes
        later and keeps its spaces, so a comment cannot shadow these)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        fields = {}
        for key in ("JobState", "Reason", "Restarts", "NodeList", "ExitCode", "BatchHost"):
            m = re.search(rf"(?:^| ){key}=(\S*)", text)
            if m:
                fields[key] = m.group(1)
        return fields

    def wait(self, job_ids: Sequence[str], want: Iterable[str] = TERMINAL, timeout: float = 120) -> dict[str, str]:
        """Poll until every job is in one of ``want``; returns their states. Raises :class:`ClusterError`
        on a timeout or when a job is held after a launch failure (it would never get there)."""
        want = frozenset(want)
        deadline = time.monotonic() + timeout
        last: dict[str, tuple[str, str]] = {}
        while True:
            last = self.states(job_ids)
            for j, (state, reason) in last.items():
                if state == "PENDING" and LAUNCH_FAILED.search(reason) and "PENDING" not in want:
                    raise ClusterError(f"job {j} is held after a failed launch ({reason}): "
                                       f"sinfo -R: {self.drained()}")
            if all(last.get(j, ("?", ""))[0] in want for j in job_ids):
                return {j: last[j][0] for j in job_ids}
            if time.monotonic() > deadline:
                raise ClusterError(f"jobs not {sorted(want)} after {timeout:.0f}s: {last}")
            time.sleep(0.3)

    def output(self, job_id: str) -> str:
        path = self.out / f"slurm-{job_id}.out"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""

    def job_env(self, job_id: str) -> dict[str, str]:
        """The ``env`` a job printed (KEY=VALUE lines of its output)."""
        env = {}
        for line in self.output(job_id).splitlines():
            key, sep, value = line.partition("=")
            if sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                env[key] = value
        return env

    def cancel(self, job_ids: Sequence[str]) -> None:
        live = [j for j, (s, _) in self.states(job_ids).items() if s not in TERMINAL]
        if not live:
            return
        self.go(*live)
        self.run("scancel", *live, check=False)
        with contextlib.suppress(ClusterError):
            self.wait(live, timeout=60)

    # ------------------------------------------------------------------ ledger (through the CLI)

    def leases(self, job_id: str | None = None) -> list[dict[str, Any]]:
        """Every lease (all states), optionally of one job: ``gpuarb lease list --all --json``."""
        args = ["lease", "list", "--all", "--limit", "100000"]
        if job_id is not None:
            args += ["--job", job_id]
        rows: list[dict[str, Any]] = self.gpuarb_json(*args)
        return rows

    def live_leases(self, job_id: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self.gpuarb_json("lease", "list", "--job", job_id)
        return rows

    def decisions(self, job_id: str) -> list[dict[str, Any]]:
        """The ledger's decision rows about a job (``gpuarb explain JOBID --json``)."""
        rows: list[dict[str, Any]] = self.gpuarb_json("explain", job_id)["decisions"]
        return rows

    def wait_lease(self, job_id: str, *, restart_count: int = 0, timeout: float = 60) -> dict[str, Any]:
        """The live lease of one run of a job, once its Prolog has recorded it."""
        deadline = time.monotonic() + timeout
        while True:
            rows = [r for r in self.live_leases(job_id) if r["restart_count"] == restart_count]
            if rows:
                if len(rows) != 1:
                    raise ClusterError(f"job {job_id} run {restart_count} holds {len(rows)} live leases: {rows}")
                return rows[0]
            if time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} run {restart_count} got no lease within {timeout:.0f}s; "
                                   f"state {self.states([job_id])}; log: {self.log_lines(job_id)}")
            time.sleep(0.3)

    def log_lines(self, job_id: str | None = None) -> list[str]:
        """Hook/daemon log lines written in this session (of one job: those with ``job=<id>``)."""
        try:
            with self.hook_log.open("rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return []
        lines = text.splitlines()
        if job_id is None:
            return lines
        return [ln for ln in lines if re.search(rf"\bjob={re.escape(job_id)}\b", ln)]

    # ------------------------------------------------------------------ nodes

    def drained(self) -> list[str]:
        """``sinfo -R`` lines: nodes drained or down, with their reason (empty when all is well)."""
        out = self.run("sinfo", "-R", "-h", "-o", "%N|%T|%E").stdout
        return [ln for ln in out.splitlines() if ln.strip()]

    def node_states(self) -> dict[str, str]:
        out = self.run("sinfo", "-N", "-h", "-o", "%N %T").stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def assert_nodes_healthy(self) -> None:
        assert self.drained() == [], "a node is drained or down"
        states = self.node_states()
        # planned: idle, with a pending job the backfill scheduler means to start there (Slurm 22.05).
        ok = ("idle", "allocated", "mixed", "completing", "planned")
        bad = {n: s for n, s in states.items() if s.rstrip("*") not in ok}
        assert not bad, f"nodes in unexpected states: {bad}"

    def resume(self, node: str) -> None:
        self.run("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)

    def slurm_job(self, job_id: str) -> JobInfo:
        """The job as Slurm holds it (``squeue --json`` through the project's own adapter)."""
        found = [j for j in select_adapter("cli").jobs([job_id]) if j.job_id == job_id]
        if len(found) != 1:
            raise ClusterError(f"squeue --json lists job {job_id} {len(found)} times")
        return found[0]

    # ------------------------------------------------------------------ submit plane

    @property
    def job_submit_lua(self) -> Path:
        return self.dir / "etc" / "job_submit.lua"

    def slurmctld_log(self) -> str:
        return (self.dir / "log" / "slurmctld.log").read_text(encoding="utf-8", errors="replace")

    @contextlib.contextmanager
    def without_submit_plane(self) -> Iterator[None]:
        """A site without the submit plane: job_submit.lua passes everything through while the block
        runs (the run plane's own defences are tested so). slurmctld re-reads the script when its
        mtime is newer than the last load (whole seconds), so each swap is dated ahead."""
        original = self.job_submit_lua.read_bytes()
        passthrough = (b"-- gpuarb test cluster: the submit plane is switched off for a test\n"
                       b"function slurm_job_submit(job_desc, part_list, submit_uid) return slurm.SUCCESS end\n"
                       b"function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)\n"
                       b"  return slurm.SUCCESS\nend\n")
        self._swap_lua(passthrough)
        try:
            yield
        finally:
            self._swap_lua(original)

    def _swap_lua(self, content: bytes) -> None:
        path = self.job_submit_lua
        tmp = path.with_name(path.name + ".swap")
        tmp.write_bytes(content)
        tmp.chmod(0o644)
        stamp = max(time.time(), path.stat().st_mtime) + 2
        os.utime(tmp, (stamp, stamp))
        tmp.replace(path)

    # ------------------------------------------------------------------ fake GPUs

    def add_process(self, node: str, process: GpuProcess) -> None:
        fake.add_process(self.fake_state, node, process)

    def remove_process(self, node: str, pid: int) -> None:
        fake.remove_process(self.fake_state, node, pid)

    def set_used_extra(self, node: str, gpu: int, mib: int) -> None:
        fake.set_used_extra(self.fake_state, node, gpu, mib)

    def clear_fake(self) -> None:
        for n in NODES:
            fake.clear(self.fake_state, n)

    # ------------------------------------------------------------------ daemon and hooks

    def daemon_pid(self) -> int | None:
        try:
            pid = int(self.daemon_pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if _comm(pid) == "gpuarbd" else None

    def signal_daemon(self, sig: signal.Signals) -> int:
        pid = self.daemon_pid()
        if pid is None:
            raise ClusterError(f"gpuarbd is not running (pid file {self.daemon_pidfile})")
        os.kill(pid, sig)
        return pid

    def ensure_daemon(self) -> None:
        """Continue a stopped gpuarbd, start a dead one as native-up does (lib.sh's start_gpuarbd: only
        the daemon; a whole native-up would reinstall the package when the checkout changed)."""
        pid = self.daemon_pid()
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
            return
        gpuarbd = self.dir / "venv" / "bin" / "gpuarbd"
        if not gpuarbd.exists():
            return  # a cluster without the daemon (GPUARB_CLUSTER_DAEMON=auto before it was installed)
        script = 'D=$1; REPO=$2; . "$REPO/docker-slurm/lib.sh"; start_gpuarbd "$3" "$4"'
        self.run("bash", "-c", script, "start_gpuarbd", self.dir, REPO, gpuarbd, ",".join(NODES), timeout=60)

    def hook(self, name: str, env: Mapping[str, str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run an installed shim as Slurm does: as root, with only ``env`` (no PATH)."""
        return subprocess.run([str(self.shim(name))], env=dict(env), capture_output=True, text=True,
                              timeout=timeout, check=False)


def _comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def _recorded_pids(d: Path) -> dict[int, str]:
    """``{pid: comm}`` of every live process whose pid file native-up wrote (or made Slurm write)."""
    found: dict[int, str] = {}
    for f in (d / "run").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(f.read_text().strip())
            comm = _comm(pid)
            if comm is not None:
                found[pid] = comm
    return found


def _native_env(extra: Mapping[str, str]) -> dict[str, str]:
    # The caller's GPUARB_* and PYTHON* (pytest's own settings) must not leak into the cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUARB_", "PYTHON", "SLURM_"))}
    env["PATH"] = CLEAN_PATH + ":" + env.get("PATH", "")
    env.update(extra)
    return env


def native_up(d: Path, **extra: str) -> None:
    """Bring the cluster up (or start what is not running): every hook, the daemon, slurmdbd."""
    env = _native_env({
        "GPUARB_CLUSTER_DIR": str(d),
        "GPUARB_CLUSTER_HOOKS": os.environ.get("GPUARB_CLUSTER_HOOKS", "1"),
        "GPUARB_CLUSTER_DAEMON": os.environ.get("GPUARB_CLUSTER_DAEMON", "1"),
        "GPUARB_CLUSTER_LUA": "1",  # the submit plane: tests that need it off use without_submit_plane()
        "GPUARB_CLUSTER_CONTROLLER": "0",  # tests start their own agent (test_controller.running_agent)
        # slurmdbd + MariaDB: QoS per class from the rendered gpuarb-qos.sh, QoS preemption (llm requeues
        # batch after GraceTime). The test user needs an association before it can submit.
        "WITH_DBD": "1",
        "GPUARB_CLUSTER_USERS": TEST_USER,
        **extra,
    })
    p = subprocess.run([str(NATIVE_UP)], env=env, capture_output=True, text=True, timeout=900, check=False)
    if p.returncode != 0:
        raise ClusterError(f"native-up failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def native_down(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(NATIVE_DOWN)], env=_native_env({"GPUARB_CLUSTER_DIR": str(d)}),
                          capture_output=True, text=True, timeout=300, check=False)


def _skip_reason() -> str | None:
    if os.environ.get("GPUARB_SLURM_TESTS") == "0":
        return "GPUARB_SLURM_TESTS=0"
    if os.geteuid() != 0:
        return "the slurm tier needs root (it starts Slurm daemons and writes /etc/slurm symlinks)"
    if not shutil.which("dpkg-query", path=CLEAN_PATH):
        return "the slurm tier needs Debian's Slurm packages (no dpkg here)"
    installed = subprocess.run(["dpkg-query", "-W", "-f=${Status}", "slurmctld"], capture_output=True, text=True,
                               check=False).stdout
    if "ok installed" in installed:
        return None
    policy = subprocess.run(["apt-cache", "policy", "slurmctld"], capture_output=True, text=True,
                            check=False).stdout
    m = re.search(r"Candidate:\s*(\S+)", policy)
    if m is None or m.group(1) == "(none)":
        return "Debian's slurmctld is neither installed nor installable (apt-cache policy slurmctld: no candidate)"
    return None


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The running test cluster (started fresh: RESET=1 wipes job ids, the ledger and fake overlays)."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    d = Path(os.environ.get("GPUARB_CLUSTER_DIR", "/tmp/gpuarb-cluster"))
    if _recorded_pids(d):
        # A cluster left running (an earlier session, a helper's recording): this tier owns it now.
        native_down(d)
    _ensure_test_user()
    native_up(d, RESET="1")
    c = Cluster(d)
    # Job ids start at 1 again: an old job's gate or output file must not answer for a new job.
    for stale in (*c.out.glob("go-*"), *c.out.glob("slurm-*.out")):
        stale.unlink(missing_ok=True)
    c.log_offset = c.hook_log.stat().st_size if c.hook_log.exists() else 0
    pids = _recorded_pids(d)
    try:
        yield c
    finally:
        pids.update(_recorded_pids(d))  # a daemon restarted by a test has a new pid
        down = native_down(d)
        left = {pid: comm for pid, comm in pids.items() if _comm(pid) == comm}
        assert down.returncode == 0, f"native-down failed: {down.stdout}\n{down.stderr}"
        assert not left, f"still running after native-down: {left}"


@pytest.fixture(autouse=True)
def _between_tests(request: pytest.FixtureRequest) -> Iterator[None]:
    """Cancel what a test submitted, clear the fake overlays, continue/restart a daemon it stopped."""
    if "cluster" not in request.fixturenames:
        yield
        return
    c: Cluster = request.getfixturevalue("cluster")
    first = len(c.submitted)
    yield
    c.ensure_daemon()
    c.cancel(c.submitted[first:])
    c.clear_fake()
    # A test that failed half-way may leave a node drained: the next test starts from a healthy cluster
    # (each test asserts its own nodes' health, so this hides nothing of its own).
    for line in c.drained():
        c.resume(line.split("|")[0])


def _ensure_test_user() -> None:
    """An unprivileged user for jobs (created with useradd when missing; native-up gives it an
    association in slurmdbd)."""
    if subprocess.run(["id", "-u", TEST_USER], capture_output=True, check=False).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/bash", TEST_USER],
                       check=True, capture_output=True)


@pytest.fixture(scope="session")
def test_user(cluster: Cluster) -> str:
    return TEST_USER
