"""``python -m slurm_gpuarb`` = ``gpuarb``."""

from .cli import main

main()
