#!/usr/bin/env bash
# Start a throwaway PostgreSQL for gpuarb's `postgres` test tier, and print the URL to use.
#
#   eval "$(scripts/pg-up.sh)"          # sets GPUARB_TEST_PG_URL
#   .venv/bin/pytest tests/ledger -m postgres
#   scripts/pg-down.sh
#
# Installs Debian's `postgresql` if missing (without starting the distribution's own cluster),
# initialises a cluster in $GPUARB_PG_DIR (default /tmp/gpuarb-pg) as the `postgres` user, and
# starts it on 127.0.0.1:$GPUARB_PG_PORT (default 55432) with its Unix socket in that directory.
# Role and database `gpuarb` (CREATEDB, CREATEROLE: the tests make schemas and password roles)
# log in without a password over loopback; every other role needs a SCRAM password, so the
# tests can check password files. fsync is off: this cluster holds nothing worth keeping.
# Idempotent: a second run finds the server up and only prints the URL. Only the `export` line
# goes to stdout; progress goes to stderr.
set -euo pipefail

PGDIR=${GPUARB_PG_DIR:-/tmp/gpuarb-pg}
PGPORT=${GPUARB_PG_PORT:-55432}
DATA=$PGDIR/data
PIDFILE=$PGDIR/gpuarb-pg.pid
LOG=$PGDIR/postgres.log
URL="postgresql+psycopg://gpuarb@127.0.0.1:$PGPORT/gpuarb"

say() { echo "pg-up: $*" >&2; }
die() { say "error: $*"; exit 1; }

find_bin() {
    if [[ -n ${GPUARB_PG_BIN:-} ]]; then echo "$GPUARB_PG_BIN"; return; fi
    if [[ -x /usr/lib/postgresql/15/bin/postgres ]]; then echo /usr/lib/postgresql/15/bin; return; fi
    local dirs=() d
    for d in /usr/lib/postgresql/*/bin; do [[ -x $d/postgres ]] && dirs+=("$d"); done
    if [[ ${#dirs[@]} -gt 0 ]]; then printf '%s\n' "${dirs[@]}" | sort -V | tail -n 1; fi
}

install_postgresql() {
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed and installing it needs root: apt-get install postgresql"
    say "installing Debian's postgresql (its default cluster is not started)"
    # policy-rc.d exit 101 = "action forbidden": the package's postinst does not start a server.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2 || {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >&2
    }
    if [[ $created_policy -eq 1 ]]; then rm -f "$policy"; fi
}

# Run a command as the cluster's owner: `postgres` when we are root (initdb refuses root).
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

running_pid() {
    # The PID we recorded, if that process is still this cluster's postmaster.
    [[ -f $PIDFILE && -f $DATA/postmaster.pid ]] || return 1
    local pid
    pid=$(head -n 1 "$PIDFILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(head -n 1 "$DATA/postmaster.pid") == "$pid" ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

BIN=$(find_bin)
if [[ -z $BIN || ! -x $BIN/postgres ]]; then
    install_postgresql
    BIN=$(find_bin)
    [[ -n $BIN && -x $BIN/postgres ]] || die "postgres binaries not found under /usr/lib/postgresql/*/bin"
fi

if pid=$(running_pid); then
    say "already running (pid $pid, $PGDIR)"
else
    mkdir -p "$PGDIR"
    chmod 700 "$PGDIR"
    if [[ $(id -u) -eq 0 ]]; then chown postgres:postgres "$PGDIR"; fi
    if [[ ! -f $DATA/PG_VERSION ]]; then
        say "initdb $DATA"
        as_owner "$BIN/initdb" -D "$DATA" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$PGDIR/initdb.log" 2>&1 \
            || { cat "$PGDIR/initdb.log" >&2; die "initdb failed"; }
        as_owner tee "$DATA/pg_hba.conf" >/dev/null <<'HBA'
# gpuarb test cluster: superuser over the socket, gpuarb over loopback without a password,
# every other role with a SCRAM password (so password files can be tested).
local   all   all                      trust
host    all   gpuarb     127.0.0.1/32  trust
host    all   all        127.0.0.1/32  scram-sha-256
HBA
    fi
    say "starting postgres on 127.0.0.1:$PGPORT (log $LOG)"
    as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 -o \
        "-c listen_addresses=127.0.0.1 -p $PGPORT -c unix_socket_directories=$PGDIR -c fsync=off \
         -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" start >&2 \
        || { tail -n 20 "$LOG" >&2 || true; die "postgres did not start"; }
    head -n 1 "$DATA/postmaster.pid" > "$PIDFILE"
fi

for _ in $(seq 1 60); do
    if as_owner "$BIN/pg_isready" -q -h "$PGDIR" -p "$PGPORT"; then break; fi
    sleep 0.5
done
as_owner "$BIN/pg_isready" -q -h "$PGDIR" -p "$PGPORT" || die "postgres is not accepting connections (log $LOG)"

psql_su() { as_owner psql -X -q -v ON_ERROR_STOP=1 -h "$PGDIR" -p "$PGPORT" -U postgres -d postgres "$@"; }
if [[ -z $(psql_su -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'gpuarb'") ]]; then
    say "creating role gpuarb"
    psql_su -c "CREATE ROLE gpuarb LOGIN CREATEDB CREATEROLE"
fi
if [[ -z $(psql_su -tAc "SELECT 1 FROM pg_database WHERE datname = 'gpuarb'") ]]; then
    say "creating database gpuarb"
    psql_su -c "CREATE DATABASE gpuarb OWNER gpuarb"
fi

echo "export GPUARB_TEST_PG_URL=$URL"
