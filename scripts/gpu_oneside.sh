#!/usr/bin/env bash
# On a GPU host (from the repo root): install carried wheels, build the shim, run the oneside GPU
# checks with 2 ranks and with 4 ranks on the GPUs present, then the oneside benchmark if asked.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m oneside.native > "$OUT/shim-build.log" 2>&1 || { tail -30 "$OUT/shim-build.log"; exit 1; }
status=0
for n in ${ONESIDE_RANKS-2 4}; do
  m=$(( n >= 4 ? 2 : 1 ))
  timeout 180 python3 -m oneside.launch -n $n --machines $m --backend nvshmem tests/gpu_primitives.py 2>&1 | tee "$OUT/gpu_primitives_$n.log" | grep -v "^WARN" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
if [ "${ONESIDE_BENCH:-0}" = 1 ]; then
  timeout 300 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_oneside.py --out "$OUT" 2>&1 | grep -v "^WARN" | tee "$OUT/bench_oneside.log" | tail -80
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
