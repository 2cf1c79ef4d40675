#!/usr/bin/env bash
# GPU checks, for a lent GPU machine: run from the repository root.
#   bash scripts/gpu_check.sh            # results -> docs/benchmarks/gpu.md (+ $OUT/gpu.md when $OUT is set)
# 1. the tests marked gpu (NCCL workers, CUDA-event profiling), 2. a GPU search/retrain benchmark on
# Ray Train with one worker per GPU. Each step has its own timeout (GPU_TEST_TIMEOUT, GPU_BENCH_TIMEOUT:
# 300 and 420 s) so a hang cannot eat the session.
# On a machine with PyTorch but no package index, run scripts/gpu_carry.sh here first and copy the tree
# with its .whl/ and .gpudata/ folders: this script installs the wheels when `import ray` fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! "$PY" -c "import ray, pydantic" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-site .whl/*.whl \
    || { echo "installing .whl/ failed: run scripts/gpu_carry.sh again with this machine's Python version" \
              "(its first argument, e.g. 3.12) and copy the new .whl/"; exit 1; }
  export PYTHONPATH=/tmp/gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -d .gpudata ] && export DENSENAS_FASHION_MNIST_DIR=${DENSENAS_FASHION_MNIST_DIR:-$PWD/.gpudata}
REPORT=docs/benchmarks/gpu.md
mkdir -p docs/benchmarks
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

CARD=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
{
  echo "## GPU checks"
  echo
  echo "- card: ${CARD:-none found} (torch sees ${NGPU} GPU(s)); torch $($PY -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null)"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); command: \`bash scripts/gpu_check.sh\`"
  echo "- data: Fashion-MNIST from ${DENSENAS_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}"
  echo
} > "$REPORT"

if [ "${NGPU}" = "0" ]; then
  echo "No CUDA device visible: nothing to check." | tee -a "$REPORT"
  exit 1
fi

echo "### pytest -m gpu" >> "$REPORT"
# only the modules that hold gpu tests: the others import the S3/MLflow stack this machine may lack
GPU_TESTS=$(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout "${GPU_TEST_TIMEOUT:-300}" "$PY" -m pytest -q -m gpu -p no:cacheprovider $GPU_TESTS 2>&1 | tail -25 > /tmp/gpu_pytest.txt
RC_TESTS=${PIPESTATUS[0]}
{ echo '```'; cat /tmp/gpu_pytest.txt; echo '```'; echo "exit status: ${RC_TESTS}"; echo; } >> "$REPORT"

echo "### search + retrain benchmark on GPU workers" >> "$REPORT"
WORKERS=1
[ "${NGPU}" -ge 2 ] && WORKERS=1,2
rm -f docs/benchmarks/gpu_train.md  # so a failed run cannot report an earlier one
timeout "${GPU_BENCH_TIMEOUT:-420}" "$PY" bench/bench_train.py --gpu --workers "$WORKERS" --per-class 300 --epochs 3 --batch 128 \
  > /tmp/gpu_bench.txt 2>&1
RC_BENCH=$?
{ echo "exit status: ${RC_BENCH}"; echo; } >> "$REPORT"
if [ -f docs/benchmarks/gpu_train.md ]; then  # its section lives in gpu.md only (one copy in benchmarks.md)
  cat docs/benchmarks/gpu_train.md >> "$REPORT"; mv docs/benchmarks/gpu_train.md /tmp/gpu_train.md; else
  { echo '```'; grep -v PlacementGroupCleaner /tmp/gpu_bench.txt | tail -30; echo '```'; } >> "$REPORT"; fi

[ -n "${OUT:-}" ] && cp "$REPORT" "$OUT/gpu.md" && cp /tmp/gpu_pytest.txt /tmp/gpu_bench.txt /tmp/gpu_train.md "$OUT/" 2>/dev/null
cat "$REPORT"
exit $(( RC_TESTS != 0 && RC_TESTS != 5 ? RC_TESTS : RC_BENCH ))
