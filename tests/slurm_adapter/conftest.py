"""Fixtures of the Slurm adapter tests: the recorded/constructed outputs under tests/data/slurm/."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "slurm"

SQUEUE = ("/usr/bin/squeue", "--all", "--states=all", "--json")
SCONTROL = "/usr/bin/scontrol"

#: every squeue fixture that parses → (format, release) its meta declares
SQUEUE_FIXTURES = {
    "squeue-22.05-mixed.json": ("v0.0.38", "22.05.8"),
    "squeue-22.05-requeued.json": ("v0.0.38", "22.05.8"),
    "squeue-22.05-completing.json": ("v0.0.38", "22.05.8"),
    "squeue-23.02-v0.0.39.json": ("v0.0.39", "23.02.2"),
    "squeue-23.11-v0.0.40.json": ("v0.0.40", "23.11.1"),
    "squeue-24.11-v0.0.42.json": ("v0.0.42", "24.11.5"),
}

#: the same six jobs in the 22.05 recording and in each constructed newer shape
SAME_JOBS = ("squeue-22.05-mixed.json", "squeue-23.02-v0.0.39.json", "squeue-23.11-v0.0.40.json",
             "squeue-24.11-v0.0.42.json")
