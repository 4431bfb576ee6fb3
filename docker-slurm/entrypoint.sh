#!/bin/bash
# entrypoint.sh ROLE [ARGS]: one container of docker-compose.yml. The roles share the `cluster`
# volume ($GPUARB_CLUSTER_DIR) and lib.sh with native-up: same inventory, render step, base config.
#
#   config CTLD_HOST NODE_HOST   render every config into the volume, make the fake GPUs, migrate
#                                the ledger, make the munge key; then exit
#   slurmctld                    munged + slurmctld in the foreground
#   slurmd NODE...               munged + one slurmd per node (several share this container)
#   login                        munged, then idle: a place to run sbatch, squeue, gpuarb
#   check-nodes NODE...          healthcheck: every slurmd of this container runs
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
D=${GPUARB_CLUSTER_DIR:-/var/lib/gpuarb-cluster}
INVENTORY=${GPUARB_CLUSTER_INVENTORY:-$HERE/inventory.toml}
GPUARB=/opt/gpuarb/bin/gpuarb
LOG_TAG=${1:-entrypoint}
# shellcheck source=lib.sh
. "$HERE/lib.sh"

# The configs live in the volume; each container's /etc/slurm points there, as on a native host.
use_cluster_configs() {
  local f
  install -d -m 0755 /etc/slurm
  for f in slurm.conf gres.conf cgroup.conf gpuarb.toml job_submit.lua cli_filter.lua; do
    if [ -e "$D/etc/$f" ]; then ln -sfn "$D/etc/$f" "/etc/slurm/$f"; fi
  done
  install -o munge -g munge -m 0400 "$D/etc/munge.key" /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  waitfor 50 sh -c 'munge -n | unmunge' || die "munged did not start"
}

role=${1:-login}; shift || true
case $role in
  config)
    ctld_host=${1:?config needs the controller host}; node_host=${2:?config needs the nodes host}
    make_dirs
    if [ ! -s "$D/etc/munge.key" ]; then
      dd if=/dev/urandom of="$D/etc/munge.key" bs=1 count=1024 2>/dev/null; chmod 400 "$D/etc/munge.key"
    fi
    use_hooks=$(install_hooks "${GPUARB_CLUSTER_HOOKS:-auto}")
    cgroup=$(cgroup_mode "${CGROUP:-0}")
    render_configs "$GPUARB" "$ctld_host" "$ctld_host" "$node_host" "$node_host" 0 "$cgroup" "$use_hooks"
    make_devices
    if "$GPUARB" db upgrade --help >/dev/null 2>&1; then GPUARB_CONFIG=$D/etc/gpuarb.toml "$GPUARB" db upgrade; fi
    ts "configs rendered into $D/etc (hooks=$use_hooks cgroup=$cgroup)"
    ;;
  slurmctld)
    use_cluster_configs
    exec /usr/sbin/slurmctld -D
    ;;
  slurmd)
    [ $# -gt 0 ] || die "slurmd needs node names"
    use_cluster_configs
    for n in "$@"; do mkdir -p "$D/spool/d/$n"; /usr/sbin/slurmd -N "$n"; done
    # shellcheck disable=SC2317  # called from the trap
    stop_all() { for n in "$@"; do [ -s "$D/run/slurmd-$n.pid" ] && kill "$(cat "$D/run/slurmd-$n.pid")" 2>/dev/null; done; exit 0; }
    trap 'stop_all "$@"' TERM INT
    # The container lives as long as every slurmd does.
    while "$0" check-nodes "$@"; do sleep 5 & wait $!; done
    die "a slurmd exited (logs: $D/log/slurmd-*.log)"
    ;;
  login)
    use_cluster_configs
    trap 'exit 0' TERM INT
    while :; do sleep 3600 & wait $!; done
    ;;
  check-nodes)
    for n in "$@"; do alive "$D/run/slurmd-$n.pid" slurmd || exit 1; done
    ;;
  *) die "unknown role '$role' (config, slurmctld, slurmd, login, check-nodes)" ;;
esac
