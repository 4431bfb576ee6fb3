#!/usr/bin/env bash
# demo.sh: install, then run the main job on embedded defaults (fake GPUs, a fresh SQLite ledger).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/gpuarb demo
