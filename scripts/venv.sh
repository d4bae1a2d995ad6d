#!/bin/sh
# Make ./.venv and install vaccelray into it (editable) with the given extras:
#   sh scripts/venv.sh onnx          # the classifier
#   sh scripts/venv.sh onnx,test     # and what the test suite needs
# Debian's python3 comes without venv: as root, python3-venv is installed.
set -eu
cd "$(dirname "$0")/.."
extras=${1:-}
if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv >/dev/null 2>&1; then
        rm -rf .venv
        if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
            echo "venv: python3 cannot make a virtual environment; install python3-venv (as root: apt-get install python3-venv) and run this again" >&2
            exit 1
        fi
        echo "venv: installing python3-venv" >&2
        sh scripts/apt-get.sh update -qq
        sh scripts/apt-get.sh install -y -qq --no-install-recommends python3-venv
        python3 -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
