"""Tests of slurm_gpuarb.telemetry (a package so the pynvml double can be imported relatively)."""
