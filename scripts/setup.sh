#!/usr/bin/env bash
# Create .venv and install medvq for the CPU (torch pinned to the 2.13.0 CPU wheel by constraints-cpu.txt).
#   bash scripts/setup.sh          # the package and its CLI
#   bash scripts/setup.sh --test   # plus pytest
# Set PYTHON to choose the interpreter (default: python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints-cpu.txt -e ".${extras}"
.venv/bin/python -c "import medvq, torch; print(f'medvq {medvq.__version__} with torch {torch.__version__} ready in .venv')"
