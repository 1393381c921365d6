#!/usr/bin/env bash
# On a 1-GPU host (from the repo root, wheels of ../shared/device/fetch-wheels.sh in .whl): the
# reliability checks with ranks sharing the GPU under MPS - GPU fault checks, the oneside and
# layer GPU tests (CUDA graphs replay tagged barriers), the per-call cost of the checks, the
# chaos soak (GPU_CALLS layer calls per mesh) and injected faults (GPU_FAULT_RUNS runs).
# Results in $OUT (chaos_gpu.json, summary_gpu.json, logs).
STEP_SHOW='PASSED|ok:|Error|error|calls|faults_|us"'
source scripts/gpu_common.sh
step faults_gpu 90 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_faults.py
step primitives 180 python3 -m oneside.launch -n 2 --backend nvshmem tests/gpu_primitives.py
step layers 200 python3 -m oneside.launch -n 2 --machines 2 --backend nvshmem tests/gpu_sfattn.py
step layers1 150 python3 -m oneside.launch -n 1 --backend nvshmem tests/gpu_sfattn.py
step checks_cost 60 python3 perf/bench_checks.py --summary "$OUT/summary_gpu.json"
step soak 170 python3 perf/chaos.py soak --backend nvshmem --dtype bfloat16 --meshes 2x1 1x2 3x1 \
  --calls "${GPU_CALLS:-7000}" --chaos 0.05,200 --timeout 20 --deadline 160 --heap 256MiB --write \
  --out "$OUT/chaos_gpu.json" --summary "$OUT/summary_gpu.json"
step faults 230 python3 perf/chaos.py faults --backend nvshmem --dtype bfloat16 --meshes 2x1 1x2 3x1 \
  --runs "${GPU_FAULT_RUNS:-6}" --fault-calls 6 --timeout 8 --heap 256MiB --write \
  --out "$OUT/faults_gpu.json" --summary "$OUT/summary_gpu.json"
echo quit | nvidia-cuda-mps-control 2>/dev/null || true
grep -E "^(soak|fault) " "$OUT/soak.log" "$OUT/faults.log" | cut -c1-160
cat "$OUT/summary_gpu.json" 2>/dev/null
exit $status
