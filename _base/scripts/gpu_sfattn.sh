#!/usr/bin/env bash
# On a GPU host (from the repo root): install, build the shim, run the sfattn GPU checks on each
# "ranks:machines" of $SFATTN_MESHES (default 2:1 2:2 4:2, i.e. meshes 1x2, 2x1 and 2x2 on 2 GPUs),
# then the layer benchmark if SFATTN_BENCH=1 (meshes: $SFATTN_BENCH_MACHINES; emulated links:
# $SFATTN_LINKS, e.g. "40,10 20,10"). Scale-out hosts: SFATTN_MESHES="4:1 4:2 4:4 8:2 8:4 8:1".
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
python3 -m oneside.native > /tmp/shim-build.log 2>&1 || { tail -30 /tmp/shim-build.log; exit 1; }
status=0
for nm in ${SFATTN_MESHES-2:1 2:2 4:2}; do
  n=${nm%:*}; m=${nm#*:}
  timeout 300 python3 -m oneside.launch -n $n --machines $m --backend nvshmem tests/gpu_sfattn.py 2>&1 | tee "/tmp/gpu_sfattn_${n}_${m}.log" | grep -v "^WARN" | tail -20
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
if [ "${SFATTN_BENCH:-0}" = 1 ]; then
  for m in ${SFATTN_BENCH_MACHINES-1 2}; do
    timeout 400 python3 -m oneside.launch -n 2 --machines $m --backend nvshmem perf/bench_layer.py --out "$OUT" 2>&1 | grep -v "^WARN" | tee "/tmp/bench_layer_$m.log" | tail -40
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
  for link in ${SFATTN_LINKS-}; do  # emulated slow inter-machine links, GB/s,latency_us
    ONESIDE_EMULATE_LINK=$link timeout 400 python3 -m oneside.launch -n 2 --machines 2 --backend nvshmem perf/bench_layer.py --out "$OUT" --shapes flux3072,flux4096 2>&1 | grep -v "^WARN" | tee "/tmp/bench_layer_link_${link/,/_}.log" | tail -20
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
fi
exit $status
