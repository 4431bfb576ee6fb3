#!/usr/bin/env bash
# demo.sh: install, then run the main job on embedded defaults:
#   1. the RTX 3090 Ti workstation story (fake telemetry, a fresh SQLite ledger, no Slurm);
#   2. the project's Slurm test cluster on loopback (Debian's Slurm 22.05, fake GPUs, gpuarbd and the real
#      hooks; docker-slurm/native-up) and a short scripted scenario of jobs with lease specs, then
#      `gpuarb status` and the decisions. The cluster stays up to try things: stop it with
#      docker-slurm/native-down. DEMO_CLUSTER=0 skips part 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/gpuarb demo
if [ "${DEMO_CLUSTER:-1}" = 1 ]; then
  echo
  echo "== The test cluster: 4 slurmd on loopback (n1 8x H100 whole GPUs, n2 RTX 3090 Ti in 512MiB shards,"
  echo "   n3 H100 as 7x 1g.10gb MIG, n4 CPU), gpuarbd, the real Prolog/TaskProlog/Epilog"
  GPUARB_CLUSTER_CONTROLLER=1 bash docker-slurm/native-up
  bash docker-slurm/scenario
  echo
  echo "The cluster is still up: try sbatch --comment 'gpuarb: vram=6GiB prio=batch' --gres=gpu:1 --wrap 'env | grep GPUARB'"
  echo "then gpuarb explain JOBID. Stop it with: bash docker-slurm/native-down"
fi
