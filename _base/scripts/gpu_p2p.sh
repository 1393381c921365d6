#!/usr/bin/env bash
# On a 1-GPU host (from the repo root, wheels in .whl): the p2p Ulysses exchange (sfattn/p2p.py)
# and the one-kernel barrier over mapped teams, ranks sharing the GPU under MPS:
#   layers      tests/gpu_sfattn.py on meshes $P2P_MESHES (default "2x2 1x2")
#   primitives  tests/gpu_primitives.py at 2 ranks (barriers, waits, timeouts)
#   fixed       perf/bench_fixed.py at 2 ranks: p2p beside the put exchange, with the mapped
#               barrier (fixed_2.json) and without it (ONESIDE_MAPPED_BARRIER=0: fixed_2_nvshmem.json);
#               at 4 ranks (fixed_4.json)
#   e2e         examples/dit_sp.py Flux 1024^2 compiled, 1 rank vs 2 ranks sharing the GPU
#               (E2E_ARGS: more arguments, e.g. "--compile-mode reduce-overhead"; E2E_TIMEOUT seconds)
# P2P_STEPS picks steps (default all). Results: $OUT/*.json, $OUT/summary_gpu.json, logs.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|passed|Error|error|assert'
source scripts/gpu_common.sh
want() { [[ " ${P2P_STEPS:-layers primitives fixed e2e} " == *" $1 "* ]]; }
if want layers; then
  for m in ${P2P_MESHES:-2x2 1x2}; do
    M=${m%x*}; G=${m#*x}
    step layers_$m 200 python3 -m oneside.launch -n $((M * G)) --machines $M --backend nvshmem tests/gpu_sfattn.py
  done
fi
want primitives && step primitives 150 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_primitives.py
if want fixed; then
  step fixed_2 120 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py --shapes flux1024 flux2048 \
    --reps ${FIXED_REPS:-21} --json "$OUT/fixed_2.json" --summary "$OUT/summary_gpu.json"
  ONESIDE_MAPPED_BARRIER=0 step fixed_2_nvshmem 120 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py \
    --shapes flux1024 flux2048 --reps ${FIXED_REPS:-21} --json "$OUT/fixed_2_nvshmem.json"
  step fixed_4 150 python3 -m oneside.launch -n 4 --backend nvshmem perf/bench_fixed.py --shapes flux1024 flux2048 \
    --reps ${FIXED_REPS:-21} --json "$OUT/fixed_4.json"
fi
if want e2e; then
  step e2e ${E2E_TIMEOUT:-330} python3 -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py --model flux --size 1024 \
    --ranks-per-gpu 2 --peers --compile --steps ${E2E_STEPS:-8} ${E2E_ARGS:-} --json "$OUT/e2e_flux1024.json" \
    --summary "$OUT/summary_gpu.json"
fi
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
for f in fixed_2 fixed_2_nvshmem fixed_4; do echo "== $f"; grep -A3 "ranks on" "$OUT/$f.log" 2>/dev/null; done
grep -A6 "^flux" "$OUT/e2e.log" 2>/dev/null | head -8
cat "$OUT/summary_gpu.json" 2>/dev/null
exit $status
