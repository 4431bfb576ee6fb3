"""``gpuarb render --check``: does what is installed still match what the inventory renders?

The dangerous drift is a shard count. Slurm cannot change a file-bound GRES count at run time:
when a standing reservation grows (or the margin, or the driver reserve), the installed
``gres.conf`` keeps offering the old number of shards, and Slurm hands out VRAM that is no
longer there. So besides a unified diff of every file that differs, :func:`check_rendered`
names each GPU whose installed shard count is now *too high* (and, less urgently, too low),
with the arithmetic behind the new count. The CLI exits 3 when :attr:`Drift.clean` is false.

The installed directory is compared file by file with the render (``gres.conf``,
``slurm.conf.part``, …: the layout ``render --out`` writes). Files it holds that the render
does not make are ignored; a rendered file it lacks is drift.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .config import Config
from .errors import RenderError
from .render import OUT_GRES, RenderOptions, build

__all__ = ["Drift", "FileDrift", "ShardDrift", "check_rendered", "shard_counts"]

_SHARD_LINE_RE: Final = re.compile(r"NodeName=(\S+)\s+Name=shard\s+(?:Type=\S+\s+)?Count=(\d+)\s+File=(\S+)")


@dataclass(frozen=True)
class FileDrift:
    """One rendered file that the installed directory lacks or holds differently."""

    path: str  # relative to the directory
    missing: bool
    diff: str  # unified diff, installed → rendered


@dataclass(frozen=True)
class ShardDrift:
    """A GPU whose installed shard count differs from what the inventory gives it now."""

    node: str
    gpu: int | None  # NVML index, when the render knows it
    file: str
    installed: int
    rendered: int
    explain: str  # how the rendered count follows from the inventory

    @property
    def too_high(self) -> bool:
        return self.installed > self.rendered

    def __str__(self) -> str:
        gpu = f"gpu {self.gpu} ({self.file})" if self.gpu is not None else self.file
        if self.too_high:
            return (f"node {self.node} {gpu}: shard count too high: gres.conf offers {self.installed} shards, the "
                    f"inventory now allows {self.rendered} ({self.explain}); Slurm can hand out memory that is not "
                    f"there: install the new render and restart slurmd on {self.node}")
        return (f"node {self.node} {gpu}: shard count too low: gres.conf offers {self.installed} shards, the "
                f"inventory now allows {self.rendered} ({self.explain}); install the new render to use them")


@dataclass(frozen=True)
class Drift:
    """The result of a check; ``clean`` when every rendered file is installed unchanged."""

    directory: str
    files: tuple[FileDrift, ...]
    shards: tuple[ShardDrift, ...]

    @property
    def clean(self) -> bool:
        return not self.files

    def report(self) -> str:
        """The shard findings first (too high before too low), then each file's diff."""
        if self.clean:
            return f"{self.directory}: up to date"
        lines = [str(s) for s in sorted(self.shards, key=lambda s: not s.too_high)]
        for f in self.files:
            lines.append(f"{self.directory}/{f.path}: {'missing' if f.missing else 'differs'}")
            if f.diff:
                lines.append(f.diff.rstrip("\n"))
        return "\n".join(lines)


def shard_counts(gres_conf: str) -> dict[tuple[str, str], int]:
    """``{(node, device file): count}`` of a ``gres.conf``'s shard lines (comments ignored)."""
    out: dict[tuple[str, str], int] = {}
    for line in gres_conf.splitlines():
        m = _SHARD_LINE_RE.match(line.split("#", 1)[0].strip())
        if m is not None:
            out[(m.group(1), m.group(3))] = int(m.group(2))
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RenderError(f"cannot read the installed {path}; check the directory given to --check") from e


def check_rendered(cfg: Config, installed_dir: str | os.PathLike[str], options: RenderOptions | None = None) -> Drift:
    """Render ``cfg`` in memory and compare it with the files under ``installed_dir``.

    Use the options the installed files were rendered with (the same ``--dev-dir``, hooks,
    discovery, …), or every line they touch shows as drift."""
    base = Path(installed_dir)
    if not base.is_dir():
        raise RenderError(f"{base} is not a directory; --check compares with the directory render --out wrote")
    rendered = build(cfg, options)
    files: list[FileDrift] = []
    installed_gres: str | None = None
    for rel, text in rendered.files.items():
        old = _read(base / rel)
        if rel == OUT_GRES:
            installed_gres = old
        if old == text:
            continue
        diff = "".join(difflib.unified_diff((old or "").splitlines(keepends=True), text.splitlines(keepends=True),
                                            fromfile=f"installed/{rel}", tofile=f"rendered/{rel}"))
        files.append(FileDrift(rel, old is None, diff))
    shards: list[ShardDrift] = []
    if installed_gres is not None:
        before = shard_counts(installed_gres)
        for node in rendered.plan.nodes:
            for d in node.devices:
                was = before.get((node.name, d.file))
                if d.name == "shard" and d.count is not None and was is not None and was != d.count:
                    explain = d.note.split(": ", 1)[-1]
                    shards.append(ShardDrift(node.name, d.gpu_index, d.file, was, d.count, explain))
    return Drift(str(base), tuple(files), tuple(shards))
