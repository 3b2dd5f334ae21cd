#!/usr/bin/env bash
# Set up .venv and run the whole test suite, slow statistical checks included (as CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -m "" "$@"
