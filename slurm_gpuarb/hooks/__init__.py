"""Slurm hooks, one module per Slurm context (pyxis style), each run by a 3-line shim in ``prolog/``
or ``epilog/`` as ``<install venv>/bin/python -I -m slurm_gpuarb.hooks.<module>``:

==========================  =========================  ==========================================
Slurm context               module                     does
==========================  =========================  ==========================================
Prolog                      :mod:`.prolog`             records the lease (``job_start``), writes the grant
TaskProlog                  :mod:`.task_prolog`        reads the grant, prints ``export`` lines
Epilog                      :mod:`.epilog`             releases the lease (``job_end``), idempotently
PrologSlurmctld / Epilog…   :mod:`.prolog_slurmctld`   logs the controller-side record
HealthCheckProgram          :mod:`.health`             drains a node holding a foreign VRAM tenant
==========================  =========================  ==========================================

Shared: :mod:`.common` (settings, deadline, environment, daemon call with in-process fallback),
:mod:`.grants` (the grant file), :mod:`.exitcodes` (outcome → exit code). The hot-path modules
import only the standard library and ``slurm_gpuarb.{errors,units,logsink,client,wire}``; ``protocol``
and ``model`` only when the daemon is down (the in-process fallback). This package's ``__init__``
imports nothing, so importing one hook does not import the others.
"""
