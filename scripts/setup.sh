#!/usr/bin/env bash
# Create .venv and install seq2seq into it (editable), with PyTorch's CPU build.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [extras, e.g. test]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# pyproject asks for torch>=2.10; installing the CPU wheel first keeps pip from pulling a
# multi-GB CUDA build. A machine with a local torch 2.13.0 CPU wheel gets it from there.
if ! python -c "import torch" 2>/dev/null; then
    python -m pip install --quiet "torch==2.13.0" 2>/dev/null \
        || python -m pip install --quiet "torch>=2.10" --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install --quiet -e ".[${extras}]"
python -c "import torch, seq2seq; print(f'seq2seq ready: torch {torch.__version__}', flush=True)"
