#!/usr/bin/env bash
# Install (scripts/setup.sh) and run the whole offline test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. .venv/bin/activate
python -m pytest -q "$@"
