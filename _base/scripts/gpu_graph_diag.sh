#!/usr/bin/env bash
# Where a --cuda-graph run of examples/dit_sp.py spends its time or gets stuck (1 GPU, 2 ranks
# sharing it): each case runs with DIT_SP_TRACE=1 under a watchdog that, at its limit, makes
# every rank print all its threads' stacks (SIGUSR1) and then stops it. Logs: $OUT/diag_*.log.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
source scripts/gpu_common.sh
export DIT_SP_TRACE=1
diag() {  # name limit args...
  local name=$1 t=$2; shift 2
  python3 -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model flux --ranks-per-gpu 2 --peers \
    --steps 3 "$@" > "$OUT/diag_$name.log" 2>&1 &
  local pid=$! t0=$SECONDS
  while kill -0 $pid 2>/dev/null && (( SECONDS - t0 < t )); do sleep 2; done
  if kill -0 $pid 2>/dev/null; then
    echo "== $name: still running after ${t}s, stacks:" >> "$OUT/diag_$name.log"
    pkill -USR1 -f examples/dit_sp.py; sleep 4; pkill -9 -f examples/dit_sp.py; wait $pid
  fi
  echo "== $name ($((SECONDS - t0)) s)"; grep -E "dit_sp rank|ms/step|rel err|FAILED|Error" "$OUT/diag_$name.log" | tail -14
}
diag ${DIAG_CASES:-eager 100 --size 512 --depth 1 --cuda-graph}
[ -n "${DIAG2:-}" ] && diag $DIAG2
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
