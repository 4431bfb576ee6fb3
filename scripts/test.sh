#!/usr/bin/env bash
# test.sh: install everything the test suite needs, start a real PostgreSQL on loopback, run
# ruff, mypy --strict and pytest (unit + postgres tiers; the gpu tier runs only where a GPU exists),
# then stop PostgreSQL. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
bash scripts/install.sh --dev
# Lua 5.1: the interpreter Slurm 22.05's job_submit/cli_filter plugins embed; the tests run the rendered
# job_submit.lua under it against the Python parser.
if ! command -v lua5.1 >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends lua5.1 >/dev/null
fi

# shellcheck disable=SC1090
eval "$(bash scripts/pg-up.sh)"
trap 'bash scripts/pg-down.sh || true' EXIT
: "${GPUARB_TEST_PG_URL:?pg-up.sh did not print GPUARB_TEST_PG_URL}"
export GPUARB_TEST_PG_URL

echo "== ruff"; .venv/bin/ruff check .
echo "== mypy --strict slurm_gpuarb"; .venv/bin/mypy --strict slurm_gpuarb
echo "== pytest"
set +e
.venv/bin/python -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exit 5 = no tests collected: a run that tested nothing must not pass.
if [ $rc -eq 5 ]; then echo "test.sh: pytest collected no tests" >&2; exit 1; fi
echo "test.sh: pytest exit $rc after $(( $(date +%s) - T0 ))s"
exit $rc
