"""The hooks' hot path imports no heavy library (SQLAlchemy alone costs ~0.4 s per job), not the
full config loader, and not ``protocol`` or ``model`` (their dataclasses cost a Prolog more than the
rest of its run; the client speaks through ``wire``): hooks.common's docstring has the measurements."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("sqlalchemy", "click", "jinja2", "alembic", "psycopg", "pynvml")
# Not heavy, but not for the hot path either: only the in-process fallback (daemon down) needs them.
AVOIDED = ("slurm_gpuarb.config", "slurm_gpuarb.protocol", "slurm_gpuarb.model", "dataclasses", "pathlib")


def _python(code: str, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter without site-packages (-S): an editable install's path
    finder imports modules (pathlib, …) at start-up that a root-owned install does not; and a hook
    that reached for a heavy library would fail here rather than pass unnoticed."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_vars}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)


def _modules(code: str) -> list[str]:
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.parametrize("module", ["prolog", "task_prolog", "epilog", "prolog_slurmctld", "health"])
def test_importing_a_hook_imports_nothing_heavy(module: str) -> None:
    code = (f"import slurm_gpuarb.hooks.{module}, sys; "
            f"print(*sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    assert _modules(code) == []


# A whole Prolog and Epilog against a daemon (a tiny one in a thread of the same process).
_RUN = r"""
import json, os, socket, sys, tempfile, threading
d = os.environ.get("RUN_DIR") or tempfile.mkdtemp(dir="/tmp")  # RUN_DIR: the same config and cache again
sock_path = os.path.join(d, "s.sock")
if os.path.exists(sock_path):
    os.unlink(sock_path)
srv = socket.socket(socket.AF_UNIX); srv.bind(sock_path); srv.listen(4)
answers = {
    "job_start": {"v": 1, "ok": True, "op": "job_start", "lease": None, "grant": {
        "job_id": "12", "restart_count": 0, "node": "n1", "lease_id": "L1", "vram_mib": 6144, "gpus": [0],
        "mig_uuid": None, "prio": "batch", "exports": {"GPUARB_VRAM_MB": "6144"}, "refused": None}},
    "job_end": {"v": 1, "ok": True, "op": "job_end", "released": ["L1"]},
}
def serve():
    while True:
        c, _ = srv.accept()
        req = json.loads(c.makefile("rb").readline())
        c.sendall(json.dumps(answers[req["op"]]).encode() + b"\n"); c.close()
threading.Thread(target=serve, daemon=True).start()
cfg = os.path.join(d, "g.toml")
if not os.path.exists(cfg):
    with open(cfg, "w") as f:
        f.write(f'version = 1\n[daemon]\nsocket = "{sock_path}"\nstate_dir = "{d}/state"\nlog_file = "{d}/log"\n')
    os.chmod(cfg, 0o644)
from slurm_gpuarb.hooks import common
common.SETTINGS_CACHE = os.path.join(d, "run", "hook-settings.cache")  # never the machine's /run/gpuarb
env = {"GPUARB_CONFIG": cfg, "SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1", "SLURM_JOB_GPUS": "0",
       "SLURM_JOB_UID": str(os.getuid()), "SLURM_JOB_COMMENT": "gpuarb: vram=6GiB"}
from slurm_gpuarb.hooks import HOOK_MODULE
assert HOOK_MODULE.main(env) == 0
assert "granted" in open(f"{d}/log").read() or "released" in open(f"{d}/log").read()
assert "slurm_gpuarb.wire" in sys.modules  # it did talk to the daemon
print(*sorted(m for m in sys.modules if m.split(".")[0] in HEAVY or m in AVOIDED))
print("tomllib" in sys.modules, file=sys.stderr)
"""


@pytest.mark.parametrize("module", ["prolog", "epilog"])
def test_a_hook_run_with_the_daemon_stays_light(module: str) -> None:
    code = _RUN.replace("HOOK_MODULE", module).replace("HEAVY", repr(HEAVY)).replace("AVOIDED", repr(AVOIDED))
    assert _modules(code) == []


def test_a_warm_settings_cache_spares_the_prolog_tomllib(short_dir: str) -> None:
    # tomllib (typing, re, datetime) was the largest import left on the Prolog's path.
    code = _RUN.replace("HOOK_MODULE", "prolog").replace("HEAVY", repr(HEAVY)).replace("AVOIDED", repr(AVOIDED))
    seen = []
    for _ in range(2):
        proc = _python(code, RUN_DIR=short_dir)
        assert proc.returncode == 0, proc.stderr
        seen.append(proc.stderr.split())
    assert seen == [["True"], ["False"]]  # the first run parsed and wrote the cache, the second read it
    assert os.path.isfile(os.path.join(short_dir, "run", "hook-settings.cache"))


def test_task_prolog_needs_not_even_the_protocol() -> None:
    code = ("import slurm_gpuarb.hooks.task_prolog as t, sys; t.main({'SLURM_JOB_GPUS': '0', 'SLURM_JOB_ID': '1', "
            "'SLURMD_NODENAME': 'n1', 'GPUARB_CONFIG': '/nonexistent'}); "
            "print(*sorted(m for m in sys.modules if m in ('slurm_gpuarb.protocol', 'slurm_gpuarb.model', 'json', "
            "'slurm_gpuarb.client', 'socket')), file=sys.stderr)")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.split() == []


def test_a_cpu_jobs_prolog_imports_only_its_own_modules() -> None:
    # Most jobs of many clusters are CPU jobs, and every one of them runs the Prolog.
    # `os` is loaded by every normal interpreter start (site imports it); -S skips site, so load it first.
    code = ("import os, sys; before = set(sys.modules); import slurm_gpuarb.hooks.prolog as p; "
            "assert p.main({'SLURM_JOB_ID': '1'}) == 0; print(*sorted(set(sys.modules) - before))")
    assert _modules(code) == ["__future__", "slurm_gpuarb", "slurm_gpuarb.errors", "slurm_gpuarb.hooks",
                              "slurm_gpuarb.hooks.common", "slurm_gpuarb.hooks.exitcodes",
                              "slurm_gpuarb.hooks.grants", "slurm_gpuarb.hooks.prolog", "slurm_gpuarb.logsink"]
