"""slurm-gpuarb: GPU memory (VRAM) and MIG leases for Slurm.

The library works without the CLI: :mod:`slurm_gpuarb.spec` parses lease specs,
:mod:`slurm_gpuarb.arbiter` decides, :mod:`slurm_gpuarb.ledger` records, and
:mod:`slurm_gpuarb.service` wires them to configuration and telemetry.
"""

__version__ = "0.1.0"
