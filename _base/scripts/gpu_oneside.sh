#!/usr/bin/env bash
# On a GPU host (from the repo root): install carried wheels, build the shim, run the oneside GPU
# checks on each "ranks:machines" of $ONESIDE_RANKS (default: 2 ranks, and 4 ranks as 2 virtual
# machines), then the oneside benchmark if ONESIDE_BENCH=1. Scale-out hosts: e.g.
# ONESIDE_RANKS="4:1 4:2 4:4 8:2 8:4 8:1".
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m oneside.native > /tmp/shim-build.log 2>&1 || { tail -30 /tmp/shim-build.log; exit 1; }
status=0
for nm in ${ONESIDE_RANKS-2:1 4:2}; do  # ranks:machines
  n=${nm%:*}; m=${nm#*:}
  timeout 180 python3 -m oneside.launch -n $n --machines $m --backend nvshmem tests/gpu_primitives.py 2>&1 | tee "/tmp/gpu_primitives_${n}_${m}.log" | grep -v "^WARN" | tail -25
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
if [ "${ONESIDE_BENCH:-0}" = 1 ]; then
  timeout 300 python3 -m oneside.launch -n 2 --backend nvshmem perf/bench_oneside.py --out "$OUT" 2>&1 | grep -v "^WARN" | tee "$OUT/bench_oneside.log" | tail -80
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
exit $status
