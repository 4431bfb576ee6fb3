"""A fake ``nvidia-cuda-mps-control`` for the MPS tests (no real MPS here).

A POSIX shell script in a world-readable directory under ``/tmp`` (so that it also runs as another
user when the tests are root), recording every call as one line in ``calls``::

    uid=0 gid=0 args=-d pipe=/…/pipe log=/…/log dev=GPU-… path=/usr/sbin:… stdin=

``-d`` starts the "daemon": the script again (``--serve``), detached, which writes its pid to
``$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid`` and runs until that file is gone (at most
60 s). Without arguments it reads a command from stdin; ``quit`` kills the daemon and removes its
pid file. A ``mode`` file steers it: ``fail`` (``-d`` exits 3 with a message), ``nopid`` (``-d``
exits 0 and starts nothing), ``stubborn`` (``quit`` is ignored).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from slurm_gpuarb import mps

SCRIPT = r"""#!/bin/sh
here=$(dirname "$0")
mode=$(cat "$here/mode" 2>/dev/null)
if [ "$1" = "--serve" ]; then
    echo $$ > "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid"
    echo $$ >> "$here/../rec/pids"
    i=0
    while [ -e "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid" ] && [ $i -lt 1200 ]; do
        sleep 0.05; i=$((i + 1))
    done
    exit 0
fi
input=""
if [ "$1" != "-d" ]; then read -r input; fi
echo "uid=$(id -u) gid=$(id -g) args=$* pipe=$CUDA_MPS_PIPE_DIRECTORY log=$CUDA_MPS_LOG_DIRECTORY" \
     "dev=$CUDA_VISIBLE_DEVICES path=$PATH stdin=$input" >> "$here/../rec/calls"
if [ "$1" = "-d" ]; then
    if [ "$mode" = "fail" ]; then echo "boom: no CUDA-capable device" >&2; exit 3; fi
    if [ "$mode" = "nopid" ]; then exit 0; fi
    "$0" --serve </dev/null >/dev/null 2>&1 &
    exit 0
fi
if [ "$input" = "quit" ] && [ "$mode" != "stubborn" ]; then
    pid=$(cat "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid" 2>/dev/null)
    rm -f "$CUDA_MPS_PIPE_DIRECTORY/nvidia-cuda-mps-control.pid"
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
fi
exit 0
"""


class FakeControl:
    """The fake binary, its state dir, and what it recorded. :meth:`close` kills every daemon it started."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="gpuarb-mps-", dir="/tmp"))
        self.root.chmod(0o755)
        self.bin = self.root / "bin"
        self.bin.mkdir(mode=0o755)
        self.bin.chmod(0o755)
        self.rec = self.root / "rec"
        self.rec.mkdir()
        self.rec.chmod(0o1777)  # the daemon may run as another user
        for name in ("calls", "pids"):
            (self.rec / name).touch()
            (self.rec / name).chmod(0o666)
        self.state = self.root / "state"
        self.path = self.bin / mps.CONTROL
        self.path.write_text(SCRIPT)
        self.path.chmod(0o755)

    def mode(self, mode: str) -> None:
        (self.bin / "mode").write_text(mode)

    def calls(self) -> list[dict[str, str]]:
        path = self.rec / "calls"
        out = []
        for line in path.read_text().splitlines() if path.exists() else []:
            out.append(dict(part.split("=", 1) for part in line.split(" ") if "=" in part))
        return out

    def pids(self) -> list[int]:
        path = self.rec / "pids"
        return [int(p) for p in path.read_text().split()] if path.exists() else []

    def close(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def installed(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeControl]:
    """A :class:`FakeControl` that :func:`slurm_gpuarb.mps.find_control` finds (and nothing else), closed
    afterwards: the Prolog's and the benchmark's MPS start path run against it."""
    f = FakeControl()
    monkeypatch.setattr(mps, "SEARCH_DIRS", (str(f.bin),))
    try:
        yield f
    finally:
        f.close()
