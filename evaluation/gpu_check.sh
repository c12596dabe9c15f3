#!/usr/bin/env bash
# The GPU check: everything compress has to prove on a CUDA machine, in one run (~10 min on an H200).
#
#   bash evaluation/gpu_check.sh            # on a machine with a CUDA GPU
#   bash evaluation/gpu_check.sh --dry-run  # every step on CPU at tiny sizes (the test suite runs this)
#
# Steps (each writes <step>.log, and its table where it has one, under one results folder,
# evaluation/results/gpu-<UTC date>/ or $RESULTS):
#   1. install  a Python whose torch sees CUDA: $PYTHON if set, else ./.venv if its torch sees CUDA,
#               else `scripts/install.sh --test` and then the CUDA wheel of the same torch version,
#               $TORCH_SPEC (default: the version installed, e.g. torch==2.13.0) from pip's index, or
#               from $TORCH_INDEX_URL when set (e.g. https://download.pytorch.org/whl/cu128). The CPU
#               wheel that scripts/install.sh pins on the development machine is no use on a GPU.
#               SKIP_INSTALL=1 uses $PYTHON (or .venv) as it is. Optional kernels for the hybrid's
#               Mamba2 fast path: EXTRA_PIP="mamba-ssm causal-conv1d" (built against that torch).
#               then nvidia-smi, torch / CUDA versions -> env.txt
#   3. tests    the GPU-marked tests: pytest -m gpu tests/gpu tests/hybrid/test_gpu.py -> tests.log
#   4. scale    evaluation/bench_scale.py --device cuda --dtype bfloat16 --untied --recipe-sizes
#               (the Llama-3-8B shape, 2 layers, each method at its recipe's calibration size) -> scale.md
#   5. smoke    the CLI on smollm2-135m on CUDA: quantize (GPTQ W4 g64 act-order), prune (SlimGPT 20 %),
#               hybridize (4 MLA + 26 Mamba2) then eval of the hybrid -> smoke-*.log, smoke-*/compress.json
# --dry-run: CPU, the tiny shape (bench_scale --shape tiny, 2 × 32 tokens), the GPU tests with
# COMPRESS_GPU_TEST_DEVICE=cpu (cpu against cpu: the test code runs), and the smoke runs on a 2-layer
# tiny Llama with smollm2's tokenizer (tiny-model/, saved by the scale step) at 2 × 32 tokens, all
# four commands in one interpreter (one step, smoke.log); results in gpu-dry-<date>/.
# Every step runs even when an earlier one failed; the exit status is the number of failed steps, and
# summary.md lists each step's status and seconds. Commit the results folder.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
STAMP=$(date -u +%Y-%m-%d-%H%M)
if [ $DRY = 1 ]; then
  RESULTS=${RESULTS:-$REPO/evaluation/results/gpu-dry-$STAMP}
else
  RESULTS=${RESULTS:-$REPO/evaluation/results/gpu-$STAMP}
fi
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/summary.md"
FAILED=0
export COMPRESS_PROGRESS=0 PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
printf '# gpu_check %s (%s)\n\n| step | status | seconds |\n|---|---|---:|\n' \
  "$([ $DRY = 1 ] && echo '--dry-run' || echo '')" "$(date -u '+%Y-%m-%d %H:%M UTC')" > "$SUMMARY"

step() {  # step NAME COMMAND...: run, log to NAME.log, record status and time
  local name=$1; shift
  local start=$SECONDS status
  echo "== $name: $*" | tee "$RESULTS/$name.log"
  if "$@" >> "$RESULTS/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; FAILED=$((FAILED + 1)); fi
  echo "| $name | $status | $((SECONDS - start)) |" >> "$SUMMARY"
  echo "== $name: $status in $((SECONDS - start)) s (log: $RESULTS/$name.log)"
}

has_cuda() { "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

install() {
  if [ $DRY = 1 ]; then  # the development machine's venv as it is
    PY=${PYTHON:-$REPO/.venv/bin/python}
    echo "dry run: using $PY as it is (env.txt: its versions)"
    return
  fi
  PY=${PYTHON:-$REPO/.venv/bin/python}
  if [ "${SKIP_INSTALL:-0}" = 1 ] || { [ -x "$PY" ] && has_cuda "$PY" && "$PY" -c 'import compress, pytest'; }; then
    echo "using $PY as it is"
  else
    [ -n "${PYTHON:-}" ] || bash scripts/install.sh --test
    PY=${PYTHON:-$REPO/.venv/bin/python}
    local spec=${TORCH_SPEC:-torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
    if ! has_cuda "$PY"; then
      echo "installing the CUDA build: $spec ${TORCH_INDEX_URL:+from $TORCH_INDEX_URL}"
      "$PY" -m pip install --force-reinstall --no-deps ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$spec" \
        || "$PY" -m pip install --force-reinstall ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$spec"
    fi
  fi
  [ -z "${EXTRA_PIP:-}" ] || "$PY" -m pip install --no-build-isolation $EXTRA_PIP || echo "optional: $EXTRA_PIP failed"
  has_cuda "$PY" || { echo "torch in $PY does not see a CUDA device"; return 1; }
}

env_info() {
  { command -v nvidia-smi >/dev/null && nvidia-smi; } || echo "nvidia-smi: none"
  "$PY" - <<'EOF'
import platform, torch, transformers, compress
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "transformers", transformers.__version__)
print("cuda available:", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("mamba_ssm", "causal_conv1d"):
    try:
        __import__(name); print(name, "importable")
    except Exception as exc:  # optional kernels
        print(name, "not importable:", type(exc).__name__)
EOF
}

gpu_tests() {
  [ $DRY = 0 ] || export COMPRESS_GPU_TEST_DEVICE=cpu
  "$PY" -m pytest -q -ra -p no:cacheprovider -m gpu tests/gpu tests/hybrid/test_gpu.py \
    --junitxml="$RESULTS/tests.xml"
}

scale() {
  if [ $DRY = 1 ]; then
    "$PY" -m evaluation.bench_scale --device cpu --shape tiny --layers 2 --samples 2 --seqlen 32 --threads 1 \
      --ild-steps 1 --out "$RESULTS/scale.md" --json "$RESULTS/scale.json" --save-model "$RESULTS/tiny-model"
  else
    "$PY" -m evaluation.bench_scale --device cuda --dtype bfloat16 --untied --layers 2 --recipe-sizes \
      --batch-size "${SCALE_BATCH:-8}" --out "$RESULTS/scale.md" --json "$RESULTS/scale.json"
  fi
}

smoke() {  # smoke KIND: one CLI run on the smoke model
  local kind=$1 dev=cuda model=${SMOKE_MODEL:-smollm2-135m} samples=32 seqlen=512 windows=4 mla=0,10,20,28
  local out="$RESULTS/smoke-$kind" cli=("$PY" -m compress)
  case $kind in
    gptq) "${cli[@]}" quantize "$model" --method gptq --bits 4 --group-size 64 --sym --act-order \
            --data wikitext2 --samples $samples --seqlen $seqlen --device $dev --out "$out" --force ;;
    slimgpt) "${cli[@]}" prune "$model" --method slimgpt --ratio 0.2 --schedule log \
            --data wikitext2 --samples $samples --seqlen $seqlen --device $dev --out "$out" --force ;;
    hybrid) "${cli[@]}" hybridize "$model" --mla-layers $mla --device $dev --out "$out" --force &&
            "${cli[@]}" eval "$out" --data wikitext2 --seqlen $seqlen --windows $windows --device $dev --cost --json ;;
  esac
}

install_env() { install && env_info > "$RESULTS/env.txt"; }
step install install_env
[ -n "${PY:-}" ] || PY=${PYTHON:-$REPO/.venv/bin/python}
one_process() {  # dry run: every smoke command through the same CLI (click) in one interpreter
  "$PY" - "$@" <<'EOF'
import sys
from compress.cli import main
commands, current = [], []
for arg in sys.argv[1:]:  # commands separated by ";;"
    if arg == ";;":
        commands.append(current); current = []
    else:
        current.append(arg)
commands.append(current)
for argv in commands:
    print("== compress", " ".join(argv), flush=True)
    try:
        main(argv, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
EOF
}

step tests gpu_tests
step scale scale
if [ $DRY = 1 ]; then  # one interpreter for the smoke commands (each python start costs seconds on 2 CPUs)
  M=$RESULTS/tiny-model
  step smoke one_process quantize "$M" --method gptq --bits 4 --group-size 64 --sym --act-order --data wikitext2 \
    --samples 2 --seqlen 32 --device cpu --out "$RESULTS/smoke-gptq" --force ";;" \
    prune "$M" --method slimgpt --ratio 0.2 --schedule log --data wikitext2 --samples 2 --seqlen 32 --device cpu \
    --out "$RESULTS/smoke-slimgpt" --force ";;" \
    hybridize "$M" --mla-layers 0 --device cpu --out "$RESULTS/smoke-hybrid" --force ";;" \
    eval "$RESULTS/smoke-hybrid" --data wikitext2 --seqlen 32 --windows 1 --device cpu --cost --json
else
  for kind in gptq slimgpt hybrid; do step "smoke-$kind" smoke $kind; done
fi
echo "results: $RESULTS ($FAILED failed step(s))"
cat "$SUMMARY"
exit $FAILED
