"""The prolog/ and epilog/ shims: 3 lines, no PATH needed, the install's own interpreter in isolated mode;
install_hooks (docker-slurm/lib.sh) pins the absolute interpreter; and a whole job through the shims."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

from slurm_gpuarb.render import SHIM_NAMES, HookPaths

from .conftest import FakeDaemon, Respond, grant_answer, ok

REPO = Path(__file__).resolve().parents[2]
Factory = Callable[[Respond], FakeDaemon]


@pytest.mark.parametrize("key", sorted(SHIM_NAMES))
def test_shim_is_three_lines_running_its_hook_module_isolated(key: str) -> None:
    path = REPO / SHIM_NAMES[key]
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[0] == "#!/bin/sh" and lines[1].startswith("# ")
    exec_, interpreter, flag, dash_m, module, *args = lines[2].split()
    assert (exec_, interpreter, flag, dash_m) == ("exec", '"${0%/*}/../venv/bin/python"', "-I", "-m")
    assert importlib.util.find_spec(module) is not None and module.startswith("slurm_gpuarb.hooks.")
    assert args == (["epilog"] if key == "epilog_slurmctld" else [])
    assert os.access(path, os.X_OK)


def test_render_finds_every_shim() -> None:
    paths = HookPaths.at(REPO, installed_only=True)
    assert None not in (paths.prolog, paths.epilog, paths.task_prolog, paths.prolog_slurmctld,
                        paths.epilog_slurmctld, paths.health_check)


def test_install_hooks_pins_the_absolute_interpreter(tmp_path: Path) -> None:
    fake_install = tmp_path / "opt" / "bin"
    fake_install.mkdir(parents=True)
    (fake_install / "python").symlink_to(sys.executable)
    script = (f'set -euo pipefail; D={tmp_path}/cluster; REPO={REPO}; GPUARB={fake_install}/gpuarb; '
              f'. {REPO}/docker-slurm/lib.sh; install_hooks auto')
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
    for rel in SHIM_NAMES.values():
        shim = tmp_path / "cluster" / "hooks" / rel
        assert shim.read_text().splitlines()[2].startswith(f'exec "{fake_install}/python" -I -m slurm_gpuarb.hooks.')
        assert shim.stat().st_mode & 0o022 == 0


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hooks root laid out like an install: prolog/, epilog/ and venv/ (with this checkout's package)."""
    root = tmp_path_factory.mktemp("install")
    for sub in ("prolog", "epilog"):
        shutil.copytree(REPO / sub, root / sub)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    purelib = sysconfig.get_path("purelib", vars={"base": str(root / "venv"), "platbase": str(root / "venv")})
    (Path(purelib) / "slurm_gpuarb").symlink_to(REPO / "slurm_gpuarb")
    return root


def _run(shim: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # env -i: what slurmd gives a Prolog (no PATH, no PYTHONPATH); cwd / so nothing leaks from here.
    return subprocess.run([str(shim)], env=env, cwd="/", capture_output=True, text=True, timeout=60)


def test_a_job_through_the_shims(install: Path, tmp_path: Path, daemon_factory: Factory, short_dir: str) -> None:
    ends: list[dict[str, object]] = []

    def respond(req: dict[str, object]) -> dict[str, object]:
        if req["op"] == "job_start":
            return grant_answer(exports={"GPUARB_VRAM_MB": "6144", "GPUARB_LEASE_ID": "L1"})
        ends.append(req)
        return ok("job_end", released=["L1"])

    d = daemon_factory(respond)
    cfg = tmp_path / "gpuarb.toml"
    cfg.write_text(f'version = 1\n[daemon]\nsocket = "{d.path}"\nstate_dir = "{tmp_path}/state"\n'
                   f'log_file = "{tmp_path}/gpuarb.log"\n')
    cfg.chmod(0o644)
    base = {"GPUARB_CONFIG": str(cfg), "SLURM_JOB_ID": "12", "SLURMD_NODENAME": "n1", "SLURM_JOB_GPUS": "0"}
    prolog_env = {**base, "SLURM_JOB_UID": str(os.getuid()), "SLURM_JOB_COMMENT": "gpuarb: vram=6GiB $(reboot)"}

    p = _run(install / "prolog" / "gpuarb-prolog", prolog_env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    assert d.requests[0]["comment"] == "gpuarb: vram=6GiB $(reboot)"

    t = _run(install / "prolog" / "gpuarb-task-prolog", {**base, "SLURM_SHARDS_ON_NODE": "12"})
    assert (t.returncode, t.stdout) == (0, "export GPUARB_VRAM_MB=6144\nexport GPUARB_LEASE_ID=L1\n")

    e = _run(install / "epilog" / "gpuarb-epilog", {**prolog_env, "SLURM_JOB_EXIT_CODE": "0"})
    assert e.returncode == 0 and ends and not (tmp_path / "state" / "jobs" / "n1" / "12.grant").exists()

    for shim, env in ((install / "prolog" / "gpuarb-prolog-slurmctld", prolog_env),
                      (install / "epilog" / "gpuarb-epilog-slurmctld", prolog_env)):
        assert _run(shim, env).returncode == 0
    log = (tmp_path / "gpuarb.log").read_text()
    assert "prolog_slurmctld: job starting job=12" in log and "epilog_slurmctld: job ended job=12" in log


def test_health_check_shim_with_only_the_node_name(install: Path, tmp_path: Path, daemon_factory: Factory) -> None:
    d = daemon_factory(lambda req: ok("health", node="n1", foreign=[]))
    cfg = tmp_path / "gpuarb.toml"
    cfg.write_text(f'version = 1\n[daemon]\nsocket = "{d.path}"\nstate_dir = "{tmp_path}/state"\n')
    cfg.chmod(0o644)
    h = _run(install / "prolog" / "gpuarb-health-check", {"GPUARB_CONFIG": str(cfg), "SLURMD_NODENAME": "n1"})
    assert h.returncode == 0, h.stderr
    assert d.requests == [{"v": 1, "op": "health", "node": "n1"}]
