#!/usr/bin/env bash
# On a 1-GPU host (from the repo root, wheels in .whl), 2 ranks sharing the GPU under MPS:
#   io      tests/gpu_sfattn.py GPU_SFATTN_ONLY=io at 1x2 (io buffers: in place = exchange, bitwise)
#   timeline  perf/timeline_io.py at 2 ranks: device timestamps between the io call's parts
#   fixed   perf/bench_fixed.py at 2 ranks, Flux 1024 and 2048 (layer, layer_io, their kernels)
#   chaos   perf/chaos.py soak --io on 1x2 and 1x3 (in place under delays, bitwise and vs float64)
#   e2e     examples/dit_sp.py Flux 1024^2 compiled with --cuda-graph, 1 rank vs 2 ranks
#   e2e_plain  the same without --cuda-graph (its summary keys: $OUT/summary_plain.json)
# IO_STEPS picks steps (default all). Results: $OUT/*.json, $OUT/summary_gpu.json, logs.
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
STEP_SHOW='PASSED|passed|Error|error|assert|ms/step'
source scripts/gpu_common.sh
want() { [[ " ${IO_STEPS:-io fixed chaos e2e} " == *" $1 "* ]]; }
want io && GPU_SFATTN_ONLY=io step io_1x2 150 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_sfattn.py
want timeline && step timeline 120 python3 -m oneside.launch -n 2 --backend nvshmem perf/timeline_io.py \
  --json "$OUT/timeline_io.json"
want fixed && step fixed_2 150 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_fixed.py \
  --shapes flux1024 flux2048 --reps ${FIXED_REPS:-21} --json "$OUT/fixed_2_io.json" --summary "$OUT/summary_gpu.json"
want chaos && step chaos_io 150 python3 perf/chaos.py soak --backend nvshmem --dtype bfloat16 --meshes 1x2 1x3 \
  --calls ${CHAOS_CALLS:-600} --chaos 0.05,200 --heap 128MiB --io --write --out "$OUT/chaos_io_gpu.json" --summary "$OUT/summary_gpu.json"
want e2e && step e2e ${E2E_TIMEOUT:-330} python3 -m oneside.launch -n 2 --backend nvshmem examples/dit_sp.py \
  --model flux --size 1024 --ranks-per-gpu 2 --peers --compile --cuda-graph --steps ${E2E_STEPS:-8} ${E2E_ARGS:-} \
  --json "$OUT/e2e_flux1024_graph.json" --summary "$OUT/summary_gpu.json"
want e2e_plain && step e2e_plain ${E2E_PLAIN_TIMEOUT:-330} python3 -m oneside.launch -n 2 --backend nvshmem \
  examples/dit_sp.py --model flux --size 1024 --ranks-per-gpu 2 --peers --compile --steps ${E2E_STEPS:-8} \
  --json "$OUT/e2e_flux1024.json" --summary "$OUT/summary_plain.json"
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
grep "ok:" "$OUT/io_1x2.log" 2>/dev/null | tail -12
grep -A30 "ranks on" "$OUT/timeline.log" 2>/dev/null
grep -A3 "ranks on" "$OUT/fixed_2.log" 2>/dev/null
grep "^soak" "$OUT/chaos_io.log" 2>/dev/null
for f in e2e e2e_plain; do grep -A4 "^flux" "$OUT/$f.log" 2>/dev/null | head -6; done
cat "$OUT/summary_gpu.json" "$OUT/summary_plain.json" 2>/dev/null
exit $status
