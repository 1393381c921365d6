#!/usr/bin/env bash
# On a 1-GPU host (from the repo root, wheels in .whl): the per-layer fixed cost (issue: latency at
# everyday sizes). Ranks share the GPU under MPS. Steps (FIXED_STEPS, default all):
#   layers     tests/gpu_sfattn.py at 2 ranks (meshes 1x2, 2x1) and 1 rank: the layer still exact
#   primitives tests/gpu_primitives.py (oneside GPU primitives)
#   checks     perf/bench_checks.py: check()/poison cost, 1 rank: layer vs kernel vs cuDNN at 4608
#   fixed      perf/bench_fixed.py at 1, 2 and 4 ranks: layer - kernels, split by cause
#   e2e        examples/dit_sp.py Flux 1024^2 compiled, 1 rank vs 2 ranks sharing the GPU
# Results: $OUT/summary_gpu.json (keys to merge into docs/perf/summary.json), $OUT/fixed_N.json,
# $OUT/e2e_flux1024.json, logs; a short table last.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|passed|Error|error|_ms|us"'
source scripts/gpu_common.sh
want() { [[ " ${FIXED_STEPS:-layers primitives checks fixed e2e} " == *" $1 "* ]]; }
if want layers; then
  step layers2 200 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_sfattn.py
  step layers1 120 python3 -m oneside.launch -n 1 --backend nvshmem tests/gpu_sfattn.py
fi
want primitives && step primitives 150 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_primitives.py
want checks && step checks 90 python3 perf/bench_checks.py --summary "$OUT/summary_gpu.json"
if want fixed; then
  for n in 1 2 4; do
    step fixed_$n 150 python3 -m oneside.launch -n $n --backend nvshmem perf/bench_fixed.py --reps ${FIXED_REPS:-31} \
      --json "$OUT/fixed_$n.json" --summary "$OUT/summary_gpu.json"
  done
fi
if want e2e; then
  step e2e 420 python3 -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model flux --size 1024 \
    --ranks-per-gpu 2 --peers --compile --steps ${E2E_STEPS:-8} --json "$OUT/e2e_flux1024.json" --summary "$OUT/summary_gpu.json"
fi
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
for n in 1 2 4; do grep -A4 "ranks on" "$OUT/fixed_$n.log" 2>/dev/null; done
grep -A6 "^flux" "$OUT/e2e.log" 2>/dev/null | head -8
cat "$OUT/summary_gpu.json" 2>/dev/null
exit $status
