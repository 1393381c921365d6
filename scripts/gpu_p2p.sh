#!/usr/bin/env bash
# On a 1-GPU host (from the repo root, wheels in .whl): the p2p Ulysses exchange (sfattn/p2p.py)
# on ranks sharing the GPU under MPS - the layer checks on meshes 1x2 (p2p) and 2x2 (p2p inside
# each emulated machine, puts across), then the fixed cost at 2 ranks, p2p beside the put exchange.
#   P2P_MESHES="1x2 2x2"   meshes of tests/gpu_sfattn.py;  FIXED_REPS=21
# Results: $OUT/fixed_2.json, $OUT/summary_gpu.json, logs; a short table last.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|Error|error|assert'
source scripts/gpu_common.sh
for m in ${P2P_MESHES:-1x2 2x2}; do
  M=${m%x*}; G=${m#*x}
  step layers_$m 240 python3 -m oneside.launch -n $((M * G)) --machines $M --backend nvshmem tests/gpu_sfattn.py
  grep -E "ok:|Error|assert" "$OUT/layers_$m.log" | grep -v '^WARN' | tail -4
done
step fixed_2 150 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py --shapes flux1024 flux2048 \
  --reps ${FIXED_REPS:-21} --json "$OUT/fixed_2.json" --summary "$OUT/summary_gpu.json"
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
grep -A4 "ranks on" "$OUT/fixed_2.log" 2>/dev/null
exit $status
