#!/usr/bin/env bash
# Create .venv and install seq2seq into it (editable), with PyTorch's CPU build.
# Idempotent: a second run only checks, offline too (until pyproject.toml changes).
#   bash scripts/setup.sh         # what training, translating and serving need
#   bash scripts/setup.sh test    # also the test extras and, as root on Debian, chromium for the browser test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
stamp=.venv/.seq2seq-installed   # pyproject.toml's hash and the extras of the last complete install
project="$(cksum < pyproject.toml | tr ' ' '-')"
ready() { .venv/bin/python -c "import torch, seq2seq; print(f'seq2seq ready: torch {torch.__version__}', flush=True)"; }
installed=""   # 1 where the last complete install is this one and still imports; `ready` said $status
if [[ -f "$stamp" ]]; then
    read -r stamp_project stamp_extras < "$stamp" || true
    if [[ "${stamp_project:-}" == "$project" && ( -z "$extras" || "$extras" == "${stamp_extras:-}" ) ]] \
        && status="$(ready 2>/dev/null)"; then installed=1; fi
fi
install() {
    rm -f "$stamp"
    python3 -m venv .venv
    . .venv/bin/activate
    python -m pip install --quiet --upgrade pip
    # pyproject asks for torch>=2.10; installing PyTorch's CPU build first keeps pip from pulling
    # PyPI's multi-GB CUDA build. Where PyTorch's CPU index answers, it is offered beside PyPI
    # (its "+cpu" versions sort above PyPI's); a local CPU wheel (pip's find-links) also serves.
    # Want CUDA? Install torch into .venv yourself first: an importable torch is kept.
    if ! python -c "import torch" 2>/dev/null; then
        cpu_index=https://download.pytorch.org/whl/cpu
        offer_cpu=()
        if python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" \
            "$cpu_index" 2>/dev/null; then offer_cpu=(--extra-index-url "$cpu_index")
        else echo "PyTorch's CPU index ($cpu_index) did not answer: torch from pip's other sources" >&2; fi
        python -m pip install --quiet "torch==2.13.0" ${offer_cpu[@]+"${offer_cpu[@]}"} 2>/dev/null \
            || python -m pip install --quiet "torch>=2.10" ${offer_cpu[@]+"${offer_cpu[@]}"}
    fi
    if [ -n "${extras}" ]; then
        python -m pip install --quiet -e ".[${extras}]"
    else
        python -m pip install --quiet -e .
    fi
    echo "$project $extras" > "$stamp"
}
[[ -n "$installed" ]] || install
. .venv/bin/activate
# tests/test_browser.py drives Debian's chromium through Playwright (Playwright's own
# browser download is never used). Install it where we can; elsewhere say how, and in
# CI stop here rather than let the browser test fail later for want of a package.
if [[ ",${extras}," == *",test,"* ]] && [ ! -x /usr/bin/chromium ]; then
    if command -v apt-get >/dev/null && [ "$(id -u)" -eq 0 ]; then
        echo "installing Debian's chromium for the browser test (apt-get install chromium)" >&2
        apt_log="$(mktemp)"
        export DEBIAN_FRONTEND=noninteractive
        # try with the package lists as they are; a fresh machine has none: update, retry
        apt-get install -y -qq chromium >"$apt_log" 2>&1 \
            || { apt-get update -qq >>"$apt_log" 2>&1 && apt-get install -y -qq chromium >>"$apt_log" 2>&1; } \
            || tail -n 5 "$apt_log" >&2
        rm -f "$apt_log"
    fi
    if [ ! -x /usr/bin/chromium ]; then
        message="/usr/bin/chromium is missing, so tests/test_browser.py will fail; install Debian's chromium as root: apt-get install -y chromium"
        if [ -n "${CI:-}" ]; then
            echo "error: ${message}" >&2
            exit 1
        fi
        echo "warning: ${message}" >&2
    fi
fi
if [[ -n "$installed" ]]; then echo "$status"; else ready; fi
