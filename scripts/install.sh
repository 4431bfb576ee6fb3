#!/usr/bin/env bash
# install.sh [--dev]: the Debian packages slurm-gpuarb needs and a virtual environment in .venv.
# Idempotent; run as root on Debian 12. With --dev: the test tools too (pytest, ruff, mypy, psycopg).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="postgres"
[ "${1:-}" = "--dev" ] && extras="dev"

need=()
[ -x /usr/bin/python3 ] || need+=(python3)
/usr/bin/python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
command -v git >/dev/null || need+=(git)
if [ ${#need[@]} -gt 0 ]; then
  echo "install: apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Debian's interpreter, not whatever `python3` is on PATH: hooks run the install's own interpreter as root.
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[$extras]"
echo "install: ok ($(.venv/bin/gpuarb --version))"
