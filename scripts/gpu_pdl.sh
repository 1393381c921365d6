#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root, wheels in .whl), 2 ranks sharing the GPU under MPS:
# the io call with programmatic dependent launches. GPU fault checks (tests/gpu_faults.py), the io
# layer tests, perf/timeline_io.py, then perf/bench_fixed.py at Flux 1024 alternating with an older
# tree ($PDL_BASE, e.g. from `git archive`; skipped when unset), then a short chaos soak of the io
# call. Results: $OUT/*.json and logs.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|passed|Error|error|assert|soak'
source scripts/gpu_common.sh
step faults 90 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_faults.py
GPU_SFATTN_ONLY=io step io_1x2 150 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_sfattn.py
step timeline 120 python3 -m oneside.launch -n 2 --backend nvshmem perf/timeline_io.py --json "$OUT/timeline_io.json"
[ -n "${PDL_BASE:-}" ] && (cd "$PDL_BASE" && python3 -m oneside.native > "$OUT/base-shim.log" 2>&1)
for rep in 1 2; do
  step fixed_now_$rep 150 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py --shapes flux1024 \
    --reps ${FIXED_REPS:-21} --json "$OUT/fixed_now_$rep.json"
  if [ -n "${PDL_BASE:-}" ]; then
    (cd "$PDL_BASE" && PYTHONPATH=/tmp/site:$PWD step fixed_base_$rep 150 python3 -m oneside.launch -n 2 --backend nvshmem \
      perf/bench_fixed.py --shapes flux1024 --reps ${FIXED_REPS:-21} --json "$OUT/fixed_base_$rep.json")
  fi
done
step chaos_io 150 python3 perf/chaos.py soak --backend nvshmem --dtype bfloat16 --meshes ${CHAOS_MESHES:-1x2 1x3} --heap 128MiB \
  --calls ${CHAOS_CALLS:-300} --chaos 0.05,200 --io --out "$OUT/chaos_io_gpu.json"
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
grep "ok:" "$OUT/io_1x2.log" 2>/dev/null | tail -4
grep -A30 "ranks on" "$OUT/timeline.log" 2>/dev/null
for f in "$OUT"/fixed_*.log; do echo "== $f"; grep -A3 "ranks on" "$f"; done
grep "^soak" "$OUT/chaos_io.log" 2>/dev/null
exit $status
