"""The controller agent (``gpuarbd --role controller``): the cluster-wide half of the run plane.

It runs beside slurmctld and acts where only the controller can: it shrinks pending jobs to their
``min=`` (:mod:`.shrink`), keeps reservation holder jobs (:mod:`.holders`), and reconciles the
ledger with Slurm across the cluster, recording preempted runs as revoked (:mod:`.reconcile`).
:mod:`.agent` is the loop. Every action is a ledger decision row in the ``agent`` plane.

    from slurm_gpuarb.controller import Controller
    Controller(cfg).serve()        # what gpuarbd --role controller --foreground runs
"""

from .agent import Controller, Tick, default_probe
from .common import ProbeFn, ProbeStatus, settings_of

__all__ = ["Controller", "ProbeFn", "ProbeStatus", "Tick", "default_probe", "settings_of"]
