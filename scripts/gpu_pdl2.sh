#!/usr/bin/env bash
# On a 1-GPU Hopper host (repo root, wheels in .whl), 2 ranks sharing the GPU under MPS: the
# exchange call with dependent launches. tests/gpu_sfattn.py at 1x2 (every algorithm, bf16 and fp8),
# bench_fixed.py at Flux 1024 alternating with $PDL_BASE (an older tree), a chaos soak of 1x2.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|passed|Error|error|assert|soak'
source scripts/gpu_common.sh
step sfattn_1x2 240 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_sfattn.py
GPU_SFATTN_ONLY=fp8 step fp8_1x2 150 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_sfattn.py
[ -n "${PDL_BASE:-}" ] && (cd "$PDL_BASE" && python3 -m oneside.native > "$OUT/base-shim.log" 2>&1)
for rep in 1 2; do
  step fixed_now_$rep 150 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py --shapes flux1024 \
    --reps 21 --json "$OUT/fixed_now_$rep.json"
  [ -n "${PDL_BASE:-}" ] && (cd "$PDL_BASE" && PYTHONPATH=/tmp/site:$PWD step fixed_base_$rep 150 python3 -m oneside.launch \
    -n 2 --backend nvshmem perf/bench_fixed.py --shapes flux1024 --reps 21 --json "$OUT/fixed_base_$rep.json")
done
step chaos 150 python3 perf/chaos.py soak --backend nvshmem --dtype bfloat16 --meshes 1x2 --heap 128MiB \
  --calls 600 --chaos 0.05,200 --out "$OUT/chaos_gpu.json"
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
grep -h "ok:" "$OUT/sfattn_1x2.log" | tail -3
for f in "$OUT"/fixed_*.log; do echo "== $f"; grep -A2 "ranks on" "$f" | cut -c1-140; done
grep "^soak" "$OUT/chaos.log"
exit $status
