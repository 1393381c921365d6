#!/usr/bin/env bash
# On a 1-GPU Hopper host (from the repo root, with the wheels of ../shared/device/fetch-wheels.sh in
# .whl): the kernel GPU tests, the kernel benchmark (with FlashAttention-3 where fa3_fwd loads),
# then optionally Nsight Compute on our kernel and FA3's.
#   KERNEL_TESTS=0    skip the tests
#   KERNEL_BENCH="--shapes fa3 --blocks 1 4 --impls sm90ws sm90ws:EX2=0,RT=0"
#                     arguments of perf/bench_kernel.py (default: the full table); "" skips it
#   KERNEL_IMPLS="sm90ws:BN=192 ..."  extra configurations to precompile (those the bench names)
#   NCU="sm90ws:1,16384,24,128 fa3:1,16384,24,128"  impl:B,S,H,D profiles -> $OUT/ncu.txt
#   LAYER_TESTS=1     also tests/gpu_sfattn.py on 2 ranks sharing the GPU (MPS), meshes 1x2 and 2x1
#                     (LAYER_MACHINES="2": only 2 virtual machines x 1 GPU)
# Logs go to $OUT (kernel_tests.log, bench_kernel.log, ncu.txt, kernel.json).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
# compile the kernels the tests and the benchmark use, in parallel, into the disk cache
python3 - <<'PY' || exit 1
import os, re
from concurrent.futures import ThreadPoolExecutor
from sfattn.kernels import _build
from sfattn.kernels.flash import _parse_impl
cfgs = [c for c in _build.all_configs(("sm_90a",))]
bench = re.findall(r"(?:sm90ws\S*|fa2)", os.environ.get("KERNEL_BENCH", ""))
ncu = [x.rsplit(":", 1)[0] for x in os.environ.get("NCU", "").split()]
extra = ("sm90ws128", "sm90ws:TMA=0", "sm90ws:NC=3", "sm90ws:NC=3,PERSIST=1", "sm90ws:PERSIST=1",
         "sm90ws:EX2=0,RT=0", *os.environ.get("KERNEL_IMPLS", "").split(), *bench, *ncu)
for impl in dict.fromkeys(extra):
    if impl in ("fa3", "fa3fp8", "sm90ws", "fa2"):
        continue
    base, bn, opts = _parse_impl(impl)
    for d in (64, 128):
        for t in ("bf16", "fp16"):
            c = _build.KernelConfig(base, d, t, "sm_90a", bn, opts)
            try:
                c.defines()  # e.g. CL=2 exists at head dim 128 only
            except ValueError:
                continue
            cfgs.append(c)
with ThreadPoolExecutor(16) as ex:
    list(ex.map(_build.compile_kernel, cfgs))
print(f"compiled {len(cfgs)} kernel configurations")
PY
status=0
if [ "${KERNEL_TESTS:-1}" = 1 ]; then
  timeout 300 python3 -m pytest -q -x tests/test_kernels_gpu.py > "$OUT/kernel_tests.log" 2>&1 || status=1
  tail -3 "$OUT/kernel_tests.log"
fi
if [ -n "${KERNEL_BENCH-x}" ]; then
  args=${KERNEL_BENCH-}
  [ "$args" = x ] && args=""
  timeout ${BENCH_TIMEOUT:-400} python3 perf/bench_kernel.py --out-dir "$OUT" $args > "$OUT/bench_kernel.log" 2>&1 || status=1
  tail -12 "$OUT/bench_kernel.log"
fi
if [ -n "${NCU:-}" ]; then
  : > "$OUT/ncu.txt"
  for spec in $NCU; do  # impl:B,S,H,D (the impl may hold ':' and ',')
    shape=${spec##*:}; impl=${spec%:*}
    echo "===== $impl $shape =====" >> "$OUT/ncu.txt"
    timeout 150 ncu --profile-from-start off --print-details all \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section InstructionStats \
      --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy \
      --section MemoryWorkloadAnalysis \
      python3 perf/ncu_kernel.py --impl "$impl" --shape "$shape" >> "$OUT/ncu.txt" 2>&1 || echo "ncu failed: $spec" | tee -a "$OUT/ncu.txt"
  done
  grep -E "=====|Duration|Compute \(SM\) Throughput|Issue Slots Busy|Registers Per Thread|Executed Ipc Active|Warp Cycles Per Issued|No Eligible" "$OUT/ncu.txt" | head -60
fi
if [ "${LAYER_TESTS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d 2>/dev/null || true
  python3 -m oneside.native > /dev/null 2>&1 || true
  for m in ${LAYER_MACHINES:-1 2}; do
    timeout 240 python3 -m oneside.launch -n 2 --machines $m --backend nvshmem tests/gpu_sfattn.py \
      > "$OUT/layer_m$m.log" 2>&1 || status=1
    grep -E "PASSED|Error|assert" "$OUT/layer_m$m.log" | tail -3
  done
  echo quit | nvidia-cuda-mps-control 2>/dev/null || true
fi
exit $status
