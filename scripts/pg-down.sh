#!/usr/bin/env bash
# Stop the test PostgreSQL that scripts/pg-up.sh started: only the server whose PID it recorded,
# with `pg_ctl stop -m fast`. The cluster's files stay in $GPUARB_PG_DIR for the next pg-up.
set -euo pipefail

PGDIR=${GPUARB_PG_DIR:-/tmp/gpuarb-pg}
DATA=$PGDIR/data
PIDFILE=$PGDIR/gpuarb-pg.pid

say() { echo "pg-down: $*" >&2; }

if [[ ! -f $PIDFILE ]]; then
    say "not running (no $PIDFILE)"
    exit 0
fi
pid=$(head -n 1 "$PIDFILE")
if ! [[ $pid =~ ^[0-9]+$ ]] || ! kill -0 "$pid" 2>/dev/null; then
    say "not running (recorded pid ${pid:-?} is gone)"
    rm -f "$PIDFILE"
    exit 0
fi
if [[ ! -f $DATA/postmaster.pid || $(head -n 1 "$DATA/postmaster.pid") != "$pid" ]]; then
    echo "pg-down: error: pid $pid is not the postmaster of $DATA; not touching it" >&2
    exit 1
fi

BIN=${GPUARB_PG_BIN:-$(dirname "$(readlink -f "/proc/$pid/exe")")}
say "stopping postgres (pid $pid)"
if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
else
    "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
fi
rm -f "$PIDFILE"
