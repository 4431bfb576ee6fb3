"""Running the real ``gpuarb`` entry point as its own process, for tests."""

from __future__ import annotations

import subprocess
import sys


def gpuarb_cmd() -> list[str]:
    """How tests start the CLI as its own process (the real entry point, not CliRunner)."""
    return [sys.executable, "-m", "slurm_gpuarb"]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*gpuarb_cmd(), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
