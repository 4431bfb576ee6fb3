"""The ``pyslurm`` adapter: jobs read through pyslurm's job API, nodes changed through ``scontrol``.

Registered with a deferred error on hosts without pyslurm: no pyslurm release builds against
Slurm 22.05 (the project's reference Slurm), so this module is **not exercised by the test
suite** beyond that error path. It is kept deliberately small: :meth:`PyslurmAdapter.jobs`
maps pyslurm's ``Jobs.load()`` (pyslurm ≥ 23.2: a dict of ``Job`` objects whose ``state``
uses Slurm's own ``job_state_string()``) onto :class:`~slurm_gpuarb.slurm.base.JobInfo`, and
everything else is inherited from the ``cli`` adapter (a drain is rare; ``scontrol`` is
what the health check's documentation shows).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from types import ModuleType

from ..errors import ConfigError
from .base import DEFAULT_BIN_DIR, DEFAULT_TIMEOUT, PYSLURM_ERROR, JobInfo, SlurmError
from .cli import CliSlurmAdapter, expand_nodelist, shard_count

__all__ = ["PyslurmAdapter"]


def _import_pyslurm() -> ModuleType:
    try:
        return importlib.import_module("pyslurm")
    except Exception as e:  # an ImportError, or pyslurm's own refusal of a mismatched libslurm
        raise ConfigError(PYSLURM_ERROR) from e


class PyslurmAdapter(CliSlurmAdapter):
    """:class:`~slurm_gpuarb.slurm.base.SlurmAdapter` whose :meth:`jobs` asks libslurm through pyslurm."""

    name = "pyslurm"

    def __init__(self, *, bin_dir: str = DEFAULT_BIN_DIR, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__(bin_dir=bin_dir, timeout=timeout)
        self._pyslurm = _import_pyslurm()

    def jobs(self, job_ids: Iterable[str | int] | None = None) -> list[JobInfo]:
        try:
            loaded = self._pyslurm.Jobs.load()
            jobs = [_job(job) for job in loaded.values()]
        except Exception as e:  # pyslurm raises its own RPCError; attribute drift surfaces here too
            raise SlurmError("pyslurm could not load Slurm's jobs (the cli adapter reads them through squeue)") from e
        if job_ids is None:
            return jobs
        wanted = {str(j) for j in job_ids}
        return [j for j in jobs if j.job_id in wanted]


def _job(job: object) -> JobInfo:
    def attr(name: str) -> object:
        return getattr(job, name, None)

    gres = attr("gres_per_node")
    # pyslurm gives {"shard": 12} or {"gpu:a100": 1}; rebuild Slurm's TRES spelling so that
    # JobInfo.tres_per_node means the same for every adapter.
    tres = ",".join(f"gres:{k}:{v}" for k, v in gres.items()) if isinstance(gres, dict) else ""
    uid = attr("user_id")
    return JobInfo(
        job_id=str(attr("id")),
        state=str(attr("state") or ""),
        restart_count=int(str(attr("requeue_count") or 0)),
        nodes=expand_nodelist(str(attr("allocated_nodes") or "")),
        comment=str(attr("comment") or ""),
        partition=str(attr("partition") or ""),
        qos=str(attr("qos") or ""),
        user=str(attr("user_name") or ""),
        uid=uid if isinstance(uid, int) else None,
        tres_per_node=tres,
        gres_shards=shard_count(tres),
    )
