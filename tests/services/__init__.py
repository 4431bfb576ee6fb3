"""Tests of slurm_gpuarb.services (probes, reservation sizing, routing) and `gpuarb services` / `gpuarb route`."""
