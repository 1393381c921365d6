#!/usr/bin/env bash
# On a 1-GPU Hopper host (repo root, wheels in .whl), ranks sharing the GPU under MPS: the default
# (p2p) call of Ulysses-only plans with each rank's own head group left in the caller's tensors.
# tests/gpu_sfattn.py at 1x2 and 1x3, bench_fixed.py at Flux 1024 and 2048 alternating with
# $OWN_BASE (an older tree, if set), a chaos soak of 1x2.  OWN_STEPS picks the parts (default all).
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|passed|Error|error|assert|soak'
source scripts/gpu_common.sh
STEPS=${OWN_STEPS:-"tests fixed chaos"}
if [[ $STEPS == *tests* ]]; then
  step sfattn_1x2 240 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_sfattn.py
  step sfattn_1x3 240 python3 -m oneside.launch -n 3 --backend nvshmem tests/gpu_sfattn.py
fi
if [[ $STEPS == *fixed* ]]; then
  [ -n "${OWN_BASE:-}" ] && (cd "$OWN_BASE" && python3 -m oneside.native > "$OUT/base-shim.log" 2>&1)
  for rep in 1 2; do
    step fixed_now_$rep 150 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py \
      --shapes flux1024 flux2048 --reps 21 --json "$OUT/fixed_now_$rep.json"
    [ -n "${OWN_BASE:-}" ] && (cd "$OWN_BASE" && PYTHONPATH=/tmp/site:$PWD step fixed_base_$rep 150 python3 -m \
      oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py --shapes flux1024 flux2048 --reps 21 \
      --json "$OUT/fixed_base_$rep.json")
  done
fi
if [[ $STEPS == *chaos* ]]; then
  step chaos 150 python3 perf/chaos.py soak --backend nvshmem --dtype bfloat16 --meshes 1x2 --heap 128MiB \
    --calls 600 --chaos 0.05,200 --out "$OUT/chaos_gpu.json"
fi
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
grep -h "ok:" "$OUT"/sfattn_1x*.log 2>/dev/null | tail -4
for f in "$OUT"/fixed_*.log; do [ -f "$f" ] && { echo "== $f"; grep -A3 "ranks on" "$f" | cut -c1-150; }; done
grep -h "^soak" "$OUT/chaos.log" 2>/dev/null
exit $status
