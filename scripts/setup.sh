#!/usr/bin/env bash
# Create .venv and install medvq for the CPU (torch pinned to the 2.13.0 CPU wheel by constraints-cpu.txt).
#   bash scripts/setup.sh          # the package and its CLI
#   bash scripts/setup.sh --test   # plus pytest, the OCT vendor-format readers (extra oct-vendors), onnxruntime (extra export), Playwright,
#                                  # the Colin27 MRI volume of Debian's mricron-data for the MRI tests and Debian's chromium for the viewer tests
# Set PYTHON to choose the interpreter (default: python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test,oct-vendors,export]"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints-cpu.txt -e ".${extras}"
.venv/bin/python -c "import medvq, torch; print(f'medvq {medvq.__version__} with torch {torch.__version__} ready in .venv')"
# Debian packages the tests need, installed where apt-get can run (as root, or with password-less sudo).
apt_install() {
  local sudo=""
  [[ $(id -u) -ne 0 ]] && command -v sudo >/dev/null && sudo -n true 2>/dev/null && sudo="sudo -n"
  command -v apt-get >/dev/null && { [[ $(id -u) -eq 0 ]] || [[ -n "$sudo" ]]; } || return 0
  $sudo apt-get install -y -q "$@" >/dev/null || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "$@" >/dev/null; } || true
}
# Real MRI for the tests: Colin27 T1 (181x217x181, 1 mm) from Debian's mricron-data.
COLIN27=/usr/share/mricron/templates/ch2.nii.gz
if [[ -n "$extras" && ! -f "$COLIN27" ]]; then
  apt_install mricron-data
  [[ -f "$COLIN27" ]] && echo "Colin27 MRI installed: $COLIN27" || echo "warning: $COLIN27 is missing (mricron-data could not be installed here); the MRI tests need it (or MEDVQ_COLIN27=<path to ch2.nii.gz>)" >&2
fi
# The viewer tests drive Debian's chromium through Playwright (Playwright's own browser download is not needed).
if [[ -n "$extras" ]] && ! command -v chromium >/dev/null; then
  apt_install chromium
  command -v chromium >/dev/null && echo "chromium installed: $(command -v chromium)" || echo "warning: chromium is missing (apt-get install chromium); the viewer tests need it (or MEDVQ_CHROMIUM=<path>)" >&2
fi
