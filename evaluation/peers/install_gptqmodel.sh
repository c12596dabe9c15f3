#!/usr/bin/env bash
# Benchmark-only peer: GPTQModel in its own venv, on the CPU torch on disk. GPTQModel 7.7 asks for
# torch >= 2.14.1, but the only 2.14.1 wheel here is a CUDA build (several GB of nvidia-* packages, and
# it does not import without them); its code runs on the CPU torch 2.13.0, so it is installed with
# --no-deps and its other requirements (from its sdist's requirements.txt, torch line removed) are
# installed by hand under a constraint that keeps torch 2.13.0+cpu.
# Usage: bash evaluation/peers/install_gptqmodel.sh [VENV]
set -euo pipefail
VENV=${1:-/tmp/gptqmodel-venv}
VERSION=${GPTQMODEL_VERSION:-7.7.0}
TORCH_WHEEL=${TORCH_WHEEL:-/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "$TORCH_WHEEL"
echo "torch==2.13.0+cpu" > "$VENV/constraints.txt"
"$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$WORK" "gptqmodel==$VERSION"
tar -xzf "$WORK"/gptqmodel-"$VERSION".tar.gz -C "$WORK"
grep -v '^torch>=' "$WORK/gptqmodel-$VERSION/requirements.txt" > "$WORK/requirements.txt"
"$VENV/bin/pip" install -q -c "$VENV/constraints.txt" -r "$WORK/requirements.txt"
"$VENV/bin/pip" install -q -c "$VENV/constraints.txt" "optimum>=2.3.0"
"$VENV/bin/pip" install -q --no-deps "$WORK"/gptqmodel-"$VERSION".tar.gz
GPTQMODEL_CPU_WORKERS=2 "$VENV/bin/python" -c "import gptqmodel, torch; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"
