#!/usr/bin/env bash
# GPU checks, for a lent GPU machine: run from the repository root.
#   bash scripts/gpu_check.sh            # results -> docs/benchmarks/gpu.md (+ $OUT/gpu.md when $OUT is set)
# 1. the tests marked gpu (NCCL workers, CUDA-event profiling), 2. a GPU search/retrain benchmark on
# Ray Train with one worker per GPU. Each step has its own timeout so a hang cannot eat the session.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
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
  echo
} > "$REPORT"

if [ "${NGPU}" = "0" ]; then
  echo "No CUDA device visible: nothing to check." | tee -a "$REPORT"
  exit 1
fi

echo "### pytest -m gpu" >> "$REPORT"
timeout 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -25 > /tmp/gpu_pytest.txt
RC_TESTS=${PIPESTATUS[0]}
{ echo '```'; cat /tmp/gpu_pytest.txt; echo '```'; echo "exit status: ${RC_TESTS}"; echo; } >> "$REPORT"

echo "### search + retrain benchmark on GPU workers" >> "$REPORT"
WORKERS=1
[ "${NGPU}" -ge 2 ] && WORKERS=1,2
timeout 420 "$PY" bench/bench_train.py --gpu --workers "$WORKERS" --per-class 300 --epochs 3 --batch 128 \
  > /tmp/gpu_bench.txt 2>&1
RC_BENCH=$?
{ echo "exit status: ${RC_BENCH}"; echo; } >> "$REPORT"
if [ -f docs/benchmarks/gpu_train.md ]; then cat docs/benchmarks/gpu_train.md >> "$REPORT"; else
  { echo '```'; tail -30 /tmp/gpu_bench.txt; echo '```'; } >> "$REPORT"; fi

[ -n "${OUT:-}" ] && cp "$REPORT" "$OUT/gpu.md" && cp /tmp/gpu_pytest.txt /tmp/gpu_bench.txt "$OUT/" 2>/dev/null
cat "$REPORT"
exit $(( RC_TESTS != 0 && RC_TESTS != 5 ? RC_TESTS : RC_BENCH ))
