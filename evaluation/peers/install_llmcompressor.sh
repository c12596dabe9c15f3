#!/usr/bin/env bash
# Benchmark-only peer: llm-compressor (GPTQModifier) in its own venv, pinned to the CPU torch on disk
# so that pip never pulls a multi-GB CUDA torch. Usage: bash evaluation/peers/install_llmcompressor.sh [VENV]
set -euo pipefail
VENV=${1:-/tmp/peer-venv}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_WHEEL"
# The constraint keeps the local CPU torch: a resolver that wants another torch fails instead of downloading one.
echo "torch==2.13.0+cpu" > "$VENV/constraints.txt"
"$VENV/bin/pip" install -q -c "$VENV/constraints.txt" llmcompressor
"$VENV/bin/python" -c "import llmcompressor, torch; print('llmcompressor', llmcompressor.__version__, 'torch', torch.__version__)"
