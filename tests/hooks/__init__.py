"""Tests of the Slurm hooks (slurm_gpuarb/hooks), client.py and logsink.py."""
