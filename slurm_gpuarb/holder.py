"""The holder-job comment prefix, shared by the controller agent (which writes it) and the run plane
(the daemon's job_start, which reads it). Stdlib only and tiny: the Prolog path imports it for every job.

A holder job holds a ``mode = "holder"`` reservation's memory in Slurm while its service is up
(DESIGN.md, "Standing reservations under Slurm"). The controller submits it with the comment
``gpuarb-holder=<reservation> gpuarb/1: vram=…MiB prio=llm shards=N``; job_submit.lua keeps the
prefix text. The prefix is only a claim: anyone can write it in a comment, so the daemon honours it
only for a privileged job (see :mod:`slurm_gpuarb.daemon.handlers`).
"""

from __future__ import annotations

from typing import Final

__all__ = ["HOLDER_PREFIX", "holder_of"]

#: the comment text before the lease marker that names the reservation a holder job holds
HOLDER_PREFIX: Final = "gpuarb-holder="


def holder_of(comment: str | None) -> str | None:
    """The reservation a job comment says it holds (``gpuarb-holder=ollama gpuarb/1: …`` → ``ollama``), else None.
    Cheap enough for the run plane: a string test, no parsing."""
    if not comment or not comment.startswith(HOLDER_PREFIX):
        return None
    name = comment[len(HOLDER_PREFIX):].split(None, 1)[0] if len(comment) > len(HOLDER_PREFIX) else ""
    return name or None
